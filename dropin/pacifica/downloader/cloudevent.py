"""Upstream's ``pacifica.downloader.cloudevent``: ``CloudEvent.yield_files(event)``.

Unlike 0.4.1 the event is validated when ``yield_files`` is called: a Files object without
``_id`` or ``name``, with an unsafe path or an unknown hash raises ``InvalidEventError``
(a ``ValueError``) at once, where upstream sent ``False`` values on to Cartd.
"""

from downloader_service.cloudevent import CloudEvent

__all__ = ["CloudEvent"]
