"""Download jobs: a bounded worker pool, one job per event, and duplicate detection.

Each job downloads into a fresh ``mkdtemp`` directory under the download root and removes
that directory if it fails. The same event (``source`` + ``id``) delivered again maps to the
first job, unless that job failed in a way a retry can fix.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .cartfile import CartFile
from .downloader import Downloader, DownloadResult
from .errors import DownloaderError, ServiceBusyError
from .metrics import ServiceMetrics
from .settings import Settings

LOGGER = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
_UNSAFE_PREFIX_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class Job:
    """One event's download. ``future`` resolves when the job has finished either way."""

    id: str
    event_id: str
    key: tuple[str, str]
    state: str = QUEUED
    result: DownloadResult | None = None
    error: Exception | None = None
    created: float = field(default_factory=time.monotonic)
    future: Future[None] = field(default_factory=Future)

    @property
    def finished(self) -> bool:
        """Whether the job is done or failed."""
        return self.state in (DONE, FAILED)


class JobRunner:
    """Runs downloads on ``settings.workers`` threads with ``settings.queue_size`` waiting."""

    def __init__(
        self,
        settings: Settings,
        downloader: Downloader,
        metrics: ServiceMetrics,
        make_directory: Callable[[str], str] | None = None,
    ) -> None:
        self.settings = settings
        self.downloader = downloader
        self.metrics = metrics
        self.make_directory = make_directory or self._mkdtemp
        self._executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="download")
        self._slots = threading.BoundedSemaphore(settings.workers + settings.queue_size)
        self._lock = threading.Lock()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._by_key: dict[tuple[str, str], Job] = {}

    def submit(self, event_id: str, key: tuple[str, str], files: Sequence[CartFile]) -> tuple[Job, bool]:
        """Start (or find) the job for an event: ``(job, started_now)``.

        Raises :class:`ServiceBusyError` when every worker and queue slot is taken.
        """
        with self._lock:
            existing = self._by_key.get(key)
            if existing is not None and not _retry_allowed(existing):
                return existing, False
            if not self._slots.acquire(blocking=False):
                raise ServiceBusyError(
                    f"all {self.settings.workers} workers and {self.settings.queue_size} "
                    "queue slots are busy",
                    retry_after=self.settings.retry_after,
                )
            job = Job(id=uuid.uuid4().hex, event_id=event_id, key=key)
            self._jobs[job.id] = job
            self._by_key[key] = job
            self._forget_old()
        self.metrics.in_flight.inc()
        work = self._executor.submit(self._run, job, list(files))
        work.add_done_callback(lambda work: self._cancelled(job) if work.cancelled() else None)
        return job, True

    def get(self, job_id: str) -> Job | None:
        """The job with this id, if it is still remembered."""
        with self._lock:
            return self._jobs.get(job_id)

    def in_flight(self) -> int:
        """How many jobs are queued or running."""
        with self._lock:
            return sum(1 for job in self._jobs.values() if not job.finished)

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking jobs; with ``wait``, let running ones finish."""
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _run(self, job: Job, files: list[CartFile]) -> None:
        job.state = RUNNING
        directory: str | None = None
        try:
            directory = self.make_directory(job.event_id)
            job.result = self.downloader.download(files, self.settings.filename, directory)
            job.state = DONE
            LOGGER.info(
                "event downloaded",
                extra={
                    "event_id": job.event_id,
                    "job_id": job.id,
                    "cart_url": job.result.cart_url,
                    "download_path": directory,
                    "files": job.result.file_count,
                    "bytes": job.result.bytes,
                    "seconds": round(job.result.seconds, 4),
                },
            )
            self.metrics.bytes.inc(job.result.bytes)
            self.metrics.files.inc(job.result.file_count)
            self.metrics.duration.observe(time.monotonic() - job.created)
        except Exception as exc:
            job.error = exc
            job.state = FAILED
            if isinstance(exc, DownloaderError):
                LOGGER.warning(
                    "event download failed",
                    extra={
                        "event_id": job.event_id,
                        "job_id": job.id,
                        "error": type(exc).__name__,
                        "detail": str(exc),
                    },
                )
            else:
                LOGGER.exception("download job crashed", extra={"job_id": job.id, "event_id": job.event_id})
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)
            _drop_tracebacks(exc)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.events.labels(outcome=job.state).inc()
            self._slots.release()
            job.future.set_result(None)

    def _cancelled(self, job: Job) -> None:
        """A queued job dropped by :meth:`shutdown` still ends, so no request waits forever."""
        job.error = ServiceBusyError("the service stopped before this download started")
        job.state = FAILED
        self.metrics.in_flight.dec()
        self.metrics.events.labels(outcome=FAILED).inc()
        self._slots.release()
        job.future.set_result(None)

    def _mkdtemp(self, event_id: str) -> str:
        prefix = _UNSAFE_PREFIX_CHARS.sub("_", event_id)[:40]
        return tempfile.mkdtemp(prefix=f"event-{prefix}-", dir=self.settings.root())

    def _forget_old(self) -> None:
        """Keep at most ``idempotency_size`` finished jobs (running ones are bounded by slots)."""
        excess = len(self._jobs) - self.settings.idempotency_size
        for job_id in list(self._jobs):
            if excess <= 0:
                break
            job = self._jobs[job_id]
            if job.finished:
                del self._jobs[job_id]
                if self._by_key.get(job.key) is job:
                    del self._by_key[job.key]
                excess -= 1


def _drop_tracebacks(exc: BaseException) -> None:
    """Forget the frames of a kept error: they hold the download's buffers and objects."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        error.__traceback__ = None
        pending += [error.__cause__, error.__context__]


def _retry_allowed(job: Job) -> bool:
    """A failed job may be replaced when its error says a retry can help."""
    return job.state == FAILED and getattr(job.error, "retryable", False)


def job_summary(job: Job) -> dict[str, Any]:
    """The JSON-ready state of a job, without HTTP concerns."""
    summary: dict[str, Any] = {"job_id": job.id, "event_id": job.event_id, "state": job.state}
    if job.result is not None:
        summary.update(
            download_path=str(job.result.location),
            files=job.result.file_count,
            bytes=job.result.bytes,
            seconds=round(job.result.seconds, 4),
        )
    return summary
