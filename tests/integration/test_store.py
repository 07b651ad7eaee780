"""The job store on SQLite and on a real PostgreSQL server: claims, leases, retries, duplicates."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from devstack.postgres import PostgresServer
from downloader_service.cartfile import CartFile
from downloader_service.errors import CartUnavailableError
from downloader_service.service.jobs import Job, JobError
from downloader_service.service.store import JobStore, NewJob, SchemaError, open_store

FILE = CartFile("34", "a/b/foo.txt", "sha1", "f1d2d2f924e986ac86fdf7b36c94bcdf32beec15")
_databases = itertools.count()


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.create_database(f"store_{next(_databases)}_{uuid.uuid4().hex[:6]}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(store_url: str, clock: Clock) -> Iterator[JobStore]:
    store = open_store(store_url, clock=clock)
    yield store
    store.close()


def new(event_id: str = "e1", source: str = "/src", error: JobError | None = None) -> NewJob:
    files = () if error else (FILE,)
    return NewJob(uuid.uuid4().hex, source, event_id, "t", {"id": event_id, "data": []}, files, error)


def test_add_commits_the_event_and_its_files(store: JobStore) -> None:
    [(job, created)] = store.add([new()])
    assert created
    again = store.get(job.id)
    assert again is not None
    assert again.state == "queued"
    assert again.files == (FILE,)
    assert again.event == {"id": "e1", "data": []}
    assert again.attempts == 0


def test_add_same_source_and_id_finds_the_first_job(store: JobStore) -> None:
    [(first, _)] = store.add([new("same")])
    [(second, created)] = store.add([new("same")])
    assert not created
    assert second.id == first.id
    [(other, created)] = store.add([new("same", source="/elsewhere")])
    assert created
    assert other.id != first.id


def test_add_batch_is_one_transaction(store: JobStore) -> None:
    answers = store.add([new("a"), new("b"), new("a")])
    assert [created for _job, created in answers] == [True, True, False]
    assert answers[2][0].id == answers[0][0].id
    assert store.stats()["jobs"]["queued"] == 2


def test_add_answers_the_job_as_the_store_holds_it(store: JobStore) -> None:
    # The answer is made from the values inserted, not read back: it must be what a read says.
    error = JobError("no_files", "no files", False, {"field": "files"})
    for made in (new("fine"), new("bad", error=error)):
        [(job, created)] = store.add([made])
        assert created
        assert job == store.get(job.id, contents=False)


def _grouped(store: JobStore, calls: list[list[NewJob]]) -> list[list[tuple[Job, bool]] | Exception]:
    """``store.add`` of each call from a thread of its own, all of them in one group commit.

    The first leader waits, before it takes the group, until every other call waits in it.
    """
    lead = store._lead
    first = threading.Event()
    groups: list[int] = []

    def held(own: Any) -> None:
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 10
            while len(store._group) < len(calls) and time.monotonic() < deadline:
                time.sleep(0.005)
        groups.append(len(store._group))
        lead(own)

    results: list[list[tuple[Job, bool]] | Exception] = [[] for _ in calls]

    def call(number: int) -> None:
        try:
            results[number] = store.add(calls[number])
        except Exception as exc:
            results[number] = exc

    with mock.patch.object(store, "_lead", side_effect=held):
        threads = [threading.Thread(target=call, args=(n,)) for n in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert groups == [len(calls)]  # one leader, one group
    return results


def test_add_from_many_threads_commits_them_as_one_group(store: JobStore) -> None:
    [(old, _)] = store.add([new("old")])
    calls = [[new("g1")], [new("g2"), new("g3")], [new("old")], [new("g1")], [new("g4")]]
    results = _grouped(store, calls)
    answers = [result for result in results if not isinstance(result, Exception)]
    assert len(answers) == len(calls)
    assert [[job.event_id for job, _created in answer] for answer in answers] == [
        [job.event_id for job in call] for call in calls
    ]
    assert [created for job, created in answers[1] + answers[4]] == [True, True, True]
    assert answers[2] == [(old, False)]
    # The same event twice in one group: one job, created by whichever came first.
    (one, one_created), (other, other_created) = answers[0][0], answers[3][0]
    assert one.id == other.id and {one_created, other_created} == {True, False}
    for answer in answers:
        for job, _created in answer:
            assert job == store.get(job.id, contents=False)
    assert store.stats()["jobs"]["queued"] == 5


def test_a_failing_group_answers_each_caller_alone(store: JobStore) -> None:
    # One caller's event that cannot be stored fails only that caller; the others are stored.
    unstorable = NewJob(uuid.uuid4().hex, "/src", "bad", "t", {"id": "bad", "data": object()}, (FILE,))
    first, bad, last = _grouped(store, [[new("a")], [unstorable], [new("b"), new("a")]])
    assert isinstance(bad, TypeError)
    assert not isinstance(first, Exception) and not isinstance(last, Exception)
    assert [job.event_id for job, _created in first + last] == ["a", "b", "a"]
    assert last[0][1] and first[0][0].id == last[1][0].id and first[0][1] != last[1][1]
    assert store.stats()["jobs"]["queued"] == 2
    assert store.get_many([job.id for job, _created in first + last])


def test_rejected_job_is_recorded_finished_and_never_claimed(store: JobStore) -> None:
    error = JobError("no_files", "no files", False, {"field": "files"})
    [(job, _)] = store.add([new("bad", error=error)])
    assert job.state == "rejected"
    assert job.error == error
    assert job.finished
    assert store.claim("w", 60) is None


def test_claim_takes_each_job_once(store: JobStore) -> None:
    store.add([new("a"), new("b")])
    first = store.claim("w1", 60)
    second = store.claim("w2", 60)
    assert first is not None and second is not None
    assert {first.event_id, second.event_id} == {"a", "b"}
    assert first.state == second.state == "running"
    assert first.attempts == 1
    assert store.claim("w3", 60) is None


def test_claim_is_safe_from_many_threads(store: JobStore) -> None:
    store.add([new(f"e{n}") for n in range(40)])
    claimed: list[str] = []
    lock = threading.Lock()

    def claim_all(owner: str) -> None:
        while (job := store.claim(owner, 60)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=claim_all, args=(f"w{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(claimed) == 40
    assert len(set(claimed)) == 40


def test_expired_lease_is_claimed_again_with_the_dead_attempts_leftovers(
    store: JobStore, clock: Clock
) -> None:
    store.add([new()])
    job = store.claim("dead", 60)
    assert job is not None
    assert store.note_attempt(job.id, "dead", attempt_path="/root/event-1", cart_url="http://cartd/1")
    clock.now += 59
    assert store.claim("other", 60) is None
    clock.now += 2
    taken = store.claim("other", 60)
    assert taken is not None
    assert taken.id == job.id
    assert taken.attempts == 2
    assert (taken.attempt_path, taken.cart_url) == ("/root/event-1", "http://cartd/1")
    # The dead worker can no longer change the job.
    assert not store.finish(job.id, "dead", "/x", "h", {})
    assert store.finish(job.id, "other", "/root/event-2", "h", {"files": 1})
    done = store.get(job.id)
    assert done is not None
    assert done.state == "done"
    assert done.attempt_path is None


def test_renew_keeps_the_lease_and_reports_lost_ones(store: JobStore, clock: Clock) -> None:
    store.add([new("a"), new("b")])
    a = store.claim("w", 60)
    b = store.claim("w", 60)
    assert a is not None and b is not None
    clock.now += 50
    assert store.renew([a.id], "w", 60) == {a.id}
    clock.now += 20  # b's lease ran out, a's did not
    taken = store.claim("thief", 60)
    assert taken is not None and taken.id == b.id
    assert store.renew([a.id, b.id], "w", 60) == {a.id}


def test_retry_later_waits_until_run_at(store: JobStore, clock: Clock) -> None:
    store.add([new()])
    job = store.claim("w", 60)
    assert job is not None
    error = JobError.of(CartUnavailableError("Cartd down", url="http://cartd"))
    assert store.retry_later(job.id, "w", error, clock.now + 30)
    queued = store.get(job.id)
    assert queued is not None
    assert queued.state == "queued"
    assert queued.error is not None and queued.error.kind == "cartd_unavailable"
    assert queued.summary()["last_error"]["error"] == "cartd_unavailable"
    assert store.claim("w", 60) is None
    assert store.stats()["oldest_due_seconds"] == 0
    clock.now += 31
    again = store.claim("w", 60)
    assert again is not None
    assert again.attempts == 2
    assert store.stats()["jobs"]["running"] == 1


def test_fail_is_a_dead_letter_that_retry_and_a_new_delivery_requeue(store: JobStore, clock: Clock) -> None:
    store.add([new("x")])
    job = store.claim("w", 60)
    assert job is not None
    assert store.fail(job.id, "w", JobError("cartd_unavailable", "down", True, {}))
    failed = store.get(job.id)
    assert failed is not None and failed.state == "failed" and failed.finished_at == clock.now
    clock.now += 100
    retried = store.retry(job.id)
    assert retried is not None
    assert retried.state == "queued"
    assert retried.retry_from == clock.now
    again = store.claim("w", 60)
    assert again is not None
    assert store.fail(again.id, "w", JobError("cartd_unavailable", "down", True, {}))
    [(redelivered, created)] = store.add([new("x")])
    assert created and redelivered.id == job.id and redelivered.state == "queued"


def test_a_non_retryable_failure_is_not_requeued_by_a_new_delivery(store: JobStore) -> None:
    store.add([new("x")])
    job = store.claim("w", 60)
    assert job is not None
    store.fail(job.id, "w", JobError("unsafe_archive", "a link", False, {}))
    [(same, created)] = store.add([new("x")])
    assert not created and same.state == "failed"


def test_release_hands_the_job_back_uncounted(store: JobStore) -> None:
    store.add([new()])
    job = store.claim("w", 60)
    assert job is not None
    store.note_attempt(job.id, "w", attempt_path="/r/e", cart_url="http://c/1")
    assert store.release(job.id, "w", clean=False)
    back = store.get(job.id)
    assert back is not None
    assert (back.state, back.attempts, back.lease_owner) == ("queued", 0, None)
    assert back.attempt_path == "/r/e"  # the next claimer removes it


def test_list_pages_newest_first_and_filters_by_state(store: JobStore, clock: Clock) -> None:
    for n in range(5):
        store.add([new(f"e{n}")])
        clock.now += 1
    page = store.list_jobs(limit=2)
    assert [job.event_id for job in page] == ["e4", "e3"]
    more = store.list_jobs(limit=2, before=page[-1].id)
    assert [job.event_id for job in more] == ["e2", "e1"]
    store.claim("w", 60)
    assert [job.event_id for job in store.list_jobs(state="running")] == ["e0"]
    with pytest.raises(ValueError, match="state must be one of"):
        store.list_jobs(state="bogus")


def test_delete_and_retention_queries(store: JobStore, clock: Clock) -> None:
    store.add([new("old"), new("new")])
    old = store.claim("w", 60)
    assert old is not None
    store.finish(old.id, "w", "/root/event-old", "h", {})
    clock.now += 1000
    assert [job.id for job in store.finished_before(clock.now - 500)] == [old.id]
    assert store.mark_removed(old.id)
    assert store.finished_before(clock.now) == []
    assert store.known_paths(["/root/event-old", "/root/other"]) == {"/root/event-old"}
    deleted = store.delete(old.id)
    assert deleted is not None and deleted.id == old.id
    assert store.get(old.id) is None
    assert store.delete(old.id) is None


def test_upgrade_is_idempotent_and_check_names_the_command(store_url: str, clock: Clock) -> None:
    first = open_store(store_url, clock=clock)
    revision = first.check()
    assert first.upgrade() == revision
    first.close()
    again = open_store(store_url, upgrade=False)
    assert again.check() == revision
    again.close()


def test_check_refuses_a_database_without_the_schema(tmp_path: Path) -> None:
    store = JobStore(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    with pytest.raises(SchemaError, match="downloader-service db upgrade"):
        store.check()
    store.close()


def test_upgrades_from_many_processes_at_once_make_one_schema(store_url: str) -> None:
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            open_store(store_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_jobs_end_and_its_completion_event_commit_together(store: JobStore, clock: Clock) -> None:
    from downloader_service.service.store import Notice

    store.add([new("a"), new("b")])
    a = store.claim("w", 60)
    b = store.claim("w", 60)
    assert a is not None and b is not None
    notice = Notice("n1", "org.pacifica.downloader.download.completed", "http://sink/", {"id": "n1"})
    assert not store.finish(a.id, "thief", "/x", "h", {}, [notice])  # not held: no job end, no event
    assert store.deliveries() == []
    assert store.finish(a.id, "w", "/x", "h", {}, [notice])
    lost = Notice("n2", "org.pacifica.downloader.download.failed", "http://sink/", {"id": "n2"})
    assert store.fail(b.id, "w", JobError("unsafe_archive", "a link", False, {}), [lost])
    assert [(d.id, d.job_id, d.state) for d in store.deliveries()] == [
        ("n1", a.id, "pending"),
        ("n2", b.id, "pending"),
    ]
    first = store.claim_delivery("d", 30)
    second = store.claim_delivery("d2", 30)
    assert first is not None and second is not None and {first.id, second.id} == {"n1", "n2"}
    assert store.claim_delivery("d3", 30) is None
    assert store.delivered(first.id, "d", 503, "down", clock.now + 10)
    assert store.delivered(second.id, "d2", 202, None, None)
    clock.now += 11
    again = store.claim_delivery("d", 30)
    assert again is not None and again.id == first.id and again.attempts == 2
    assert store.delivered(again.id, "d", 400, "refused", None)
    states = {d.id: (d.state, d.last_status) for d in store.deliveries()}
    assert states == {first.id: ("failed", 400), second.id: ("sent", 202)}
    store.delete(a.id)
    assert [d.job_id for d in store.deliveries()] == [b.id]


def test_state_reads_leave_the_event_and_files_out_but_count_the_files(store: JobStore) -> None:
    many = NewJob(uuid.uuid4().hex, "/src", "big", "t", {"id": "big", "data": [1, 2]}, (FILE,) * 3)
    [(added, created)] = store.add([many])
    assert created
    light = [
        added,
        store.get(added.id, contents=False),
        *store.get_many([added.id]),
        *store.list_jobs(),
        store.retry(added.id),
    ]
    for job in light:
        assert job is not None
        assert job.files == () and job.event is None
        assert job.file_count == 3
        assert job.summary()["file_count"] == 3
    full = store.get(added.id)
    assert full is not None
    assert full.files == (FILE,) * 3 and full.event == {"id": "big", "data": [1, 2]}
    assert full.summary() == store.get(added.id, contents=False).summary()  # type: ignore[union-attr]
    claimed = store.claim("w1", 60)
    # A claim brings the files to download; the event is read when the download is published.
    assert claimed is not None and claimed.files == (FILE,) * 3 and claimed.event is None
    assert store.event(claimed.id) == {"id": "big", "data": [1, 2]}


OLD_FILE = '{"id":"1","path":"a","hashtype":"sha1","hashsum":"x","size":1}'


@contextmanager
def at_revision(store: JobStore, revision: str) -> Iterator[Any]:
    """A connection to the store's empty database brought to ``revision``, to write old rows with."""
    from alembic import command

    from downloader_service.service.store import _alembic_config

    config = _alembic_config()
    with store._write() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
        yield conn


def test_upgrade_to_0004_counts_the_files_of_jobs_already_stored(store_url: str, clock: Clock) -> None:
    from sqlalchemy import text

    store = JobStore(store_url, clock=clock)  # an empty database, no schema yet
    try:
        with at_revision(store, "0003") as conn:
            file = OLD_FILE
            conn.execute(
                text(
                    "INSERT INTO jobs (id, source, event_id, type, state, attempts, run_at, retry_from,"
                    " created_at, updated_at, event, files) VALUES ('j1', '/s', 'e', 't', 'done', 1,"
                    " 0, 0, 0, 0, '{}', :files), ('j0', '/s', 'e0', 't', 'rejected', 0, 0, 0, 0, 0,"
                    " '{}', '[]')"
                ),
                {"files": f"[{file},{file}]"},
            )
        store.upgrade()
        old = store.get("j1", contents=False)
        assert old is not None and old.file_count == 2 and old.summary()["file_count"] == 2
        empty = store.get("j0", contents=False)
        assert empty is not None and empty.file_count == 0 and "file_count" not in empty.summary()
    finally:
        store.close()


def test_upgrade_to_0007_moves_each_jobs_event_and_files_out_of_its_row(store_url: str, clock: Clock) -> None:
    from sqlalchemy import inspect, text

    store = JobStore(store_url, clock=clock)  # an empty database, no schema yet
    try:
        with at_revision(store, "0006") as conn:
            file = OLD_FILE
            conn.execute(
                text(
                    "INSERT INTO jobs (id, source, event_id, type, state, attempts, run_at, retry_from,"
                    " created_at, updated_at, event, files, file_count) VALUES ('j1', '/s', 'e', 't',"
                    " 'queued', 0, 0, 0, 0, 0, :event, :files, 1)"
                ),
                {"event": '{"id":"e","data":[{"a":1}]}', "files": f"[{file}]"},
            )
        store.upgrade()
        with store._read() as conn:
            assert {"event", "files"}.isdisjoint(
                column["name"] for column in inspect(conn).get_columns("jobs")
            )
        full = store.get("j1")
        assert full is not None and full.event == {"id": "e", "data": [{"a": 1}]}
        assert [file.path for file in full.files] == ["a"]
        claimed = store.claim("w1", 60)
        assert claimed is not None and claimed.id == "j1" and [file.id for file in claimed.files] == ["1"]
        assert store.event("j1") == full.event
        store.delete("j1")
        assert store.event("j1") is None  # its contents went with it
    finally:
        store.close()


@pytest.mark.parametrize("skew", [120.0, -120.0])
def test_leases_on_postgresql_keep_to_the_databases_clock_whatever_a_workers_clock_says(
    postgres: PostgresServer, skew: float
) -> None:
    """A worker whose clock runs 120 s ahead must not take over a job another still runs."""
    import time

    url = postgres.create_database(f"skew_{next(_databases)}_{uuid.uuid4().hex[:6]}")
    honest = open_store(url)
    ahead = open_store(url, clock=lambda: time.time() + skew, db_clock=True)
    naive = JobStore(url, clock=lambda: time.time() + abs(skew), db_clock=False)  # the old way
    try:
        assert honest.db_clock and ahead.db_clock and not naive.db_clock
        ahead.add([new("skewed-intake")])  # due now on the database's clock, not in 120 s
        running = honest.claim("honest", 60)
        assert running is not None and running.event_id == "skewed-intake"
        assert ahead.claim("ahead", 60) is None  # the lease has 60 s left on the one clock
        assert ahead.renew([running.id], "ahead", 60) == set()
        assert honest.renew([running.id], "honest", 60) == {running.id}
        # What happened before: a clock 120 s ahead saw the lease as run out and took the job.
        assert naive.claim("naive", 60) is not None
    finally:
        for store in (honest, ahead, naive):
            store.close()


def test_a_large_event_and_its_files_go_in_and_come_back_a_piece_at_a_time(store: JobStore) -> None:
    """Over 1 MiB each: SQLite's blob I/O writes and reads them; PostgreSQL takes them whole."""
    files = tuple(
        CartFile(str(index), f"d/é-{index}.txt", "sha1", f"{index:040x}", index) for index in range(12_000)
    )
    data = [
        {"destinationTable": "Files", "_id": index, "name": f"é-{index}.txt", "n": "x" * 80}
        for index in range(12_000)
    ]
    event = {"id": "big", "source": "/src", "data": data}
    [(added, _)] = store.add([NewJob(uuid.uuid4().hex, "/src", "big", "t", event, files)])
    claimed = store.claim("w1", 60)
    assert claimed is not None and claimed.id == added.id
    assert claimed.files == files and [file.size for file in claimed.files] == list(range(12_000))
    stored = store.event(added.id)
    assert stored is not None and stored["id"] == "big" and len(stored["data"]) == 12_000
    assert stored["data"] == data  # read from the store again, an item at a time
    assert list(stored["data"]) == data  # and again
    full = store.get(added.id)
    assert full is not None and full.files == files and full.event == event


def test_the_intake_and_everything_else_survive_pooled_connections_the_server_dropped(
    postgres: PostgresServer,
) -> None:
    # The intake's group takes a connection used moments ago without pinging it first; one
    # the server has dropped fails the group, and the group is inserted again. Every other
    # use pings first (a connection found dead is replaced), as pool_pre_ping did.
    name = f"dropped_{next(_databases)}_{uuid.uuid4().hex[:6]}"
    store = open_store(postgres.create_database(name))
    try:

        def drop_our_connections() -> None:
            postgres.psql(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> pg_backend_pid()"
            )

        [(first, _)] = store.add([new("before")])
        drop_our_connections()
        [(job, created)] = store.add([new("after")])  # met the dead connection, then again
        assert created and store.get(job.id, contents=False) == job
        drop_our_connections()
        assert store.get(first.id) is not None  # a read pings, and gets a fresh connection
        assert store.claim("w", 60) is not None
    finally:
        store.close()
