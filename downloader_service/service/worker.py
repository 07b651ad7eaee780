"""The worker: claim a job from the store, download it, record how it ended; renew leases.

One :class:`Worker` runs ``settings.workers`` download threads and one heartbeat thread
in a process. The heartbeat renews the leases of the jobs being downloaded; a job whose
lease was lost (another worker took it over) or that must stop (shutdown past its grace) is
cancelled at the next progress call of its download. The worker knows nothing of HTTP.

Each attempt writes into a hidden directory of its own, ``.attempt-<job>-<attempt>`` under
the download root, which is recorded in the job *before* it is made; the cart's URL is
recorded as soon as Cartd accepts it. When the files are verified, ``notification.json`` and
``metadata.json`` join them, and the directory is renamed to its place from
``DOWNLOADER_LAYOUT`` -- one rename, so a download directory is complete or absent. Whoever
claims a job whose worker died removes what that attempt left (its directory, its cart, a
place it had renamed to but not recorded as done) first, and :meth:`Worker.recover` removes
``.attempt-*`` directories that no job names (an attempt killed between two steps).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import requests

from ..downloader import Downloader, DownloadResult
from ..errors import LocalStorageError
from ..progress import DownloadProgress
from .events import Deliverer, cart_deletion, completion_notice
from .health import readiness, serve_health
from .jobs import ErrorKind, Job, JobError, WorkerDiedError
from .layout import apply_umask, render, write_beside
from .logs import configure_json_logging
from .metrics import ServiceMetrics
from .retry import RetryPolicy
from .settings import Settings
from .store import JobStore, Notice, StoreError, default_owner, open_store

LOGGER = logging.getLogger(__name__)

ATTEMPT_PREFIX = ".attempt-"
RETENTION_SWEEP_SECONDS = 60.0
# A job whose attempts ended with their worker dead this often fails instead of killing more.
MAX_WORKER_DEATHS = 5
# After the grace, how long a download stuck in a read may take to notice it must stop.
STUCK_WAIT = 2.0
# An idle worker trims the heap at most this often (a trim costs about a millisecond).
TRIM_IDLE_SECONDS = 2.0

DownloaderFactory = Callable[[DownloadProgress], Downloader]


class JobCancelled(Exception):
    """Raised inside a download to stop it: the lease was lost, or the worker is stopping."""

    def __init__(self, reason: str, release: bool) -> None:
        super().__init__(reason)
        self.release = release


class _Active:
    """A job being downloaded, and whether (and why) it must stop."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.cancelled: JobCancelled | None = None
        self.cart_url: str | None = None  # recorded before the POST ...
        self.cart_made = False  # ... and whether Cartd answered it
        # Bytes are arriving: only then is there something a shutdown grace can save.
        self.transferring = False

    @property
    def made_cart(self) -> str | None:
        """The cart to delete after this attempt: only one Cartd said it made."""
        return self.cart_url if self.cart_made else None

    def cancel(self, reason: str, release: bool) -> None:
        if self.cancelled is None:
            self.cancelled = JobCancelled(reason, release)

    def check(self) -> None:
        if self.cancelled is not None:
            raise self.cancelled


class _JobProgress(DownloadProgress):
    """Records the cart in the job and stops the download when the job is cancelled."""

    def __init__(self, active: _Active, on_cart: Callable[[str], None]) -> None:
        self.active = active
        self.on_cart = on_cart

    def cart_planned(self, cart_url: str) -> None:
        # Recorded before the POST: if this process dies while Cartd makes the cart, the next
        # claimer still knows which cart to delete.
        self.on_cart(cart_url)
        self.active.check()

    def cart_created(self, cart_url: str, files: int) -> None:
        self.active.cart_made = True
        self.active.check()

    def cart_status(self, status: str, message: str) -> None:
        self.active.check()

    def file_started(self, path: str, size: int) -> None:
        self.active.transferring = True
        self.active.check()

    def file_advanced(self, nbytes: int) -> None:
        self.active.check()


class Worker:
    """Download threads and a heartbeat over one :class:`JobStore`."""

    def __init__(
        self,
        store: JobStore,
        make_downloader: DownloaderFactory,
        settings: Settings,
        metrics: ServiceMetrics,
        *,
        retry: RetryPolicy | None = None,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.make_downloader = make_downloader
        self.settings = settings
        self.metrics = metrics
        self.retry = retry or RetryPolicy(
            settings.retry_base, settings.retry_max_delay, settings.retry_window
        )
        self.owner = owner or default_owner()
        self.host = socket.gethostname()
        self.clock = clock
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._threads: list[threading.Thread] = []
        self._last_renewal = time.monotonic()
        self._last_sweep = 0.0
        self._last_trim = 0.0
        # Delivers completion events (with a sink) and deletes finished attempts' carts.
        self.deliverer = Deliverer(store, settings, self.owner, self.retry, clock=clock)

    # --------------------------------------------------------------- lifecycle
    def start(self) -> Worker:
        """Check the download root, clean leftovers of dead attempts, then start the threads."""
        prepare_root(self.settings.root())
        self.recover()
        for number in range(self.settings.workers):
            thread = threading.Thread(target=self._loop, name=f"download-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        heartbeat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        heartbeat.start()
        self._threads.append(heartbeat)
        self.deliverer.start()
        # Jobs another process makes due (an intake-only serve, an operator's retry) wake the
        # idle threads at once on PostgreSQL, not at their next poll.
        self.store.ends.on_queued(self.wake)
        return self

    def wake(self) -> None:
        """New jobs were added: idle threads look at once instead of at their next poll."""
        self._wakeup.set()

    def stop(self, grace: float = 0.0) -> None:
        """Stop claiming; give running downloads ``grace`` seconds, then hand them back.

        A job handed back is ``queued`` again, its attempt not counted, for this process's
        next start or any other worker.
        """
        self._stopping.set()
        self._wakeup.set()
        deadline = time.monotonic() + grace
        # A job still waiting for Cartd has nothing to save: handed back at once (it notices
        # at its next poll). Only transfers in progress get the grace.
        self._cancel(lambda job: not job.transferring)
        self.deliverer.stop()
        for thread in self._threads:
            if thread.name.startswith("download-"):
                thread.join(max(0.0, deadline - time.monotonic()))
        self._cancel(lambda job: True)
        # A download stuck in a read notices only when the read returns: wait a little, then
        # release the lease ourselves; its leftovers are cleaned by the next claimer.
        for thread in self._threads:
            thread.join(max(0.0, min(STUCK_WAIT, deadline + STUCK_WAIT - time.monotonic())))
        with self._lock:
            stuck = list(self._active.values())
        for job in stuck:
            # Removed before the job is handed back: the next claimer's attempt has the same
            # name. What the stuck thread may still write is recorded for that claimer to remove.
            shutil.rmtree(self.attempt_path(job.job), ignore_errors=True)
            try:
                self.store.release(job.job.id, self.owner, clean=False)
            except StoreError as exc:
                LOGGER.warning("could not release a job", extra={"job_id": job.job.id, "detail": str(exc)})

    def _cancel(self, which: Callable[[_Active], bool]) -> None:
        with self._lock:
            active = [job for job in self._active.values() if which(job)]
        for job in active:
            job.cancel("the worker is stopping", release=True)

    def busy(self) -> int:
        """How many downloads this process runs now."""
        with self._lock:
            return len(self._active)

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                ran = self.run_once()
            except StoreError as exc:
                LOGGER.warning("the job store failed; retrying", extra={"detail": str(exc)})
                self._stopping.wait(self.settings.poll_interval * 4)
                continue
            except Exception:
                LOGGER.exception("worker loop failed")
                self._stopping.wait(self.settings.poll_interval * 4)
                continue
            if ran is None:
                self._trim_when_idle()
                self._wakeup.wait(self.settings.poll_interval)
                # Once stopping, the wake-up stays set: a thread that clears it must not leave
                # another to sleep a whole poll interval before it sees the stop.
                if not self._stopping.is_set():
                    self._wakeup.clear()

    def _trim_when_idle(self) -> None:
        """Nothing to do: give freed heap back now (at most every :data:`TRIM_IDLE_SECONDS`).

        What a process holds at rest is then what it needs, not what its last burst left.
        """
        now = time.monotonic()
        with self._lock:
            if self._active or now - self._last_trim < TRIM_IDLE_SECONDS:
                return
            self._last_trim = now
        release_free_memory()

    def run_once(self) -> Job | None:
        """Claim one due job and run it to its end here; the job as it ended, or None."""
        if self._stopping.is_set():
            return None
        job = self.store.claim(self.owner, self.settings.lease_seconds)
        if job is None:
            return None
        active = _Active(job)
        with self._lock:
            # stop() sets _stopping, then cancels what is in _active under this lock: a job
            # claimed while it did is either cancelled there or handed back here, untried.
            stopping = self._stopping.is_set()
            if not stopping:
                self._active[job.id] = active
        if stopping:
            # What a dead worker's attempt left stays recorded for the next claimer to remove.
            self.store.release(job.id, self.owner, clean=False)
            return None
        try:
            self._run(active)
        finally:
            with self._lock:
                del self._active[job.id]
        return self.store.get(job.id, contents=False)

    def _run(self, active: _Active) -> None:
        job = active.job
        self._clean_attempt(job.attempt_path, job.cart_url, job.download_path)
        path = self.attempt_path(job)
        log = {"job_id": job.id, "event_id": job.event_id, "attempt": job.attempts}
        if job.deaths >= MAX_WORKER_DEATHS:
            error = WorkerDiedError(
                f"{job.deaths} attempts of this job ended with their worker dead (killed, out of "
                "memory, a crash); it is not tried again without an operator",
                deaths=job.deaths,
            )
            self._failed(job, error, log, [])
            return
        if not self.store.note_attempt(job.id, self.owner, attempt_path=path, cart_url=None):
            LOGGER.warning("lost the job before it started", extra=log)
            return
        LOGGER.info("download started", extra={**log, "download_path": path, "files": len(job.files)})
        started = time.monotonic()

        def on_cart(cart_url: str) -> None:
            active.cart_url = cart_url
            self.store.note_attempt(job.id, self.owner, cart_url=cart_url)

        try:
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                raise LocalStorageError(f"cannot make {path}: {exc.strerror}", path=path) from exc
            downloader = self.make_downloader(_JobProgress(active, on_cart))
            result = downloader.download(list(job.files), self.settings.filename, path)
            active.check()
            final = self._publish(job, path)
        except JobCancelled as exc:
            shutil.rmtree(path, ignore_errors=True)
            if exc.release:
                # Stopping: no waiting on Cartd. A cart it made is deleted through the outbox;
                # one whose POST had no answer yet stays recorded for the next claimer.
                unanswered = active.cart_url is not None and active.made_cart is None
                self.store.release(
                    job.id, self.owner, clean=not unanswered, notices=cart_deletion(active.made_cart)
                )
            elif active.made_cart is not None:  # the lease was lost: delete it now, best effort
                self.make_downloader(DownloadProgress()).cart_api.delete_cart(active.made_cart)
            LOGGER.warning("download stopped", extra={**log, "reason": str(exc)})
            return
        except Exception as exc:  # noqa: BLE001 - whatever broke, the job records it and retries
            shutil.rmtree(path, ignore_errors=True)
            self._failed(job, exc, log, cart_deletion(active.made_cart))
            return
        self._done(job, final, result, time.monotonic() - started, log)

    def _publish(self, job: Job, path: str) -> str:
        """Add the event and its metadata to the verified files and move them into place."""
        job = replace(job, event=self.store.event(job.id))  # read now: a claim leaves it out
        try:
            write_beside(path, job)
            apply_umask(path, self.settings.umask_bits())
            final = self.final_path(job)
            # Recorded first: if this process dies after the rename, the next claimer removes it.
            if not self.store.note_attempt(job.id, self.owner, download_path=final):
                raise JobCancelled("the lease was lost to another worker", release=False)
            parent = os.path.dirname(final)
            os.makedirs(parent, mode=0o777 & ~self.settings.umask_bits(), exist_ok=True)
            os.rename(path, final)
        except OSError as exc:
            # A name too long (or otherwise refused as a name) fails the same way every time.
            never = exc.errno in (errno.ENAMETOOLONG, errno.EINVAL)
            raise LocalStorageError(
                f"cannot move the download into place: {exc}", path=path, retryable=not never
            ) from exc
        return final

    def _done(self, job: Job, path: str, result: DownloadResult, seconds: float, log: dict[str, Any]) -> None:
        summary = {
            "files": result.file_count,
            "bytes": result.bytes,
            "seconds": round(result.seconds, 4),
            "staging_seconds": round(result.staging_seconds, 4),
            "cart_url": result.cart_url,
        }
        notices = [*cart_deletion(result.cart_url)]
        notice = completion_notice(self.settings, job, summary, path, self.host)
        notices += [notice] if notice is not None else []
        if not self.store.finish(job.id, self.owner, path, self.host, summary, notices):
            # Another worker took the job over while this one was slow, and owns what is at
            # `path` now: it removed this attempt's directory when it claimed the job, and may
            # have published its own there since. Touch nothing; the new owner's record counts.
            LOGGER.warning("finished a job whose lease was lost; the new owner's download counts", extra=log)
            return
        LOGGER.info("event downloaded", extra={**log, "download_path": path, **summary})
        self.metrics.job_done(result.file_count, result.bytes, seconds, time.time() - job.created_at)

    def _failed(self, job: Job, exc: Exception, log: dict[str, Any], notices: list[Notice]) -> None:
        error = JobError.of(exc)
        previous = job.error.kind if job.error is not None else None
        now = self.clock()
        delay = self.retry.delay(job.attempts, exc, now - job.retry_from, previous)
        extra = {**log, "error": error.kind, "detail": error.detail}
        if error.kind == ErrorKind.INTERNAL_ERROR:
            LOGGER.error("download crashed", exc_info=exc, extra=extra)
        if delay is None:
            notice = completion_notice(self.settings, job, error=error)
            self.store.fail(job.id, self.owner, error, [*notices, *([notice] if notice else [])])
            LOGGER.warning("download failed for good", extra=extra)
            self.metrics.job_failed(error.kind)
        else:
            self.store.retry_later(job.id, self.owner, error, notices=notices, delay=delay)
            LOGGER.warning("download failed; retrying later", extra={**extra, "retry_in": round(delay, 1)})
            self.metrics.job_retried(error.kind)

    # ---------------------------------------------------------- housekeeping
    def attempt_path(self, job: Job) -> str:
        """The hidden directory attempt ``job.attempts`` writes into."""
        return os.path.join(self.settings.root(), f"{ATTEMPT_PREFIX}{job.id}-{job.attempts}")

    def final_path(self, job: Job) -> str:
        """Where the finished download goes: the layout, made unique with the job id if taken."""
        wanted = os.path.join(self.settings.root(), render(self.settings.layout, job))
        for candidate in (wanted, f"{wanted}-{job.id[:12]}", f"{wanted}-{job.id}"):
            if not os.path.lexists(candidate):
                return candidate
        raise LocalStorageError(
            f"{wanted} and its job-id variants already exist", path=wanted, retryable=False
        )

    def _clean_attempt(self, path: str | None, cart_url: str | None, published: str | None = None) -> None:
        """Remove what a dead attempt left: its directory, its cart, a place it renamed to."""
        for leftover in (path, published):
            if leftover is not None and _inside(leftover, self.settings.root()):
                shutil.rmtree(leftover, ignore_errors=True)
        if cart_url is not None:
            # Best effort (failures are logged): a leftover cart costs Cartd space, not data.
            self.make_downloader(DownloadProgress()).cart_api.delete_cart(cart_url)

    def recover(self) -> list[str]:
        """Remove ``.attempt-*`` directories under the root that no job names; returns them."""
        root = Path(self.settings.root())
        try:
            candidates = [str(entry) for entry in root.iterdir() if entry.name.startswith(ATTEMPT_PREFIX)]
        except OSError:
            return []
        known = set()
        for start in range(0, len(candidates), 500):
            known |= self.store.known_paths(candidates[start : start + 500])
        removed = [path for path in candidates if path not in known]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        if removed:
            LOGGER.info("removed leftovers of dead attempts", extra={"directories": len(removed)})
        return removed

    def sweep_retention(self) -> int:
        """Remove the downloads of jobs done longer ago than ``settings.retention``."""
        if self.settings.retention <= 0:
            return 0
        removed = 0
        for job in self.store.finished_before(self.clock() - self.settings.retention):
            remove_download(job, self.settings)
            self.store.mark_removed(job.id)
            removed += 1
        if removed:
            LOGGER.info("removed expired downloads", extra={"jobs": removed})
        return removed

    def _heartbeat(self) -> None:
        interval = max(0.2, self.settings.lease_seconds / 3)
        while not self._stopping.wait(interval):
            self.heartbeat()

    def heartbeat(self) -> None:
        """Renew every lease held; cancel jobs whose lease was lost; sweep old downloads."""
        with self._lock:
            active = dict(self._active)
        try:
            held = self.store.renew(active, self.owner, self.settings.lease_seconds)
            self._last_renewal = time.monotonic()
        except StoreError as exc:
            LOGGER.warning("could not renew leases", extra={"detail": str(exc)})
            # Without a renewal the lease runs out and another worker may take the job:
            # stop first, so that two attempts never write at once.
            if time.monotonic() - self._last_renewal > self.settings.lease_seconds * 0.75:
                for job in active.values():
                    job.cancel("leases could not be renewed", release=False)
            return
        for job_id, job in active.items():
            if job_id not in held:
                job.cancel("the lease was lost to another worker", release=False)
        release_free_memory()
        if time.monotonic() - self._last_sweep > RETENTION_SWEEP_SECONDS:
            self._last_sweep = time.monotonic()
            try:
                self.sweep_retention()
            except StoreError as exc:
                LOGGER.warning("retention sweep failed", extra={"detail": str(exc)})


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Thirty-odd threads allocate and free per request and per job; glibc keeps what they freed
    in their arenas, so a ``serve`` that had a busy hour kept its peak for good (the soak
    benchmark: +1 MB every 1,000 events without it, flat with it). A trim costs about a
    millisecond; the heartbeat calls it every third of a lease.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def map_large_blocks() -> None:
    """Keep glibc giving each large block (128 KiB or more) its own mapping, unmapped when freed.

    glibc raises that threshold each time such a block is freed, up to 32 MiB, after which the
    next ones (an event's 10 MB of text, the files' 7 MB) come from the heap, where what is
    freed stays resident: the intake's texts of a large event were still held when its
    download ran, and the two added up. Setting the threshold (to glibc's own default) stops
    it from moving. Elsewhere than glibc, nothing.
    """
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


_M_MMAP_THRESHOLD = -3  # malloc.h


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    return getattr(libc, "malloc_trim", None)


def remove_download(job: Job, settings: Settings) -> bool:
    """Remove a job's download directory, and parents the layout made that are left empty."""
    path = job.download_path or job.attempt_path
    root = os.path.realpath(settings.root())
    if path is None or not _inside(path, root):
        return False
    shutil.rmtree(path, ignore_errors=True)
    parent = os.path.dirname(os.path.realpath(path))
    while parent != root and _inside(parent, root):
        try:
            os.rmdir(parent)
        except OSError:
            break
        parent = os.path.dirname(parent)
    return True


def prepare_root(root: str) -> None:
    """Make the download root if it is missing and prove it can be written, or raise."""
    try:
        os.makedirs(root, mode=0o755, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=".write-check-", dir=root)
        os.rmdir(probe)
    except OSError as exc:
        raise LocalStorageError(
            f"the download root {root} cannot be written: {exc.strerror or exc}", path=root
        ) from exc


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is strictly below ``root`` (never remove anything else)."""
    real_root = os.path.realpath(root)
    return os.path.realpath(path).startswith(real_root + os.sep)


def downloader_factory(settings: Settings) -> Callable[[DownloadProgress], Downloader]:
    """Make a :class:`Downloader` per job (each with its progress hook), sharing one session."""
    session = requests.Session()
    options = settings.request_options()  # a CA bundle, a client certificate (checked at start)

    def make(progress: DownloadProgress) -> Downloader:
        return Downloader(
            None,
            settings.cartd_url,
            cart_timeout=settings.cart_timeout,
            cart_timeout_per_file=settings.cart_timeout_per_file,
            cart_timeout_rate=settings.cart_timeout_rate,
            bundle=settings.bundle_choice(),
            bundle_threshold=settings.bundle_threshold,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            progress=progress,
            session=session,
            auth=options,
            # The worker records the cart in the outbox and deletes it after the job's end.
            delete_cart=False,
        )

    return make


def build_worker(
    store: JobStore,
    settings: Settings,
    role: str,
    make_downloader: Callable[[DownloadProgress], Downloader] | None = None,
) -> Worker:
    """A worker and its metrics, made together (``serve`` and ``worker`` both build them here).

    The metrics are labelled with the worker's lease owner and ``role``, count its busy
    download threads and report the store's jobs.
    """
    owner = default_owner()
    metrics = ServiceMetrics({"owner": owner, "role": role})
    worker = Worker(store, make_downloader or downloader_factory(settings), settings, metrics, owner=owner)
    metrics.in_flight.set_function(worker.busy)
    metrics.watch_store(store.stats)
    return worker


def run_worker(settings: Settings) -> None:
    """Run download workers only (no HTTP) until SIGTERM or SIGINT, then stop gracefully."""
    configure_json_logging(settings.log_level)
    map_large_blocks()
    prepare_root(settings.root())  # before the store: a refused start touches nothing
    store = open_store(
        settings.database(), upgrade=settings.db_upgrade, pool_size=settings.workers + 3, max_overflow=4
    )
    worker = build_worker(store, settings, "worker")
    health = None
    if settings.health_port:
        session = requests.Session()
        health = serve_health(
            settings, settings.health_port, lambda: readiness(settings, store, session), worker.metrics
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    try:
        worker.start()
        LOGGER.info(
            "working",
            extra={
                "owner": worker.owner,
                "workers": settings.workers,
                "cartd_url": settings.cartd_url,
                "download_root": settings.root(),
                "store": store.describe(),
            },
        )
        stop.wait()
        LOGGER.info("stopping", extra={"grace": settings.shutdown_grace, "running": worker.busy()})
        worker.stop(settings.shutdown_grace)
    finally:
        if health is not None:
            health.shutdown()
        store.close()
