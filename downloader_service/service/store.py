"""The job store: the schema and every query of jobs, on SQLite or PostgreSQL (SQLAlchemy Core).

Jobs are rows. The intake inserts one per event, in the same transaction for a whole batch,
before it answers; requests that arrive together share that transaction too (a group commit:
one INSERT, one commit, one flush to disk for all of them). A unique key on (``source``,
``event_id``) makes a second delivery of an event find the first job instead of making
another. Workers claim a job by setting its ``lease_owner`` and ``lease_expires``: on
PostgreSQL the candidate row is locked with ``FOR UPDATE SKIP LOCKED``, so any number of
workers on any number of machines never claim the same job; on SQLite every write
transaction is ``BEGIN IMMEDIATE``, which serialises them. A worker renews its leases while
it works; a job whose lease ran out is claimable again, and its claimer cleans what the dead
attempt left (``attempt_path``, ``cart_url``). Every change a worker makes is conditional on
still holding the lease, so a worker that lost its job can no longer touch it.

Times are seconds since the epoch from the injected ``clock``: the database is shared by
machines, so a monotonic clock would not do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, SQLAlchemyError

from ..cartfile import CartFile
from ..errors import DownloaderError, first_line
from ..jsonstream import JsonWindow, reader
from . import eventdata
from .ends import CHANNEL as JOB_ENDS_CHANNEL
from .ends import QUEUED_CHANNEL as JOBS_QUEUED_CHANNEL
from .ends import JobEnds
from .eventdata import StoredEvent
from .jobs import Job, JobError, JobState, dumps

LOGGER = logging.getLogger(__name__)

MIGRATIONS: Final = Path(__file__).with_name("migrations")
VERSION_TABLE: Final = "downloader_schema_version"
# pg_advisory_xact_lock key serialising schema upgrades started by many replicas at once.
_UPGRADE_LOCK: Final = 0x70616369666963  # "pacific"
SQLITE_BUSY_TIMEOUT: Final = 30.0
SQLITE_POOL_MAX: Final = 12
SQLITE_CACHE_KIB: Final = 512
# A PostgreSQL connection used less than this many seconds ago goes to the intake unpinged.
PING_IDLE: Final = 1.0

METADATA = MetaData()

jobs = Table(
    "jobs",
    METADATA,
    Column("id", String(32), primary_key=True),
    Column("source", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    # When the job may be claimed next; retries move it forward.
    Column("run_at", Float, nullable=False),
    # Start of the retry window: the arrival, or the moment an operator asked for a retry.
    Column("retry_from", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    Column("file_count", Integer),  # how many files it has, read without parsing them (0004)
    Column("lease_owner", String(200)),
    Column("lease_expires", Float),
    Column("attempt_path", Text),
    Column("cart_url", Text),
    Column("download_path", Text),
    Column("host", String(255)),
    Column("result", Text),
    Column("error_kind", String(64)),
    Column("error_detail", Text),
    Column("error_retryable", Boolean),
    Column("error_context", Text),
    Column("removed_at", Float),
    # Attempts that ended with their worker dead (lease run out): a job that keeps killing
    # its workers (out of memory, a crash) must not take them all down for ever.
    Column("deaths", Integer, nullable=False, server_default="0"),
    # sha256 of the event as received (its mode aside), and how often the same (source, id)
    # arrived with another one since (0006): a sender reusing ids must not go unnoticed.
    Column("event_digest", String(64)),
    Column("conflicts", Integer, nullable=False, server_default="0"),
    Column("conflict_at", Float),
    UniqueConstraint("source", "event_id", name="uq_jobs_source_event_id"),
    Index("ix_jobs_state_run_at", "state", "run_at"),
    Index("ix_jobs_created_at", "created_at"),
    Index("ix_jobs_state_lease_expires", "state", "lease_expires"),
)

# A job's files and its event as received (0007): written once, out of ``jobs``, whose row
# every claim, renewal and end rewrites (SQLite writes a whole new record for any UPDATE:
# 17 MB each time for a job of 76,000 files). A claim reads the files, the publishing of a
# download the event. On SQLite a large one is written through SQLite's blob I/O, a piece at
# a time (see JobStore._put_large): bound as a parameter, SQLite copied the texts twice more
# (35 MB at once for the largest event). The event is the last column: reserved for the blob
# I/O, a record's last value is not materialised.
job_contents = Table(
    "job_contents",
    METADATA,
    Column("job_id", String(32), primary_key=True),
    Column("files", Text, nullable=False),  # a JSON array: each file's Cartd object and size
    Column("event", Text, nullable=False),  # the CloudEvent 1.0 JSON, its mode as "receivedmode"
)


outbox = Table(
    "outbox",
    METADATA,
    Column("id", String(32), primary_key=True),
    Column("job_id", String(32), nullable=False),
    Column("type", Text, nullable=False),
    Column("sink", Text, nullable=False),
    # The CloudEvent as a JSON object (attributes and data), sent as it is.
    Column("event", Text, nullable=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("run_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("lease_owner", String(200)),
    Column("lease_expires", Float),
    Column("last_status", Integer),
    Column("last_error", Text),
    Index("ix_outbox_state_run_at", "state", "run_at"),
)


class DeliveryState(StrEnum):
    """An outbox row: still to be sent (or retried), sent, or given up on."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


# The outbox row type of a cart deletion (events.CART_DELETE; named here, the store imports no events).
CART_DELETE_TYPE: Final = "cartd.delete"

# The subscription guard (service/subscription.py): one leased row per guarded subscription,
# holding what its guard last saw, so every replica's /health and /metrics can report it.
subscription_guard = Table(
    "subscription_guard",
    METADATA,
    Column("name", String(200), primary_key=True),
    Column("owner", String(200)),
    Column("lease_expires", Float),
    Column("state", Text, nullable=False),  # a JSON object
    Column("updated_at", Float, nullable=False),
)

# A window in which Notifications routed us nothing (the subscription disabled or deleted),
# kept until its events are replayed (``jobs import``) or an operator dismisses it. Times of
# the window are Notifications' own local clock, as ``eventget --start-date`` takes them.
subscription_gaps = Table(
    "subscription_gaps",
    METADATA,
    Column("id", String(32), primary_key=True),
    Column("subscription", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # "disabled" or "deleted"
    Column("target_url", Text, nullable=False),
    Column("disabled_at", String(40), nullable=False),
    Column("enabled_at", String(40)),
    Column("error", Text),
    Column("window_start", String(40), nullable=False),
    Column("window_end", String(40)),
    Column("state", String(16), nullable=False),
    Column("recorded_at", Float, nullable=False),
    Column("closed_at", Float),
    Column("note", Text),
    UniqueConstraint("subscription", "disabled_at", name="uq_gaps_subscription_disabled_at"),
    Index("ix_gaps_state", "state"),
)


class GapState(StrEnum):
    """A subscription gap: open until its window is replayed or an operator dismisses it."""

    OPEN = "open"
    REPLAYED = "replayed"
    DISMISSED = "dismissed"


@dataclass(frozen=True)
class Gap:
    """A window in which Notifications routed the service nothing, and what became of it."""

    id: str
    subscription: str
    kind: str
    target_url: str
    disabled_at: str
    window_start: str
    enabled_at: str | None = None
    window_end: str | None = None
    error: str | None = None
    state: GapState = GapState.OPEN
    recorded_at: float = 0.0
    closed_at: float | None = None
    note: str | None = None


@dataclass(frozen=True)
class Notice:
    """A completion event for the outbox: written in the same transaction as the job's end."""

    id: str
    type: str
    sink: str
    event: Mapping[str, Any]


@dataclass(frozen=True)
class Delivery:
    """An outbox row: one event on its way to the sink."""

    id: str
    job_id: str
    type: str
    sink: str
    event: Mapping[str, Any]
    state: DeliveryState
    attempts: int
    created_at: float
    last_status: int | None = None
    last_error: str | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for a job's record."""
        return {
            "id": self.id,
            "type": self.type,
            "sink": self.sink,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
        }


class StoreError(DownloaderError):
    """The job store could not be read or written (database down, disk full, locked)."""

    retryable = True


class SchemaError(StoreError):
    """The database's schema is not the one this version needs."""

    retryable = False


class FilesColumn:
    """A job's ``files`` column, written a file at a time.

    A JSON array of each file's Cartd object and ``size``, encoded a batch at a time: a list
    of every file's dict would cost ~400 bytes a file more, the files themselves ~300.
    """

    __slots__ = ("_batch", "_chunks", "count")

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._batch: list[dict[str, Any]] = []
        self.count = 0

    @classmethod
    def of(cls, files: Iterable[CartFile]) -> FilesColumn:
        column = cls()
        for file in files:
            column.add(file)
        return column

    def add(self, file: CartFile) -> None:
        self._batch.append({**file.as_cartd(), "size": file.size})
        self.count += 1
        if len(self._batch) == _FILES_BATCH:
            self._flush()

    def text(self) -> str:
        """The column's JSON text (made once: the pieces are joined at once)."""
        self._flush()
        pieces = ["["]
        for chunk in self._chunks:
            pieces += (chunk, ",")
        pieces[-1:] = ["]"] if self._chunks else ["[", "]"]
        return "".join(pieces)

    def _flush(self) -> None:
        if self._batch:
            self._chunks.append(dumps(self._batch)[1:-1])
            self._batch = []


_FILES_BATCH = 1000


@dataclass(frozen=True)
class NewJob:
    """What the intake knows of an event: a ``queued`` job, or a ``rejected`` one and why.

    Its event and files are given as they are, or already encoded (:class:`.StoredEvent`,
    :class:`FilesColumn`).
    """

    id: str
    source: str
    event_id: str
    type: str
    event: Mapping[str, Any] | StoredEvent
    files: Sequence[CartFile] | FilesColumn = ()
    error: JobError | None = None

    @property
    def state(self) -> str:
        return JobState.REJECTED if self.error is not None else JobState.QUEUED


class _Ticket:
    """One :meth:`JobStore.add` call waiting in a group commit, and what it is told."""

    __slots__ = ("answers", "error", "lead", "new_jobs", "ready")

    def __init__(self, new_jobs: Sequence[NewJob]) -> None:
        self.new_jobs = new_jobs
        self.ready = threading.Event()
        self.lead = False  # this caller inserts the next group
        self.answers: list[tuple[Job, bool]] | None = None  # committed
        self.error: Exception | None = None  # its own jobs failed, alone


def engine_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` use psycopg 3; everything else as given."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class JobStore:
    """Every database operation on jobs, and nothing else.

    Its sections, in this order::

        set-up                the engine for the URL, and the clock leases are measured by
        schema                upgrade (Alembic) or check it
        intake                events become rows, a batch in one transaction
        claim and lease       a worker takes a job, keeps it, and records how it ended
        reads                 jobs for the API, the page, the CLI and health
        operators             retry and delete
        retention             finished downloads past their time
        outbox                completion events and cart deletions on their way
        subscription guard    its leased row and the gaps it records
        plumbing              transactions, error translation, the SQLite file's identity
    """

    # ------------------------------------------------------------ set-up
    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] | None = None,
        db_clock: bool | None = None,
        pool_size: int = 8,
        max_overflow: int = 32,
    ) -> None:
        self.url = engine_url(url)
        self.clock = clock or time.time
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        # Leases and due times on one clock for every process: PostgreSQL's own (machines'
        # clocks drift; one running 120 s ahead took over jobs others still ran). SQLite is one
        # machine's file. A clock injected by a test stands in for it unless db_clock says so.
        self.db_clock = self.dialect == "postgresql" and (clock is None if db_clock is None else db_clock)
        # Set while this thread's intake group takes its connection (see _postgres_engine).
        self._intake = threading.local()
        if self.dialect == "sqlite":
            self.engine = _sqlite_engine(self.url, parsed.database, pool_size, max_overflow)
        elif self.dialect == "postgresql":
            self.engine = _postgres_engine(self.url, pool_size, max_overflow, self._pings)
        else:
            raise ValueError(f"the job store runs on SQLite or PostgreSQL, not {self.dialect!r}")
        self._insert = _dialect_insert(self.dialect)
        # The intake's INSERT, built once: each event's row goes in as the parameters of one
        # statement whose compiled form SQLAlchemy caches. Built per event with the values in
        # it, SQLAlchemy coerced and keyed every value anew (~0.3 ms of CPU an event).
        # Executed with every row of a group at once (SQLAlchemy's "insertmanyvalues": one
        # multi-row INSERT a page), and returning only what the rows in hand do not say: which
        # were inserted, and when they are due (the database's clock on PostgreSQL).
        returned: list[Any] = [jobs.c.id, jobs.c.run_at]
        if self.dialect == "postgresql":
            # Workers in other processes are told in the same statement, not one more round
            # trip: PostgreSQL sends one notification for a transaction's identical ones.
            returned.append(func.pg_notify(JOBS_QUEUED_CHANNEL, "").label("told"))
        add_job = (
            self._insert(jobs)
            .on_conflict_do_nothing(index_elements=["source", "event_id"])
            .returning(*returned)
        )
        self._add_job = add_job.values(run_at=self._lease_now()) if self.db_clock else add_job
        # Group commit (see add): the requests waiting to be inserted, and whether a thread
        # is inserting a group now (the leader).
        self._group_lock = threading.Lock()
        self._group: list[_Ticket] = []
        self._leading = False
        # A SQLite file removed or replaced under us: our connections would go on writing to
        # the old, unlinked file, answer 2xx, and lose it all at the next start. Its identity
        # (device, inode) is taken at the first write and checked at every one after.
        self._file = (
            parsed.database
            if self.dialect == "sqlite" and parsed.database not in (None, "", ":memory:")
            else None
        )
        self._identity: tuple[int, int] | None = None
        # Wakes a waiting sync POST when its job ends: here at once, from other processes by
        # PostgreSQL's LISTEN/NOTIFY (see .ends).
        self.ends = JobEnds(
            parsed.set(drivername="postgresql").render_as_string(hide_password=False)
            if self.dialect == "postgresql"
            else None
        )

    def _pings(self) -> bool:
        """Whether a connection used moments ago is pinged before this thread uses it again.

        Not for the intake's group: it pays a round trip per group otherwise, and a group that
        met a dead connection is inserted again (see :meth:`_lead`).
        """
        return not getattr(self._intake, "active", False)

    def close(self) -> None:
        """Stop listening for job ends and close every pooled connection."""
        self.ends.close()
        self.engine.dispose()

    def describe(self) -> str:
        """The URL without its password, for logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    def _lease_now(self) -> Any:
        """Now for leases and due times: the database's clock (an SQL expression), or ours."""
        if self.db_clock:
            return func.extract("epoch", func.clock_timestamp())
        return self.clock()

    # ------------------------------------------------------------ schema
    def upgrade(self) -> str:
        """Bring the schema to the newest revision (idempotent, safe from many processes)."""
        from alembic import command

        config = _alembic_config()
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _UPGRADE_LOCK})
            config.attributes["connection"] = conn
            command.upgrade(config, "head")
        return self.check()

    def check(self) -> str:
        """Return the schema revision, or raise :class:`SchemaError` if it is not the newest."""
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
        with self._read() as conn:
            current = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE}
            ).get_current_revision()
        if current != head:
            raise SchemaError(
                f"the job store {self.describe()} is at schema revision {current or 'none'}, this "
                f"version needs {head}: run `downloader-service db upgrade`",
                revision=current,
                head=head,
            )
        return str(head)

    # ------------------------------------------------------------ intake
    def add(self, new_jobs: Sequence[NewJob]) -> list[tuple[Job, bool]]:
        """Insert the jobs in one transaction: ``(job, created)`` for each, in order.

        An event already known (same ``source`` and ``id``) gives the existing job and
        ``created=False`` -- except a ``failed`` job whose last error was retryable, which
        is queued again: the sender's new delivery is taken as a request to retry. The jobs
        come back without their event and files (:meth:`get` has them).

        Group commit: calls from several threads at once share one transaction (one INSERT of
        all their rows, one commit, one flush to disk), each answered its own jobs once it is
        committed. The first caller with nobody inserting becomes the leader: it inserts what
        is waiting then, the others wait for its commit, and the first of those who came
        meanwhile leads the next group. If a group's transaction fails, each of its callers
        inserts its own jobs alone, as if there were no group: one request's bad row cannot
        fail another's, and each gets its own error.
        """
        ticket = _Ticket(new_jobs)
        with self._group_lock:
            self._group.append(ticket)
            ticket.lead = not self._leading
            self._leading = True
        if not ticket.lead:
            ticket.ready.wait()  # answered, told to go alone, or made the next leader
        if ticket.lead:
            self._lead(ticket)
        if ticket.answers is not None:
            return ticket.answers
        if ticket.error is not None:
            raise ticket.error
        return self._add_group([ticket.new_jobs])[0]

    def _lead(self, own: _Ticket) -> None:
        """Insert and commit every waiting caller's jobs, tell each, and pass the lead on."""
        with self._group_lock:
            group, self._group = self._group, []
        try:
            answers = self._add_group([ticket.new_jobs for ticket in group])
        except Exception as exc:  # noqa: BLE001 -- whatever it was, each caller meets it alone
            if len(group) == 1 and not _dead_connection(exc):
                own.error = exc  # alone already: this is its answer (a dead connection: once more)
            # else every caller, this one too, tries its own jobs alone (answers stay None)
        else:
            for ticket, answer in zip(group, answers, strict=True):
                ticket.answers = answer
        finally:
            with self._group_lock:
                after = self._group[0] if self._group else None
                self._leading = after is not None
            if after is not None:
                after.lead = True
                after.ready.set()
            for ticket in group:
                if ticket is not own:
                    ticket.ready.set()

    def _add_group(self, groups: Sequence[Sequence[NewJob]]) -> list[list[tuple[Job, bool]]]:
        """:meth:`add` for several callers' jobs in one transaction: their answers, in order."""
        now = self.clock()
        rows = []
        contents = []  # each row's job id, event and files: they go into tables of their own
        for new_jobs in groups:
            for new in new_jobs:
                row = _new_row(new, now)
                contents.append((row["id"], row.pop("event"), row.pop("files")))
                if self.db_clock:
                    del row["run_at"]  # the statement has it: the database's clock
                rows.append(row)
        # One statement for every row: each row with every column the others have.
        columns = {key for row in rows for key in row}
        for row in rows:
            if len(row) < len(columns):
                for key in columns.difference(row):
                    row[key] = None
        self._intake.active = True
        try:
            with self._write() as conn:
                self._intake.active = False
                return self._insert_group(conn, groups, rows, contents, now)
        finally:
            self._intake.active = False

    def _insert_group(
        self,
        conn: Connection,
        groups: Sequence[Sequence[NewJob]],
        rows: list[dict[str, Any]],
        contents: list[tuple[str, str, str]],
        now: float,
    ) -> list[list[tuple[Job, bool]]]:
        """:meth:`_add_group`'s rows into the store, in its transaction: the answers."""
        inserted: dict[str, float] = {}
        if rows:
            inserted.update((row.id, row.run_at) for row in conn.execute(self._add_job, rows))
        # On PostgreSQL the INSERT told the other processes' workers of the new jobs (see
        # __init__); on SQLite there is no channel across processes (the intake wakes its own).
        self._put_contents(conn, [each for each in contents if each[0] in inserted])
        answers = []
        at = 0
        for new_jobs in groups:
            answer = []
            for new, row in zip(new_jobs, rows[at : at + len(new_jobs)], strict=True):
                run_at = inserted.get(row["id"])
                if run_at is not None:
                    answer.append((_new_job(row, run_at), True))
                else:
                    answer.append(self._known(conn, new, row["event_digest"], now))
            answers.append(answer)
            at += len(new_jobs)
        return answers

    def _known(self, conn: Connection, new: NewJob, digest: str, now: float) -> tuple[Job, bool]:
        """An event whose (source, id) has a job already: that job, its conflict counted."""
        same = and_(jobs.c.source == new.source, jobs.c.event_id == new.event_id)
        conflicted = conn.execute(
            update(jobs)
            .where(same, jobs.c.event_digest.is_not(None), jobs.c.event_digest != digest)
            .values(conflicts=jobs.c.conflicts + 1, conflict_at=now)
        ).rowcount
        existing = replace(_job(_select_one(conn, same)), conflicted=bool(conflicted))
        if existing.state == JobState.FAILED and existing.error is not None and existing.error.retryable:
            _requeue(conn, existing.id, now)
            return _job(_select_one(conn, jobs.c.id == existing.id)), True
        return existing, False

    def _put_contents(self, conn: Connection, contents: Sequence[tuple[str, str, str]]) -> None:
        """Insert the new jobs' events and files: one statement for the group's.

        A job with a text of a MiB or more on SQLite goes in a piece at a time instead
        (:meth:`_put_large`).
        """
        small: list[dict[str, str]] = []
        for job_id, event_text, files_text in contents:
            if self.dialect == "sqlite" and max(len(event_text), len(files_text)) >= _LARGE_TEXT:
                self._put_large(conn, job_id, event_text, files_text)
            else:
                small.append({"job_id": job_id, "files": files_text, "event": event_text})
        if small:
            conn.execute(insert(job_contents), small)

    def _put_large(self, conn: Connection, job_id: str, event_text: str, files_text: str) -> None:
        """Insert a job's contents on SQLite, each text a MiB at a time.

        SQLite reserves the values (``zeroblob``; the event's, the record's last, is not
        materialised) and the texts are written into them through the blob I/O, so neither the
        sqlite3 module nor SQLite holds a copy of them whole. They read back as UTF-8 bytes
        (BLOBs), which every reader here decodes as it decodes text.
        """
        sizes = {"files": _utf8_size(files_text), "event": _utf8_size(event_text)}
        reserve = insert(job_contents).values(
            job_id=job_id, files=func.zeroblob(sizes["files"]), event=func.zeroblob(sizes["event"])
        )
        rowid: int = conn.execute(reserve.returning(literal_column("rowid"))).scalar_one()
        raw = conn.connection.dbapi_connection
        for column, value in (("files", files_text), ("event", event_text)):
            with raw.blobopen(job_contents.name, column, rowid) as blob:  # type: ignore[union-attr]
                for piece in _utf8_pieces(value):
                    blob.write(piece)

    # --------------------------------------------------- claim and lease
    def claim(self, owner: str, lease: float) -> Job | None:
        """Take a job whose worker's lease ran out, else the next job that is due.

        Two queries, each walking an index in order and stopping at its first row (an OR of
        both would scan and sort every due row: 183 ms a claim with 100,000 queued).
        """
        with self._write() as conn:
            row = self._claim_row(conn, owner, lease, self._lease_now())
        if row is None:
            return None
        # Its files, read after the claim's write transaction (the write lock is not held while
        # 76,000 of them are parsed); not its event: the worker reads that when it publishes.
        files = self.files(row.id)
        return replace(_job(row), files=files, file_count=len(files))

    def _claim_row(self, conn: Connection, owner: str, lease: float, now: Any) -> Any:
        """The row of the job :meth:`claim` takes, leased to ``owner``; None if none is due."""
        orphaned = (jobs.c.state == JobState.RUNNING, jobs.c.lease_expires < now, jobs.c.lease_expires, 1)
        due = (jobs.c.state == JobState.QUEUED, jobs.c.run_at <= now, jobs.c.run_at, 0)
        for state, ready, order, died in (orphaned, due):
            candidate = (
                select(jobs.c.id)
                .where(state, ready)
                .order_by(order)
                .limit(1)
                .with_for_update(skip_locked=True)
                .scalar_subquery()
            )
            row = conn.execute(
                update(jobs)
                .where(jobs.c.id == candidate)
                .values(
                    state=JobState.RUNNING,
                    lease_owner=owner,
                    lease_expires=now + lease,
                    attempts=jobs.c.attempts + 1,
                    deaths=jobs.c.deaths + died,
                    updated_at=self.clock(),
                )
                .returning(*jobs.c)
            ).first()
            if row is not None:
                return row
        return None

    def renew(self, job_ids: Iterable[str], owner: str, lease: float) -> set[str]:
        """Extend the leases ``owner`` holds; returns the ids it still holds."""
        ids = list(job_ids)
        if not ids:
            return set()
        now = self._lease_now()
        with self._write() as conn:
            rows = conn.execute(
                update(jobs)
                .where(jobs.c.id.in_(ids), jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING)
                .values(lease_expires=now + lease)
                .returning(jobs.c.id)
            ).all()
        return {row.id for row in rows}

    def note_attempt(self, job_id: str, owner: str, **values: str | None) -> bool:
        """Record the running attempt's ``attempt_path``, ``cart_url`` or ``download_path``.

        ``download_path`` is where the attempt is about to move its verified files.
        """
        unknown = set(values) - {"attempt_path", "cart_url", "download_path"}
        if unknown:
            raise TypeError(
                f"note_attempt takes attempt_path, cart_url, download_path, not {sorted(unknown)}"
            )
        columns: dict[str, Any] = dict(values)
        return self._update_held(job_id, owner, (), **columns)

    def finish(
        self,
        job_id: str,
        owner: str,
        download_path: str,
        host: str,
        result: Mapping[str, Any],
        notices: Sequence[Notice] = (),
    ) -> bool:
        """The attempt succeeded: the job is ``done`` (and its ``notices`` are in the outbox)."""
        now = self.clock()
        return self._update_held(
            job_id,
            owner,
            notices=notices,
            state=JobState.DONE,
            download_path=download_path,
            host=host,
            result=dumps(dict(result)),
            finished_at=now,
            attempt_path=None,
            cart_url=None,
            lease_owner=None,
            lease_expires=None,
        )

    def retry_later(
        self,
        job_id: str,
        owner: str,
        error: JobError,
        run_at: float | None = None,
        notices: Sequence[Notice] = (),
        *,
        delay: float | None = None,
    ) -> bool:
        """The attempt failed and may succeed later: back to ``queued`` until ``run_at``.

        ``delay`` (seconds from now, on the store's lease clock) instead of ``run_at``.
        """
        if (run_at is None) == (delay is None):
            raise TypeError("retry_later takes run_at or delay")
        return self._update_held(
            job_id,
            owner,
            notices=notices,
            state=JobState.QUEUED,
            run_at=run_at if delay is None else self._lease_now() + delay,
            attempt_path=None,
            cart_url=None,
            download_path=None,
            lease_owner=None,
            lease_expires=None,
            **_error_values(error),
        )

    def fail(self, job_id: str, owner: str, error: JobError, notices: Sequence[Notice] = ()) -> bool:
        """The attempt failed for good: the job is a dead letter (``failed``)."""
        return self._update_held(
            job_id,
            owner,
            notices=notices,
            state=JobState.FAILED,
            finished_at=self.clock(),
            attempt_path=None,
            cart_url=None,
            download_path=None,
            lease_owner=None,
            lease_expires=None,
            **_error_values(error),
        )

    def release(self, job_id: str, owner: str, clean: bool = True, notices: Sequence[Notice] = ()) -> bool:
        """Give a job back (shutdown): queued at once, the attempt not counted.

        With ``clean=False`` the attempt's directory and cart stay recorded, for the next
        claimer to remove (the releasing worker could not). ``notices`` (deleting the
        attempt's cart) go into the outbox with it.
        """
        leftovers = {"attempt_path": None, "cart_url": None} if clean else {}
        return self._update_held(
            job_id,
            owner,
            notices,
            due_now=True,
            state=JobState.QUEUED,
            run_at=self._lease_now(),
            attempts=jobs.c.attempts - 1,
            lease_owner=None,
            lease_expires=None,
            **leftovers,
        )

    def _update_held(
        self, job_id: str, owner: str, notices: Sequence[Notice] = (), *, due_now: bool = False, **values: Any
    ) -> bool:
        """Update a running job only while ``owner`` still holds its lease.

        ``notices`` go into the outbox in the same transaction (the transactional outbox): the
        job's end and what must follow it (its completion event, deleting its cart) are
        committed together or not at all. When the update ends the job (done or failed),
        whoever waits for it is woken: on PostgreSQL by a NOTIFY sent when, and only if, it commits.
        ``due_now``: the job is handed back, due at once; workers in other processes are told.
        """
        ends = values.get("state") in (JobState.DONE, JobState.FAILED)
        now = self.clock()
        values.setdefault("updated_at", now)
        with self._write() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state == JobState.RUNNING)
                .values(**values)
            )
            for notice in notices if result.rowcount else ():
                conn.execute(
                    outbox.insert().values(
                        id=notice.id,
                        job_id=job_id,
                        type=notice.type,
                        sink=notice.sink,
                        event=dumps(dict(notice.event)),
                        state=DeliveryState.PENDING,
                        attempts=0,
                        run_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                )
            if ends and result.rowcount and self.dialect == "postgresql":
                conn.execute(select(func.pg_notify(JOB_ENDS_CHANNEL, job_id)))
            if due_now and result.rowcount:
                _announce_queued(conn)
        if ends and result.rowcount:
            self.ends.ended([job_id])
        return bool(result.rowcount)

    # ------------------------------------------------------------- reads
    def get(self, job_id: str, contents: bool = True) -> Job | None:
        """The job with this id; with ``contents=False`` without its event and files."""
        with self._read() as conn:
            row = conn.execute(_select(contents).where(jobs.c.id == job_id)).first()
        return None if row is None else _job(row, row.files if contents else None)

    def event(self, job_id: str) -> dict[str, Any] | None:
        """The job's event as stored, its ``data`` never held.

        The data is read from the store again each time it is walked
        (a :class:`.eventdata.StoredDataList`).
        """
        with self._reading("event", job_id) as window:
            if window is None:
                return None
            if window.peek() != "{":
                value: dict[str, Any] = window.value()
                return value
            event: dict[str, Any] = {}
            for key in window.members():
                if key == "data" and window.peek() == "[":
                    length = sum(1 for _ in window.items() if _skip(window))
                    event[key] = eventdata.StoredDataList(functools.partial(self._data, job_id), length)
                else:
                    event[key] = window.value()
            window.end()
        return event

    def _data(self, job_id: str) -> Iterator[Any]:
        """The items of the job's stored event's ``data``, each decoded in its turn."""
        with self._reading("event", job_id) as window:
            if window is not None:
                yield from eventdata.data_items(window)

    def files(self, job_id: str) -> tuple[CartFile, ...]:
        """The job's files, each made as it is read (never a dict of every one, nor the text)."""
        with self._reading("files", job_id) as window:
            if window is None:
                return ()
            files = tuple(CartFile(**window.value()) for _ in window.items())
            window.end()
        return files

    @contextmanager
    def _reading(self, column: str, job_id: str) -> Iterator[JsonWindow | None]:
        """The job's stored JSON ``column`` (``event`` or ``files``), to walk (None if none).

        On SQLite read through the blob I/O a window at a time, never whole; PostgreSQL sends
        the value whole.
        """
        table = job_contents
        with self._read() as conn:
            where = table.c.job_id == job_id
            if self.dialect != "sqlite":
                value = conn.execute(select(table.c[column]).where(where)).scalar()
                yield None if value is None else JsonWindow(reader(value))
                return
            rowid = conn.execute(select(literal_column("rowid")).select_from(table).where(where)).scalar()
            if rowid is None:
                yield None
                return
            raw = conn.connection.dbapi_connection
            with raw.blobopen(table.name, column, rowid, readonly=True) as blob:  # type: ignore[union-attr]
                yield JsonWindow(blob.read)

    def get_many(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs with these ids, in the order asked (unknown ids left out), without contents."""
        with self._read() as conn:
            query = select(*_STATE_COLUMNS).where(jobs.c.id.in_(list(job_ids)))
            rows = {row.id: _job(row) for row in conn.execute(query)}
        return [rows[job_id] for job_id in job_ids if job_id in rows]

    def list_jobs(self, state: str | None = None, limit: int = 50, before: str | None = None) -> list[Job]:
        """Newest first, without their event and files; ``before`` (a job id) pages on past that job."""
        query = select(*_STATE_COLUMNS).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
        if state is not None:
            if state not in tuple(JobState):
                raise ValueError(f"state must be one of {', '.join(tuple(JobState))}, not {state!r}")
            query = query.where(jobs.c.state == state)
        with self._read() as conn:
            if before is not None:
                cursor = conn.execute(select(jobs.c.created_at, jobs.c.id).where(jobs.c.id == before)).first()
                if cursor is None:
                    raise KeyError(before)
                query = query.where(
                    or_(
                        jobs.c.created_at < cursor.created_at,
                        and_(jobs.c.created_at == cursor.created_at, jobs.c.id < cursor.id),
                    )
                )
            return [_job(row) for row in conn.execute(query)]

    def known_paths(self, paths: Sequence[str]) -> set[str]:
        """Which of ``paths`` a job names as its download or its current attempt."""
        if not paths:
            return set()
        with self._read() as conn:
            rows = conn.execute(
                select(jobs.c.download_path, jobs.c.attempt_path).where(
                    or_(jobs.c.download_path.in_(list(paths)), jobs.c.attempt_path.in_(list(paths)))
                )
            ).all()
        return {path for row in rows for path in row if path is not None}

    def stats(self) -> dict[str, Any]:
        """Jobs by state, and the age in seconds of the oldest job that is due but unclaimed."""
        now = self.clock()
        with self._read() as conn:
            counts: dict[str, int] = dict(
                conn.execute(select(jobs.c.state, func.count()).group_by(jobs.c.state)).all()
            )
            oldest = conn.execute(
                select(func.min(jobs.c.run_at)).where(jobs.c.state == JobState.QUEUED, jobs.c.run_at <= now)
            ).scalar()
        return {
            "jobs": {state: int(counts.get(state, 0)) for state in tuple(JobState)},
            "oldest_due_seconds": 0.0 if oldest is None else max(0.0, now - float(oldest)),
        }

    def queued(self) -> int:
        """How many jobs wait (due or not)."""
        with self._read() as conn:
            return int(
                conn.execute(select(func.count()).where(jobs.c.state == JobState.QUEUED)).scalar() or 0
            )

    def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers a write transaction."""
        with self._write() as conn:
            conn.execute(select(1))

    # --------------------------------------------------------- operators
    def retry(self, job_id: str) -> Job | None:
        """Queue a ``failed`` (or ``queued``) job at once, with a fresh retry window.

        Returns the job as it now stands (unchanged if it was running, done or rejected),
        without its event and files; ``None`` if there is no such job.
        """
        now = self.clock()
        with self._write() as conn:
            row = conn.execute(select(jobs.c.state).where(jobs.c.id == job_id)).first()
            if row is None:
                return None
            if row.state in (JobState.FAILED, JobState.QUEUED):
                _requeue(conn, job_id, now)
            return _job(_select_one(conn, jobs.c.id == job_id))

    def delete(self, job_id: str) -> Job | None:
        """Remove the job's record and its delivered outbox rows (the caller removes its files).

        What the outbox still owes (a cart to delete on Cartd, an event still to send) stays:
        it needs no job record, and forgetting it would leave a cart on Cartd for good.
        """
        with self._write() as conn:
            conn.execute(
                delete(outbox).where(outbox.c.job_id == job_id, outbox.c.state != DeliveryState.PENDING)
            )
            conn.execute(delete(job_contents).where(job_contents.c.job_id == job_id))
            row = conn.execute(delete(jobs).where(jobs.c.id == job_id).returning(*_STATE_COLUMNS)).first()
        return None if row is None else _job(row)

    # --------------------------------------------------------- retention
    def finished_before(self, when: float, limit: int = 100) -> list[Job]:
        """Done jobs finished before ``when`` whose download is still on disk (retention)."""
        with self._read() as conn:
            rows = conn.execute(
                select(*_STATE_COLUMNS)
                .where(jobs.c.state == JobState.DONE, jobs.c.finished_at < when, jobs.c.removed_at.is_(None))
                .order_by(jobs.c.finished_at)
                .limit(limit)
            )
            return [_job(row) for row in rows]

    def mark_removed(self, job_id: str) -> bool:
        """Record that a done job's download was removed (the record stays for duplicates)."""
        with self._write() as conn:
            result = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(removed_at=self.clock(), updated_at=self.clock())
            )
        return bool(result.rowcount)

    # ------------------------------------------------------------ outbox
    def claim_delivery(self, owner: str, lease: float, carts: bool | None = None) -> Delivery | None:
        """Take the next due outbox row to deliver (or one whose deliverer died).

        ``carts``: only cart deletions (True), only events (False), or either (None): the two
        kinds go in lanes of their own, so a hanging sink never holds up Cartd's deletions.
        """
        now = self._lease_now()
        due = or_(
            and_(
                outbox.c.state == DeliveryState.PENDING,
                outbox.c.run_at <= now,
                outbox.c.lease_owner.is_(None),
            ),
            and_(outbox.c.state == DeliveryState.PENDING, outbox.c.lease_expires < now),
        )
        if carts is not None:
            due = and_(
                due, (outbox.c.type == CART_DELETE_TYPE) if carts else (outbox.c.type != CART_DELETE_TYPE)
            )
        candidate = (
            select(outbox.c.id)
            .where(due)
            .order_by(outbox.c.run_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        with self._write() as conn:
            row = conn.execute(
                update(outbox)
                .where(outbox.c.id == candidate)
                .values(
                    lease_owner=owner,
                    lease_expires=now + lease,
                    attempts=outbox.c.attempts + 1,
                    updated_at=self.clock(),
                )
                .returning(*outbox.c)
            ).first()
        return None if row is None else _delivery(row)

    def delivered(
        self, delivery_id: str, owner: str, status: int | None, error: str | None, retry_at: float | None
    ) -> bool:
        """Record a delivery attempt and what comes of it.

        ``sent`` when ``error`` is None; else ``failed`` for good when ``retry_at`` is None,
        or pending again until ``retry_at``.
        """
        values: dict[str, Any]
        if error is None:
            state, values = DeliveryState.SENT, {}
        elif retry_at is None:
            state, values = DeliveryState.FAILED, {}
        else:
            state, values = DeliveryState.PENDING, {"run_at": retry_at}
        with self._write() as conn:
            result = conn.execute(
                update(outbox)
                .where(outbox.c.id == delivery_id, outbox.c.lease_owner == owner)
                .values(
                    state=state,
                    last_status=status,
                    last_error=error,
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=self.clock(),
                    **values,
                )
            )
        return bool(result.rowcount)

    def deliveries(self, job_id: str | None = None, state: str | None = None) -> list[Delivery]:
        """Completion events, oldest first, of one job or of every job."""
        query = select(outbox).order_by(outbox.c.created_at)
        if job_id is not None:
            query = query.where(outbox.c.job_id == job_id)
        if state is not None:
            query = query.where(outbox.c.state == state)
        with self._read() as conn:
            return [_delivery(row) for row in conn.execute(query)]

    # ------------------------------------------------ subscription guard
    def take_guard(self, name: str, owner: str, lease: float, dead: str | None = None) -> bool:
        """Take (or keep) the guard of ``name`` for ``lease`` seconds: True while ``owner`` holds it.

        ``dead`` names a holder known to be dead (an earlier process of this container), whose
        lease need not run out. One statement each way, so two replicas never both get it.
        """
        now = self._lease_now()
        holders = [
            subscription_guard.c.owner == owner,
            subscription_guard.c.owner.is_(None),
            subscription_guard.c.lease_expires < now,
        ]
        if dead is not None:
            holders.append(subscription_guard.c.owner == dead)
        with self._write() as conn:
            taken = conn.execute(
                update(subscription_guard)
                .where(subscription_guard.c.name == name, or_(*holders))
                .values(owner=owner, lease_expires=now + lease, updated_at=self.clock())
            ).rowcount
            if not taken:
                taken = conn.execute(
                    self._insert(subscription_guard)
                    .values(
                        name=name, owner=owner, lease_expires=now + lease, state="{}", updated_at=self.clock()
                    )
                    .on_conflict_do_nothing(index_elements=["name"])
                ).rowcount
        return bool(taken)

    def guard_holder(self, name: str) -> tuple[str | None, float | None]:
        """Who holds the guard of ``name`` and until when (``(None, None)`` if nobody)."""
        with self._read() as conn:
            row = conn.execute(
                select(subscription_guard.c.owner, subscription_guard.c.lease_expires).where(
                    subscription_guard.c.name == name
                )
            ).first()
        return (None, None) if row is None else (row.owner, row.lease_expires)

    def release_guard(self, name: str, owner: str) -> None:
        """Give the guard up (shutdown): another replica takes it at its next check."""
        with self._write() as conn:
            conn.execute(
                update(subscription_guard)
                .where(subscription_guard.c.name == name, subscription_guard.c.owner == owner)
                .values(owner=None, lease_expires=None, updated_at=self.clock())
            )

    def guard_state(self, name: str) -> dict[str, Any]:
        """What the guard of ``name`` last recorded (``{}`` before its first check)."""
        with self._read() as conn:
            row = conn.execute(
                select(subscription_guard.c.state).where(subscription_guard.c.name == name)
            ).first()
        return {} if row is None else dict(json.loads(row.state))

    def save_guard_state(self, name: str, state: Mapping[str, Any]) -> None:
        """Record what a check saw (the guard's lease, if any, is left as it is)."""
        now = self.clock()
        with self._write() as conn:
            saved = conn.execute(
                update(subscription_guard)
                .where(subscription_guard.c.name == name)
                .values(state=dumps(dict(state)), updated_at=now)
            ).rowcount
            if not saved:
                conn.execute(
                    self._insert(subscription_guard)
                    .values(name=name, state=dumps(dict(state)), updated_at=now)
                    .on_conflict_do_update(index_elements=["name"], set_={"state": dumps(dict(state))})
                )

    def open_gap(self, gap: Gap) -> tuple[Gap, bool]:
        """Record ``gap`` unless the same one (subscription, ``disabled_at``) is: ``(gap, created)``."""
        values = {
            **{name: getattr(gap, name) for name in _GAP_FIELDS},
            "state": GapState.OPEN,
            "recorded_at": self.clock(),
        }
        with self._write() as conn:
            row = conn.execute(
                self._insert(subscription_gaps)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["subscription", "disabled_at"])
                .returning(*subscription_gaps.c)
            ).first()
            if row is not None:
                return _gap(row), True
            row = conn.execute(
                select(subscription_gaps).where(
                    subscription_gaps.c.subscription == gap.subscription,
                    subscription_gaps.c.disabled_at == gap.disabled_at,
                )
            ).one()
        return _gap(row), False

    def gap_closed_by_enable(self, gap_id: str, enabled_at: str, window_end: str) -> None:
        """The subscription of an open gap routes again from ``enabled_at``: the window ends."""
        with self._write() as conn:
            conn.execute(
                update(subscription_gaps)
                .where(subscription_gaps.c.id == gap_id, subscription_gaps.c.enabled_at.is_(None))
                .values(enabled_at=enabled_at, window_end=window_end)
            )

    def gaps(self, state: GapState | None = GapState.OPEN) -> list[Gap]:
        """Gaps, oldest first; ``state=None`` for all of them."""
        query = select(subscription_gaps).order_by(subscription_gaps.c.recorded_at, subscription_gaps.c.id)
        if state is not None:
            query = query.where(subscription_gaps.c.state == state)
        with self._read() as conn:
            return [_gap(row) for row in conn.execute(query)]

    def close_gap(self, gap_id: str, state: GapState, note: str = "") -> Gap | None:
        """Mark an open gap ``replayed`` or ``dismissed``; the gap as it stands, None if unknown."""
        if state not in (GapState.REPLAYED, GapState.DISMISSED):
            raise ValueError(f"a gap is closed as replayed or dismissed, not {state!r}")
        with self._write() as conn:
            conn.execute(
                update(subscription_gaps)
                .where(subscription_gaps.c.id == gap_id, subscription_gaps.c.state == GapState.OPEN)
                .values(state=state, closed_at=self.clock(), note=note or None)
            )
            row = conn.execute(select(subscription_gaps).where(subscription_gaps.c.id == gap_id)).first()
        return None if row is None else _gap(row)

    # ---------------------------------------------------------- plumbing
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self._check_file()
        with self._translated(), self.engine.connect() as conn:
            conn = conn.execution_options(sqlite_immediate=True)
            with conn.begin():
                yield conn
        self._note_file()

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self._translated(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise StoreError(f"the job store {self.describe()} failed: {_short(exc)}") from exc

    def _check_file(self) -> None:
        """Raise :class:`StoreError` if the SQLite file is gone or is another file now."""
        if self._file is None or self._identity is None:
            return  # not SQLite, or not written yet (the first write makes the file)
        try:
            info = os.stat(self._file)
        except OSError as exc:
            raise StoreError(
                f"the job store file {self._file} is gone ({exc.strerror}): restart the service",
                path=self._file,
            ) from None
        if (info.st_dev, info.st_ino) != self._identity:
            raise StoreError(
                f"the job store file {self._file} was replaced while the service ran: restart the service",
                path=self._file,
            )

    def _note_file(self) -> None:
        if self._file is not None and self._identity is None:
            with contextlib.suppress(OSError):
                info = os.stat(self._file)
                self._identity = (info.st_dev, info.st_ino)


def open_store(url: str, upgrade: bool = True, **kwargs: Any) -> JobStore:
    """Open the store, creating a SQLite file's directory, and upgrade (or check) its schema."""
    store = JobStore(url, **kwargs)
    if store.dialect == "sqlite":
        database = make_url(store.url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        store.upgrade() if upgrade else store.check()
    except BaseException:
        store.close()
        raise
    return store


def _postgres_engine(url: str, pool_size: int, max_overflow: int, pings: Callable[[], bool]) -> Engine:
    """Make the PostgreSQL engine, which pings a pooled connection before use.

    The ping is a ``SELECT 1`` round trip (as SQLAlchemy's ``pool_pre_ping``); it is left out
    for a connection used less than :data:`PING_IDLE` ago when ``pings()`` says this checkout
    may go without (the intake's group, which is inserted again if the connection was dead).
    A ping that finds the connection dead has the pool open a fresh one in its place.
    """
    engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)

    @event.listens_for(engine, "connect")
    @event.listens_for(engine, "checkin")
    def _used(_dbapi_connection: Any, record: Any) -> None:
        record.info["used"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("used", 0.0) < PING_IDLE and not pings():
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            if engine.dialect.is_disconnect(exc, dbapi_connection, None):  # type: ignore[arg-type]
                raise DisconnectionError(f"a pooled connection is dead: {_short(exc)}") from exc
            raise
        if not alive:
            raise DisconnectionError("a pooled connection is dead")

    return engine


def _dead_connection(exc: BaseException) -> bool:
    """Whether ``exc`` is the store meeting a connection that had died (the pool has dropped it)."""
    cause = exc.__cause__ if isinstance(exc, StoreError) else exc
    return isinstance(cause, DBAPIError) and cause.connection_invalidated


def _sqlite_engine(url: str, database: str | None, pool_size: int, max_overflow: int) -> Engine:
    # One writer at a time (BEGIN IMMEDIATE) and cheap connections: a pool of one connection
    # per HTTP thread only held more descriptors and page caches (32 threads: +46 fds, +20 MB
    # of caches filling as the table grew). A request waits for a connection for at most
    # SQLITE_BUSY_TIMEOUT, as it would wait for the write lock.
    engine = create_engine(
        url,
        pool_size=min(pool_size, SQLITE_POOL_MAX),
        max_overflow=min(max_overflow, 4),
        pool_timeout=SQLITE_BUSY_TIMEOUT,
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the sqlite3 module, say when transactions begin (see _begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if database and database != ":memory:":
            _use_wal(cursor)
        # FULL: a commit is on disk (the WAL fsynced) before the intake answers 2xx.
        cursor.execute("PRAGMA synchronous=FULL")
        # Each connection's own page cache (2 MiB by default) fills as the table grows; the
        # kernel caches the file anyway. Bounded per connection, bounded for the pool.
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # A write transaction takes the write lock up front, so two claimers cannot both
        # read the same due job; reads stay deferred and run beside writers (WAL).
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _use_wal(cursor: Any) -> None:
    """Put the database in WAL mode (once: it sticks to the file).

    Switching needs the file to itself, and SQLite answers "database is locked" at once, without
    its busy handler, while another connection is in it: processes starting together (replicas,
    the CLI beside serve) met that now and then. Already WAL is the common case: no switch.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("version_table", VERSION_TABLE)
    return config


def _new_row(new: NewJob, now: float) -> dict[str, Any]:
    stored = new.event if isinstance(new.event, StoredEvent) else StoredEvent.of(new.event)
    row: dict[str, Any] = {
        "id": new.id,
        "source": new.source,
        "event_id": new.event_id,
        "type": new.type,
        "state": new.state,
        "attempts": 0,
        "run_at": now,
        "retry_from": now,
        "created_at": now,
        "updated_at": now,
        "event": stored.text,
        "event_digest": stored.digest,
    }
    files = new.files if isinstance(new.files, FilesColumn) else FilesColumn.of(new.files)
    row.update(files=files.text(), file_count=files.count)
    if new.error is not None:
        row.update(_error_values(new.error), finished_at=now)
    return row


def _requeue(conn: Connection, job_id: str, now: float) -> None:
    conn.execute(
        update(jobs)
        .where(jobs.c.id == job_id)
        .values(state=JobState.QUEUED, run_at=now, retry_from=now, updated_at=now, finished_at=None)
    )
    _announce_queued(conn)


def _announce_queued(conn: Connection) -> None:
    """On PostgreSQL, tell workers in other processes that a job is due now (sent at commit)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(JOBS_QUEUED_CHANNEL, "")))


def _error_values(error: JobError) -> dict[str, Any]:
    return {
        "error_kind": error.kind,
        "error_detail": error.detail,
        "error_retryable": error.retryable,
        "error_context": dumps(dict(error.context)),
    }


def _select_one(conn: Connection, where: Any) -> Any:
    return conn.execute(select(*_STATE_COLUMNS).where(where)).one()


def _select(contents: bool) -> Any:
    """A job's columns, with ``contents`` its event and files too."""
    if not contents:
        return select(*_STATE_COLUMNS)
    return select(*jobs.c, job_contents.c.event, job_contents.c.files).select_from(
        jobs.outerjoin(job_contents, job_contents.c.job_id == jobs.c.id)
    )


def _dialect_insert(dialect: str) -> Any:
    """The dialect's INSERT (with ON CONFLICT), imported for the engine in use only.

    The PostgreSQL dialect's modules (asyncpg's among them) cost a SQLite process 30 ms.
    """
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert
    from sqlalchemy.dialects import sqlite

    return sqlite.insert


def _skip(window: JsonWindow) -> bool:
    """Read the value at hand and let it go."""
    window.value()
    return True


# Texts of this many characters or more go into SQLite through its blob I/O (see JobStore._put_large).
_LARGE_TEXT: Final = 1 << 20


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else sum(map(len, _utf8_pieces(text)))


def _utf8_pieces(text: str, size: int = 1 << 20) -> Iterator[bytes]:
    """``text`` encoded as UTF-8, ``size`` characters at a time."""
    for start in range(0, len(text), size):
        yield text[start : start + size].encode("utf-8")


# Every column of a job: its state and summary (its event and files are in job_contents).
_STATE_COLUMNS = tuple(jobs.c)


def _job(row: Any, files_text: str | None = None) -> Job:
    """A job from its row; its files from ``files_text``, and its event if the row has it."""
    error = None
    if row.error_kind is not None:
        error = JobError(
            row.error_kind,
            row.error_detail or "",
            bool(row.error_retryable),
            json.loads(row.error_context or "{}"),
        )
    # Each file's dict becomes its CartFile as it is parsed, so a job of many files never
    # holds the list of dicts and the files at once. A job read without its contents (the
    # event and the files) has neither: only its state, and how many files it has; a claimed
    # one has its files but not its event.
    contents = files_text is not None
    files: tuple[CartFile, ...] = ()
    if files_text is not None:
        files = tuple(json.loads(files_text, object_hook=lambda entry: CartFile(**entry)))
    event = eventdata.loads(row.event) if "event" in row._mapping and row.event is not None else None
    return Job(
        id=row.id,
        source=row.source,
        event_id=row.event_id,
        type=row.type,
        state=JobState(row.state),
        attempts=row.attempts,
        created_at=row.created_at,
        updated_at=row.updated_at,
        run_at=row.run_at,
        retry_from=row.retry_from,
        files=files,
        file_count=len(files) if contents else row.file_count,
        event=event,
        lease_owner=row.lease_owner,
        lease_expires=row.lease_expires,
        attempt_path=row.attempt_path,
        cart_url=row.cart_url,
        download_path=row.download_path,
        host=row.host,
        result=json.loads(row.result) if row.result else None,
        error=error,
        finished_at=row.finished_at,
        removed_at=row.removed_at,
        deaths=row.deaths,
        conflicts=row.conflicts,
        conflict_at=row.conflict_at,
    )


def _new_job(row: Mapping[str, Any], run_at: float) -> Job:
    """The job just inserted, from the values it was inserted with (nothing read back)."""
    error = None
    if row.get("error_kind") is not None:
        error = JobError(
            row["error_kind"],
            row["error_detail"] or "",
            bool(row["error_retryable"]),
            json.loads(row["error_context"] or "{}"),
        )
    return Job(
        id=row["id"],
        source=row["source"],
        event_id=row["event_id"],
        type=row["type"],
        state=JobState(row["state"]),
        attempts=row["attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        run_at=run_at,
        retry_from=row["retry_from"],
        file_count=row["file_count"],
        error=error,
        finished_at=row.get("finished_at"),
    )


def _delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        job_id=row.job_id,
        type=row.type,
        sink=row.sink,
        event=json.loads(row.event),
        state=DeliveryState(row.state),
        attempts=row.attempts,
        created_at=row.created_at,
        last_status=row.last_status,
        last_error=row.last_error,
    )


_GAP_FIELDS: Final = (
    "id",
    "subscription",
    "kind",
    "target_url",
    "disabled_at",
    "enabled_at",
    "error",
    "window_start",
    "window_end",
)


def _gap(row: Any) -> Gap:
    values = {column.name: getattr(row, column.name) for column in subscription_gaps.c}
    return Gap(**{**values, "state": GapState(values["state"])})


def _short(exc: BaseException) -> str:
    """A database error's first line (SQLAlchemy appends the statement and a help link)."""
    return first_line(getattr(exc, "orig", None) or exc)


def default_owner() -> str:
    """A lease owner name: host, process and a random part (a restarted pid 1 is a new owner)."""
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(holder: str, me: str) -> bool:
    """Whether ``holder`` (a :func:`default_owner` name) is surely a process that ended.

    Only a holder on this host can be known dead: our own pid with another random part is an
    earlier life of this process (a container restarted: pid 1 again), and a pid that is gone
    is gone. A holder on another host is alive until its lease runs out.
    """
    host, _, rest = holder.partition(":")
    my_host, _, my_rest = me.partition(":")
    pid_text, _, _random = rest.partition(":")
    if host != my_host or not pid_text.isdigit() or holder == me:
        return False
    if pid_text == my_rest.partition(":")[0]:
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False
