"""The ``Job`` value: one event's download as a row of the job store, and its states.

An event is a job from the moment it is accepted. Its life::

    queued ──claim──▶ running ──▶ done
      ▲                  │
      └──retry later─────┤ (a retryable failure inside the retry window)
                         └──▶ failed   (a dead letter: kept until retried or deleted)
    rejected                           (an event that can never be downloaded)

A ``running`` job whose lease runs out (its worker died) is claimed again as it stands.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

from ..cartfile import CartFile
from ..errors import (
    CartError,
    CartFailedError,
    CartGoneError,
    CartTimeoutError,
    CartUnavailableError,
    DownloaderError,
    DownloadError,
    DownloadInterruptedError,
    IntegrityError,
    InvalidEventError,
    InvalidInputError,
    LocalStorageError,
    NoFilesError,
    PolicyUnavailableError,
    UnsafeArchiveError,
)
from .errors import PayloadTooLargeError, ServiceBusyError, UnsupportedMediaTypeError


class JobState(StrEnum):
    """Where a job is in its life (the diagram above); the store keeps the value."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"


FINISHED: Final = frozenset({JobState.DONE, JobState.FAILED, JobState.REJECTED})


class WorkerDiedError(DownloaderError):
    """A job's attempts keep ending with their worker dead: no retry, an operator decides."""


class ErrorKind(StrEnum):
    """What went wrong, in one word: logs, metrics, job records and answers use it."""

    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    NO_FILES = "no_files"
    INVALID_EVENT = "invalid_event"
    INVALID_INPUT = "invalid_input"
    BUSY = "busy"
    WORKER_DIED = "worker_died"
    CART_TIMEOUT = "cart_timeout"
    CART_GONE = "cart_gone"
    CART_FAILED = "cart_failed"
    CARTD_UNAVAILABLE = "cartd_unavailable"
    UNSAFE_ARCHIVE = "unsafe_archive"
    INTEGRITY = "integrity"
    DOWNLOAD_INTERRUPTED = "download_interrupted"
    STORAGE = "storage"
    DOWNLOAD_FAILED = "download_failed"
    POLICY_UNAVAILABLE = "policy_unavailable"
    STORE_UNAVAILABLE = "store_unavailable"
    INTERNAL_ERROR = "internal_error"


# Error class -> kind. The first match wins, so subclasses come first.
ERROR_KINDS: Final[tuple[tuple[type[BaseException], ErrorKind], ...]] = (
    (UnsupportedMediaTypeError, ErrorKind.UNSUPPORTED_MEDIA_TYPE),
    (PayloadTooLargeError, ErrorKind.PAYLOAD_TOO_LARGE),
    (NoFilesError, ErrorKind.NO_FILES),
    (InvalidEventError, ErrorKind.INVALID_EVENT),
    (InvalidInputError, ErrorKind.INVALID_INPUT),
    (ServiceBusyError, ErrorKind.BUSY),
    (WorkerDiedError, ErrorKind.WORKER_DIED),
    (CartTimeoutError, ErrorKind.CART_TIMEOUT),
    (CartGoneError, ErrorKind.CART_GONE),
    (CartFailedError, ErrorKind.CART_FAILED),
    (CartUnavailableError, ErrorKind.CARTD_UNAVAILABLE),
    (CartError, ErrorKind.CART_FAILED),
    (UnsafeArchiveError, ErrorKind.UNSAFE_ARCHIVE),
    (IntegrityError, ErrorKind.INTEGRITY),
    (DownloadInterruptedError, ErrorKind.DOWNLOAD_INTERRUPTED),
    (LocalStorageError, ErrorKind.STORAGE),
    (DownloadError, ErrorKind.DOWNLOAD_FAILED),
    (PolicyUnavailableError, ErrorKind.POLICY_UNAVAILABLE),
    (DownloaderError, ErrorKind.INTERNAL_ERROR),
)


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind of an error, ``internal_error`` for anything not ours."""
    return next((kind for cls, kind in ERROR_KINDS if isinstance(exc, cls)), ErrorKind.INTERNAL_ERROR)


@dataclass(frozen=True)
class JobError:
    """What the last failed attempt (or the rejection) said."""

    kind: str
    detail: str
    retryable: bool
    context: Mapping[str, Any]

    @classmethod
    def of(cls, exc: BaseException) -> JobError:
        """Record an exception; context values are kept only when JSON can hold them."""
        if isinstance(exc, DownloaderError):
            context = {
                key: value
                for key, value in exc.context.items()
                if key in ("field", "object", "member", "path", "url", "status")
                and isinstance(value, (str, int, float, bool))
            }
            return cls(error_kind(exc), str(exc), exc.retryable, context)
        return cls(ErrorKind.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"[:2000], True, {})

    def body(self) -> dict[str, Any]:
        """The error as every JSON answer carries it: kind, detail, retryable, context."""
        return {"error": self.kind, "detail": self.detail, "retryable": self.retryable, **self.context}


@dataclass(frozen=True)
class Job:
    """One event's download as the store holds it. Times are seconds since the epoch."""

    id: str
    source: str
    event_id: str
    type: str
    state: JobState
    attempts: int
    created_at: float
    updated_at: float
    run_at: float
    retry_from: float = 0.0
    files: tuple[CartFile, ...] = ()
    # How many files: len(files), or what the store says when it read the job without them.
    file_count: int | None = None
    event: Mapping[str, Any] | None = None
    lease_owner: str | None = None
    lease_expires: float | None = None
    attempt_path: str | None = None
    cart_url: str | None = None
    download_path: str | None = None
    host: str | None = None
    result: Mapping[str, Any] | None = None
    error: JobError | None = None
    finished_at: float | None = None
    removed_at: float | None = None
    deaths: int = 0
    # Deliveries of the same (source, id) with another body, and when the last came.
    conflicts: int = 0
    conflict_at: float | None = None
    # Not stored: this delivery (the one the intake answers now) was such a conflict.
    conflicted: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """What makes two deliveries the same event (CloudEvents: ``source`` + ``id``)."""
        return (self.source, self.event_id)

    @property
    def finished(self) -> bool:
        """Whether the job has reached an end (done, failed or rejected)."""
        return self.state in FINISHED

    def summary(self) -> dict[str, Any]:
        """The JSON-ready state of the job, without HTTP concerns."""
        body: dict[str, Any] = {
            "job_id": self.id,
            "event_id": self.event_id,
            "source": self.source,
            "state": self.state,
            "attempts": self.attempts,
            **({"worker_deaths": self.deaths} if self.deaths else {}),
            "created": _iso(self.created_at),
            "updated": _iso(self.updated_at),
        }
        if self.state == JobState.QUEUED and self.attempts:
            body["next_attempt"] = _iso(self.run_at)
        if self.finished_at is not None:
            body["finished"] = _iso(self.finished_at)
        count = len(self.files) if self.file_count is None else self.file_count
        if count:
            body["file_count"] = count
        if self.download_path is not None:
            body["download_path"] = self.download_path
            body["host"] = self.host
        if self.removed_at is not None:
            body["removed"] = _iso(self.removed_at)
        if self.conflicts:
            body["conflicts"] = {
                "count": self.conflicts,
                "last": _iso(self.conflict_at) if self.conflict_at is not None else None,
                "detail": "this event's source and id came again with another body; that body was "
                "not downloaded (send new data under a new id)",
            }
        if self.result:
            body.update(
                files=self.result.get("files"),
                bytes=self.result.get("bytes"),
                seconds=self.result.get("seconds"),
            )
        if self.error is not None:
            error = self.error.body()
            # A job that ended badly carries its error flat, as every error answer does; one
            # waiting for a retry says what went wrong last time.
            if self.state in (JobState.FAILED, JobState.REJECTED):
                body.update(error)
            else:
                body["last_error"] = error
        return body


def dumps(value: Any, indent: int | None = None) -> str:
    """JSON for a store column or a file we write (Unicode kept; compact unless ``indent``).

    A lone surrogate (a JSON body may escape one) cannot be encoded as UTF-8: text
    that holds one is written with every non-ASCII character escaped instead, which reads
    back to the same value.
    """
    separators = (",", ":") if indent is None else (",", ": ")
    text = json.dumps(value, ensure_ascii=False, separators=separators, indent=indent)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(value, separators=separators, indent=indent)
    return text


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
