"""Errors only the webhook service raises: about an HTTP request, not about a download.

They extend the library's tree (``downloader_service.errors``) where an answer needs them::

    InvalidEventError
    ├── UnsupportedMediaTypeError   a Content-Type that is no CloudEvents mode we read  (415)
    └── PayloadTooLargeError        a body over DOWNLOADER_MAX_BODY                    (413)
    DownloaderError
    └── ServiceBusyError            DOWNLOADER_MAX_QUEUED jobs wait already (429, retryable)
"""

from __future__ import annotations

from ..errors import DownloaderError, InvalidEventError


class UnsupportedMediaTypeError(InvalidEventError):
    """An HTTP request's ``Content-Type`` is not a CloudEvents mode we read."""


class PayloadTooLargeError(InvalidEventError):
    """An HTTP request's body is larger than the configured limit."""


class ServiceBusyError(DownloaderError):
    """The webhook service has no free worker or queue slot; try again after a pause."""

    retryable = True
