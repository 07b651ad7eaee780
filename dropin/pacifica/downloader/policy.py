"""Upstream's ``pacifica.downloader.policy``: ``TransactionInfo.yield_files(transinfo)``.

Unlike 0.4.1 the document is validated when ``yield_files`` is called (an
``InvalidTransactionInfoError``, a ``ValueError``, names the first bad file), and ``subdir``
and ``name`` are joined without a doubled or leading ``/``.
"""

from downloader_service.transactioninfo import TransactionInfo

__all__ = ["TransactionInfo"]
