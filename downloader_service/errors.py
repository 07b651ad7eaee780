"""The exception tree of the downloader, split by cause and by whether a retry can help.

Every error the library raises is a :class:`DownloaderError`; nothing from ``requests``,
``urllib3`` or ``tarfile`` escapes it. ``retryable`` tells a caller (or the webhook service,
which turns it into an HTTP status) whether sending the same request again may succeed::

    DownloaderError                      root; retryable = False unless noted
    ├── InvalidInputError (ValueError)   the caller's document is wrong; never retryable
    │   ├── InvalidEventError            a CloudEvent that cannot become a cart
    │   │   └── NoFilesError             ... because it names no files at all
    │   ├── InvalidTransactionInfoError  a Policy transaction document, likewise
    │   └── InvalidConfigError           a configuration (pacifica-cli's INI, a TLS file) is wrong
    ├── CartError                        talking to Cartd
    │   ├── CartFailedError              Cartd refused the cart or reported an error
    │   │   └── CartGoneError            Cartd no longer knows the cart (404)  (retryable)
    │   ├── CartTimeoutError             not ready before the deadline    (retryable)
    │   └── CartUnavailableError         connection trouble or a 5xx      (retryable)
    ├── DownloadError                    fetching and writing the cart's tar
    │   ├── DownloadInterruptedError     the stream broke off or stalled  (retryable)
    │   ├── UnsafeArchiveError           a member we refuse to write
    │   ├── IntegrityError               what landed is not what was asked for
    │   │   ├── HashMismatchError        a file's checksum differs
    │   │   └── MissingFileError         a requested file never arrived (retryable)
    │   └── LocalStorageError            the disk refused (full, permissions) (retryable, except
    │                                        when the destination itself is in the way: a symbolic
    │                                        link, a file where a directory must go or the reverse)
    └── PolicyUnavailableError           Pacifica Policy could not be asked   (retryable)

The webhook service adds its own HTTP-only errors below these (``service/errors.py``).

An instance may say otherwise than its class (``LocalStorageError(..., retryable=False)``) where
the cause, not the class, decides whether a retry can help.

Messages are bounded: values taken from the input are echoed through :func:`echo` (at most
:data:`ECHO_CHARS` characters) and a whole message is cut at :data:`MAX_MESSAGE_CHARS`, so a
hostile document or tar cannot turn one error into megabytes of reply or log.
"""

from __future__ import annotations

import reprlib
from typing import Final

ECHO_CHARS: Final = 200
MAX_MESSAGE_CHARS: Final = 4000

_ECHO = reprlib.Repr()
_ECHO.maxstring = _ECHO.maxother = _ECHO.maxlong = ECHO_CHARS
_ECHO.maxlist = _ECHO.maxtuple = _ECHO.maxdict = _ECHO.maxset = 8
_ECHO.maxlevel = 3


def echo(value: object) -> str:
    """``repr(value)`` for a message, at most :data:`ECHO_CHARS` long (the middle elided)."""
    return shorten(_ECHO.repr(value), ECHO_CHARS)


def shorten(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and how much was cut."""
    if len(text) <= limit:
        return text
    cut = f"… [{len(text) - limit} more characters]"
    return text[: max(0, limit - len(cut))] + cut


def first_line(value: object, limit: int = 300) -> str:
    """The first line of ``value``'s text, at most ``limit`` characters (its type's name if empty).

    For a message built from another library's error or an HTTP answer's body, whose later
    lines (a statement, a traceback, a page) say nothing a reader needs.
    """
    lines = str(value).strip().splitlines()
    return (lines[0] if lines else type(value).__name__)[:limit]


class DownloaderError(Exception):
    """Root of every error raised by :mod:`downloader_service`."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None, **context: object) -> None:
        message = shorten(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable
        # The context (url, cart_id, field, member, ...) is kept both as a dict, for logs and
        # JSON replies, and as attributes, for callers that handle one kind of error.
        self.context = dict(context)
        for key, value in context.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message


class InvalidInputError(DownloaderError, ValueError):
    """The input document cannot be turned into a cart; sending it again will not help."""


class InvalidEventError(InvalidInputError):
    """A CloudEvent is malformed or names files that cannot be downloaded safely."""


class NoFilesError(InvalidEventError):
    """A CloudEvent (or transaction) is well formed but lists no files."""


class InvalidTransactionInfoError(InvalidInputError):
    """A Policy transaction-info document is malformed."""


class InvalidConfigError(InvalidInputError):
    """A configuration file or option cannot be used (an unknown auth type, an unloadable certificate)."""


class CartError(DownloaderError):
    """Cartd did not give us a cart to download."""


class CartFailedError(CartError):
    """Cartd rejected the cart or reported that staging it failed."""


class CartGoneError(CartFailedError):
    """Cartd answered 404 for a cart it had accepted (it purged it); a new cart may work."""

    retryable = True


class CartTimeoutError(CartError):
    """The cart was not ready before the deadline; it may be ready later."""

    retryable = True


class CartUnavailableError(CartError):
    """Cartd could not be reached or answered with a server error."""

    retryable = True


class DownloadError(DownloaderError):
    """The cart was ready but its content could not be written as asked."""


class DownloadInterruptedError(DownloadError):
    """The tar stream was cut short, stalled past the read timeout or was malformed."""

    retryable = True


class UnsafeArchiveError(DownloadError):
    """The tar holds a member that would escape the target or was not requested."""


class IntegrityError(DownloadError):
    """What landed on disk does not match what the metadata promised."""


class HashMismatchError(IntegrityError):
    """A file's checksum differs from its ``hashsum``."""


class MissingFileError(IntegrityError):
    """A requested file was not in the cart's tar."""

    retryable = True


class LocalStorageError(DownloadError):
    """Writing to the destination failed (disk full, permissions, a file in the way).

    Retryable, except for the instances raised when the destination itself blocks the
    download (a symbolic link, a file where a directory must go): a retry would meet it again.
    """

    retryable = True


class PolicyUnavailableError(DownloaderError):
    """Pacifica Policy could not be reached or did not answer with a transaction."""

    retryable = True
