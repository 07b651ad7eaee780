"""A job's end wakes its waiters: in the same process at once, from another by PostgreSQL NOTIFY."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from devstack.postgres import PostgresServer
from downloader_service.cartfile import CartFile
from downloader_service.service.ends import Watch
from downloader_service.service.jobs import JobError
from downloader_service.service.store import JobStore, NewJob, open_store

FILE = CartFile("34", "a/b/foo.txt", "sha1", "f1d2d2f924e986ac86fdf7b36c94bcdf32beec15")
ERROR = JobError("cart_failed", "Cartd said no", False, {})


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.create_database(f"ends_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    return postgres.create_database(f"ends_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def store(store_url: str) -> Iterator[JobStore]:
    store = open_store(store_url)
    yield store
    store.close()


def running(store: JobStore, event_id: str = "e1") -> str:
    """A job claimed by worker ``w``: its id."""
    store.add([NewJob(uuid.uuid4().hex, "/src", event_id, "t", {"id": event_id, "data": []}, (FILE,))])
    job = store.claim("w", 60)
    assert job is not None
    return job.id


@contextmanager
def watching(store: JobStore, job_id: str) -> Iterator[Watch]:
    """A watch on ``job_id``, once the store's listener (if any) listens, with no wake pending."""
    with store.ends.watch([job_id]) as watch:
        if store.ends.conninfo is not None:
            deadline = time.monotonic() + 30
            while not store.ends.listening:  # set-up, not an assertion: connecting takes a moment
                assert time.monotonic() < deadline, "the listener never listened"
                time.sleep(0.01)
            # A listener that connected after this watch began woke it (before saying it listens).
            assert watch.wait(0) in (None, "reconnect")
        assert watch.wait(0) is None
        yield watch


def test_finish_and_fail_wake_a_waiter_in_this_process(store: JobStore) -> None:
    done, failed = running(store, "a"), running(store, "b")
    with watching(store, done) as watch:
        assert store.finish(done, "w", "/root/a", "h", {})
        # Woken before finish() returns (on PostgreSQL its own NOTIFY may have come first).
        assert watch.wait(0) is not None
        assert store.ends.woken["local"] == 1
    with watching(store, failed) as watch:
        assert store.fail(failed, "w", ERROR)
        assert watch.wait(0) is not None
        assert store.ends.woken["local"] == 2


def test_a_retry_or_a_lost_lease_wakes_nobody(store: JobStore) -> None:
    job_id = running(store)
    with watching(store, job_id) as watch:
        assert not store.finish(job_id, "someone-else", "/root/a", "h", {})
        assert store.retry_later(job_id, "w", ERROR, delay=60)
        assert watch.wait(0) is None


def test_sqlite_has_no_listener(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        with store.ends.watch(["x"]):
            assert store.ends.conninfo is None
            assert not store.ends.listening
    finally:
        store.close()


def test_a_job_ended_by_another_process_wakes_the_waiter_by_notify(pg_url: str) -> None:
    # Two stores on one database are what two processes are: neither calls the other.
    waiter, worker = open_store(pg_url), open_store(pg_url)
    try:
        job_id = running(worker)
        with watching(waiter, job_id) as watch:
            assert worker.finish(job_id, "w", "/root/a", "h", {})
            assert watch.wait(30) == "notify"
            job = waiter.get(job_id, contents=False)
            assert job is not None and job.state == "done"  # the NOTIFY came after the commit
    finally:
        waiter.close()
        worker.close()


def test_a_lost_listener_connection_wakes_every_waiter_and_listens_again(
    pg_url: str, postgres: PostgresServer
) -> None:
    store = open_store(pg_url)
    try:
        with watching(store, "a-job") as watch:
            database = pg_url.rsplit("/", 1)[1]
            ended = postgres.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE datname = '{database}' AND query LIKE 'LISTEN %'"
            )
            assert ended.strip() == "1"
            # Ends may have been missed meanwhile: the waiter is told to read the store.
            assert watch.wait(30) == "reconnect"
            deadline = time.monotonic() + 30
            while not store.ends.listening:
                assert time.monotonic() < deadline, "the listener did not listen again"
                time.sleep(0.01)
    finally:
        store.close()


def test_a_job_made_due_in_another_process_wakes_a_subscribed_worker(pg_url: str) -> None:
    """The intake's insert, an operator's retry and a shutdown's hand-back each NOTIFY; an end does not."""
    import threading

    intake, workers = open_store(pg_url), open_store(pg_url)
    woken = threading.Event()
    try:
        workers.ends.on_queued(woken.set)
        deadline = time.monotonic() + 30
        while not workers.ends.listening:  # set-up: connecting takes a moment
            assert time.monotonic() < deadline, "the listener never listened"
            time.sleep(0.01)
        woken.clear()  # (re)connecting calls it too: jobs may have come meanwhile
        job_id = running(intake)  # added (a NOTIFY), then claimed here
        assert woken.wait(30), "the intake's new job woke no worker"
        woken.clear()
        assert intake.release(job_id, "w")  # handed back at a shutdown: due now
        assert woken.wait(30), "a job handed back woke no worker"
        woken.clear()
        claimed = intake.claim("w", 60)
        assert claimed is not None and intake.fail(claimed.id, "w", ERROR)
        assert not woken.wait(1.0), "a job's end is not a job to do"
        intake.retry(claimed.id)
        assert woken.wait(30), "an operator's retry woke no worker"
    finally:
        intake.close()
        workers.close()


def test_sqlite_workers_poll_and_open_no_listener(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    try:
        store.ends.on_queued(lambda: None)
        assert store.ends.conninfo is None and not store.ends.listening
    finally:
        store.close()
