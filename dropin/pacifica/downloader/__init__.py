"""The upstream ``pacifica.downloader`` API, served by pacifica-downloader-service.

``from pacifica.downloader import Downloader`` works as with upstream 0.4.1, with this
project's safety underneath: unsafe tar members refused, every file checked against its
``hashtype``/``hashsum``, nothing half-written left behind, a timeout on every request.
Errors are :class:`downloader_service.DownloaderError` subclasses (re-exported here) where
upstream failed an ``assert`` or raised whatever ``requests`` or ``tarfile`` raised.

This package never imports the ``cloudevents`` SDK: it runs beside ``cloudevents-python``
(which pacifica-dispatcher requires and which overwrites the SDK's ``cloudevents/__init__.py``).
"""

from downloader_service.errors import (
    CartError,
    CartFailedError,
    CartTimeoutError,
    CartUnavailableError,
    DownloaderError,
    DownloadError,
    InvalidInputError,
)

from .cartapi import CartAPI
from .cloudevent import CloudEvent
from .downloader import Downloader
from .policy import TransactionInfo

__all__ = [
    "CartAPI",
    "CartError",
    "CartFailedError",
    "CartTimeoutError",
    "CartUnavailableError",
    "CloudEvent",
    "DownloadError",
    "Downloader",
    "DownloaderError",
    "InvalidInputError",
    "TransactionInfo",
]
