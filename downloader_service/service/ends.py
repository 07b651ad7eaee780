"""Waiting for jobs to end, and for jobs to do: woken when it happens, not at the next poll.

The store calls :meth:`JobEnds.ended` right after it commits a job's end (done or failed), so a
waiter in the same process wakes at once. On PostgreSQL that transaction also sends ``NOTIFY``
on :data:`CHANNEL` with the job's id, and one listener thread per process, on a connection of
its own, hands what arrives to :meth:`JobEnds.ended` too: a waiter wakes when a worker in
another process ends its job. A notification can be lost (the listener's connection drops, the
server restarts), so a waiter still reads the store now and then, slowly while the listener
listens and as before while it does not, and the listener wakes every waiter whenever it
(re)connects. SQLite has no such channel: across processes a waiter keeps polling.

The other way round, a transaction that makes a job due now (the intake's, an operator's
retry, a job handed back at shutdown) sends ``NOTIFY`` on :data:`QUEUED_CHANNEL`, and a worker
subscribed with :meth:`JobEnds.on_queued` looks for it at once: a ``worker`` process beside an
intake-only ``serve`` no longer waits for its next poll (``DOWNLOADER_POLL_INTERVAL``).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Final

LOGGER = logging.getLogger(__name__)

# The PostgreSQL channel on which a job's end is announced; the payload is the job's id.
CHANNEL: Final = "downloader_job_ends"
# The channel on which jobs becoming due now are announced (no payload).
QUEUED_CHANNEL: Final = "downloader_jobs_queued"
# How often the listener looks up from its connection to see whether it must stop.
LISTEN_TICK: Final = 0.25
# Pause before the listener connects again after its connection failed.
RECONNECT_PAUSE: Final = 1.0


class Watch:
    """What one waiter waits on: set when any of its jobs ends (or everyone is woken)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._woken = threading.Event()
        self._cause: str | None = None
        # Why each wait returned ("local", "notify", "reconnect", "stopping"), for tests and logs.
        self.causes: list[str] = []

    def wake(self, cause: str) -> None:
        with self._lock:
            if not self._woken.is_set():
                self._cause = cause
                self._woken.set()

    def wait(self, timeout: float) -> str | None:
        """Wait at most ``timeout`` seconds; why it was woken, or None if nothing woke it.

        The wake is consumed here, before the caller reads the store again: a job that ends
        after this returns wakes the next wait, and one that ended before is in what it reads.
        """
        if not self._woken.wait(timeout):
            return None
        with self._lock:
            cause, self._cause = self._cause or "local", None
            self._woken.clear()
        self.causes.append(cause)
        return cause


class JobEnds:
    """Who waits for which job, and the listener that hears of ends in other processes."""

    def __init__(self, conninfo: str | None = None) -> None:
        # A libpq URL to LISTEN on (PostgreSQL), or None (SQLite: this process only).
        self.conninfo = conninfo
        self._lock = threading.Lock()
        self._waiting: dict[str, set[Watch]] = {}
        self._listening = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        # Waiters woken, by cause: how waits end (tests read it; an operator could).
        self.woken: Counter[str] = Counter()
        # Called when another process made a job due (see on_queued).
        self._queued: list[Callable[[], None]] = []

    @property
    def listening(self) -> bool:
        """Whether ends in other processes reach this one now (a PostgreSQL listener is on)."""
        return self._listening.is_set()

    @contextmanager
    def watch(self, job_ids: Iterable[str]) -> Iterator[Watch]:
        """Be woken while inside the block when any of ``job_ids`` ends."""
        ids = list(job_ids)
        watch = Watch()
        self._start_listener()
        with self._lock:
            for job_id in ids:
                self._waiting.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            with self._lock:
                for job_id in ids:
                    watchers = self._waiting.get(job_id)
                    if watchers is not None:
                        watchers.discard(watch)
                        if not watchers:
                            del self._waiting[job_id]

    def on_queued(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever any process makes a job due now; starts the listener.

        PostgreSQL only. Called on every (re)connection of the listener too: jobs may have
        come while it did not listen.
        """
        with self._lock:
            self._queued.append(callback)
        self._start_listener()

    def ended(self, job_ids: Iterable[str], cause: str = "local") -> None:
        """Wake whoever waits for one of ``job_ids`` (called after the end is committed)."""
        with self._lock:
            watchers = {watch for job_id in job_ids for watch in self._waiting.get(job_id, ())}
            self.woken[cause] += len(watchers)
        for watch in watchers:
            watch.wake(cause)

    def wake_all(self, cause: str) -> None:
        """Wake every waiter (stopping; or ends may have been missed): each reads the store."""
        with self._lock:
            watchers = {watch for group in self._waiting.values() for watch in group}
            self.woken[cause] += len(watchers)
        for watch in watchers:
            watch.wake(cause)

    def close(self) -> None:
        """Stop the listener (within :data:`LISTEN_TICK`) and wake every waiter."""
        self._closed.set()
        thread = self._thread
        if thread is not None:
            thread.join(LISTEN_TICK * 4 + 5)
        self.wake_all("stopping")

    # ------------------------------------------------------------ the listener
    def _start_listener(self) -> None:
        """Start listening with the first waiter or worker: a CLI never opens the connection."""
        if self.conninfo is None or self._closed.is_set():
            return
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._listen, name="job-ends-listener", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        import psycopg  # only a PostgreSQL store gets here

        assert self.conninfo is not None
        while not self._closed.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    conn.execute(f"LISTEN {QUEUED_CHANNEL}")
                    # Whatever ended or came while nobody listened: every waiter reads the store
                    # once (woken before ``listening`` says so, so one that sees it missed nothing).
                    self.wake_all("reconnect")
                    self._call_queued()
                    self._listening.set()
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=LISTEN_TICK):
                            if note.channel == QUEUED_CHANNEL:
                                self._call_queued()
                            else:
                                self.ended([note.payload], "notify")
            except psycopg.Error as exc:
                LOGGER.warning("listening for job ends failed; waiters poll", extra={"detail": str(exc)})
            finally:
                self._listening.clear()
            self._closed.wait(RECONNECT_PAUSE)

    def _call_queued(self) -> None:
        with self._lock:
            callbacks = list(self._queued)
        for callback in callbacks:
            callback()
