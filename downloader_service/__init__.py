"""Get data out of a Pacifica archive: a Cartd download library and a CloudEvents webhook.

The library keeps the upstream ``pacifica-downloader`` API (``Downloader``, ``CartAPI``,
``CloudEvent``, ``TransactionInfo``) and adds streaming, safe extraction and verification.
"""

import logging

from .archive import ExtractResult
from .cartapi import CartAPI
from .cartfile import CartFile
from .cloudevent import CloudEvent
from .downloader import Downloader, DownloadResult
from .errors import (
    CartError,
    CartFailedError,
    CartGoneError,
    CartTimeoutError,
    CartUnavailableError,
    DownloaderError,
    DownloadError,
    DownloadInterruptedError,
    HashMismatchError,
    IntegrityError,
    InvalidConfigError,
    InvalidEventError,
    InvalidInputError,
    InvalidTransactionInfoError,
    LocalStorageError,
    MissingFileError,
    NoFilesError,
    PolicyUnavailableError,
    UnsafeArchiveError,
)
from .progress import DownloadProgress
from .transactioninfo import TransactionInfo

__version__ = "0.5.0"

__all__ = [
    "CartAPI",
    "CartError",
    "CartFailedError",
    "CartFile",
    "CartGoneError",
    "CartTimeoutError",
    "CartUnavailableError",
    "CloudEvent",
    "DownloadError",
    "DownloadInterruptedError",
    "DownloadProgress",
    "DownloadResult",
    "Downloader",
    "DownloaderError",
    "ExtractResult",
    "HashMismatchError",
    "IntegrityError",
    "InvalidConfigError",
    "InvalidEventError",
    "InvalidInputError",
    "InvalidTransactionInfoError",
    "LocalStorageError",
    "MissingFileError",
    "NoFilesError",
    "PolicyUnavailableError",
    "TransactionInfo",
    "UnsafeArchiveError",
    "__version__",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
