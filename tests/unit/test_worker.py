"""The worker over a SQLite store and the fake Cartd: attempts, dead attempts, leases, retention."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from downloader_service.cartfile import CartFile
from downloader_service.service.metrics import ServiceMetrics
from downloader_service.service.settings import Settings, settings_from_env
from downloader_service.service.store import JobStore, NewJob, open_store
from downloader_service.service.worker import Worker, downloader_factory
from tests.fakecartd import FakeCartd, closed_port, sha1

DATA = b"worker test data\n" * 100


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[JobStore]:
    store = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", clock=clock)
    yield store
    store.close()


def make_settings(tmp_path: Path, cartd_url: str, **overrides: object) -> Settings:
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return settings_from_env(
        {}, cartd_url=cartd_url, download_root=str(root), state_dir=str(tmp_path), **overrides
    )


def make_worker(store: JobStore, settings: Settings, clock: Clock, owner: str = "me") -> Worker:
    return Worker(store, downloader_factory(settings), settings, ServiceMetrics(), owner=owner, clock=clock)


def add_job(store: JobStore, fake: FakeCartd, event_id: str = "ev") -> str:
    fake.add(7, DATA)
    file = CartFile("7", "dir/seven.txt", "sha1", sha1(DATA))
    [(job, _)] = store.add([NewJob(uuid.uuid4().hex, "/src", event_id, "t", {"id": event_id}, (file,))])
    return job.id


def entries(tmp_path: Path) -> list[str]:
    return sorted(path.name for path in (tmp_path / "root").iterdir())


def test_a_job_claimed_while_the_worker_stops_is_handed_back_untried(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread past its stop check when stop() began must not start a download after it."""
    job_id = add_job(store, fake_cartd)
    worker = make_worker(store, make_settings(tmp_path, fake_cartd.url), clock)
    claim = store.claim

    def claim_as_stop_begins(owner: str, lease: float):  # type: ignore[no-untyped-def]
        job = claim(owner, lease)
        worker._stopping.set()  # stop() began while this claim ran
        return job

    monkeypatch.setattr(store, "claim", claim_as_stop_begins)
    assert worker.run_once() is None
    back = store.get(job_id, contents=False)
    assert back is not None and (back.state, back.attempts, back.lease_owner) == ("queued", 0, None)
    assert entries(tmp_path) == [] and not fake_cartd.carts


def test_run_once_downloads_and_publishes_under_the_layout(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    job_id = add_job(store, fake_cartd, "ev/1")
    worker = make_worker(store, make_settings(tmp_path, fake_cartd.url), clock)
    done = worker.run_once()
    assert done is not None and done.id == job_id
    assert done.state == "done"
    assert done.download_path == str(tmp_path / "root" / f"event-ev_1-{job_id[:12]}")
    assert (Path(done.download_path) / "data/dir/seven.txt").read_bytes() == DATA
    assert json.loads((Path(done.download_path) / "notification.json").read_text()) == {"id": "ev/1"}
    metadata = json.loads((Path(done.download_path) / "metadata.json").read_text())
    assert metadata["event_id"] == "ev/1"
    assert metadata["files"] == [
        {"id": "7", "path": "dir/seven.txt", "hashtype": "sha1", "hashsum": sha1(DATA)}
    ]
    assert entries(tmp_path) == [Path(done.download_path).name]  # the attempt directory is gone
    assert done.result is not None and done.result["bytes"] == len(DATA)
    assert done.host
    assert fake_cartd.deleted == []  # the job was done before Cartd was asked to delete the cart
    delivery = worker.deliverer.deliver_once()
    assert delivery is not None and delivery.sink == done.result["cart_url"]
    assert fake_cartd.deleted == [done.result["cart_url"].rsplit("/", 1)[1]]
    assert worker.run_once() is None


def test_a_dead_attempts_directory_and_cart_are_removed_before_the_next(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    job_id = add_job(store, fake_cartd)
    settings = make_settings(tmp_path, fake_cartd.url, lease_seconds=30)
    dead = store.claim("dead", 30)
    assert dead is not None
    leftover = tmp_path / "root" / f".attempt-{job_id}-1"
    (leftover / ".data.part-x" / "data").mkdir(parents=True)
    (leftover / ".data.part-x" / "data" / "half.txt").write_bytes(b"half")
    store.note_attempt(job_id, "dead", attempt_path=str(leftover), cart_url=f"{fake_cartd.url}/deadcart")
    clock.now += 31  # the dead worker's lease runs out
    done = make_worker(store, settings, clock).run_once()
    assert done is not None and done.state == "done" and done.attempts == 2
    assert not leftover.exists()
    assert "deadcart" in fake_cartd.deleted
    assert entries(tmp_path) == [Path(str(done.download_path)).name]


def test_recover_removes_event_directories_no_job_names(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    add_job(store, fake_cartd)
    worker = make_worker(store, make_settings(tmp_path, fake_cartd.url), clock)
    done = worker.run_once()
    assert done is not None
    root = tmp_path / "root"
    (root / ".attempt-0123abcd-1" / ".data.part-y").mkdir(parents=True)
    (root / "notes").mkdir()  # not ours: never touched
    removed = worker.recover()
    assert removed == [str(root / ".attempt-0123abcd-1")]
    assert entries(tmp_path) == sorted([Path(str(done.download_path)).name, "notes"])


def test_a_lost_lease_stops_the_download_and_leaves_nothing(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    job_id = add_job(store, fake_cartd)
    fake_cartd.head = lambda cart: (202, "staging", "")  # staging for ever
    worker = make_worker(store, make_settings(tmp_path, fake_cartd.url, lease_seconds=30), clock)
    runner = threading.Thread(target=worker.run_once)
    runner.start()
    deadline = time.monotonic() + 5
    while (job := store.get(job_id)) is None or job.cart_url is None:
        assert time.monotonic() < deadline, "the attempt never recorded its cart"
        time.sleep(0.01)
    clock.now += 31
    thief = store.claim("thief", 30)
    assert thief is not None and thief.id == job_id
    worker.heartbeat()  # finds the lease gone and cancels the download
    runner.join(5)
    assert not runner.is_alive()
    assert entries(tmp_path) == []
    job = store.get(job_id)
    assert job is not None and job.lease_owner == "thief" and job.state == "running"


def test_a_failed_attempt_is_queued_again_with_backoff(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    job_id = add_job(store, fake_cartd)
    settings = make_settings(tmp_path, f"http://127.0.0.1:{closed_port()}", retry_base=10, retry_max_delay=10)
    job = make_worker(store, settings, clock).run_once()
    assert job is not None and job.id == job_id
    assert job.state == "queued"
    assert job.error is not None and job.error.kind == "cartd_unavailable" and job.error.retryable
    assert 5 <= job.run_at - clock.now <= 10
    assert entries(tmp_path) == []
    assert store.claim("other", 30) is None  # not due yet


def test_retention_removes_old_downloads_and_keeps_the_record(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    add_job(store, fake_cartd)
    worker = make_worker(store, make_settings(tmp_path, fake_cartd.url, retention=3600), clock)
    done = worker.run_once()
    assert done is not None and done.download_path is not None
    assert worker.sweep_retention() == 0
    clock.now += 3601
    assert worker.sweep_retention() == 1
    assert not Path(done.download_path).exists()
    kept = store.get(done.id)
    assert kept is not None and kept.state == "done" and kept.removed_at == clock.now
    assert worker.sweep_retention() == 0


def test_start_refuses_a_download_root_it_cannot_write(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    settings = settings_from_env(
        {}, cartd_url=fake_cartd.url, download_root=str(tmp_path / "a-file" / "root")
    )
    from downloader_service.errors import LocalStorageError

    with pytest.raises(LocalStorageError, match="cannot be written"):
        make_worker(store, settings, clock).start()


def test_a_dead_attempt_that_published_but_never_recorded_done_is_redone(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    job_id = add_job(store, fake_cartd)
    dead = store.claim("dead", 30)
    assert dead is not None
    published = tmp_path / "root" / f"event-ev-{job_id[:12]}"
    (published / "data").mkdir(parents=True)
    store.note_attempt(job_id, "dead", download_path=str(published))
    clock.now += 31
    done = make_worker(store, make_settings(tmp_path, fake_cartd.url, lease_seconds=30), clock).run_once()
    assert done is not None and done.state == "done"
    assert done.download_path == str(published)
    assert (published / "data/dir/seven.txt").read_bytes() == DATA


def test_layout_template_nests_by_transaction_fields_and_umask_sets_modes(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    fake_cartd.add(8, DATA)
    file = CartFile("8", "x/eight.txt", "sha1", sha1(DATA))
    event = {
        "id": "ev 9",
        "data": [
            {"destinationTable": "Transactions._id", "value": 67},
            {"destinationTable": "Transactions.proposal", "value": "../../etc"},
            {"destinationTable": "Transactions.instrument", "value": 54},
            {"destinationTable": "TransactionKeyValue", "key": "Tag", "value": "Namé"},
        ],
    }
    store.add([NewJob(uuid.uuid4().hex, "/src", "ev 9", "t", event, (file,))])
    settings = make_settings(
        tmp_path, fake_cartd.url, layout="{proposal}/{instrument}/{transaction}-{event_id}", umask="027"
    )
    done = make_worker(store, settings, clock).run_once()
    assert done is not None and done.download_path is not None
    assert done.download_path == str(tmp_path / "root" / "_.._etc" / "54" / "67-ev_9")
    folder = Path(done.download_path)
    assert (folder / "data/x/eight.txt").read_bytes() == DATA
    assert json.loads((folder / "metadata.json").read_text())["key_values"] == {"Tag": "Namé"}
    assert (folder / "data").stat().st_mode & 0o777 == 0o750
    assert (folder / "data/x/eight.txt").stat().st_mode & 0o777 == 0o640
    assert (folder / "notification.json").stat().st_mode & 0o777 == 0o640
    from downloader_service.service.worker import remove_download

    assert remove_download(done, settings)
    assert entries(tmp_path) == []  # the parents the layout made, emptied, went too


def test_a_download_root_removed_while_running_is_a_retryable_storage_error(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    import shutil

    job_id = add_job(store, fake_cartd)
    settings = make_settings(tmp_path, fake_cartd.url, retry_base=5, retry_max_delay=5)
    worker = make_worker(store, settings, clock)
    shutil.rmtree(tmp_path / "root")  # an operator's mistake, a lost mount
    failed = worker.run_once()
    assert failed is not None and failed.id == job_id
    assert failed.state == "queued"  # not final: the disk may come back
    assert failed.error is not None and failed.error.kind == "storage" and failed.error.retryable
    (tmp_path / "root").mkdir()
    clock.now += 6
    done = worker.run_once()
    assert done is not None and done.state == "done" and done.attempts == 2


def test_a_job_that_keeps_killing_its_workers_fails_instead_of_killing_more(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    from downloader_service.service.worker import MAX_WORKER_DEATHS

    job_id = add_job(store, fake_cartd)
    for death in range(MAX_WORKER_DEATHS):
        taken = store.claim(f"doomed-{death}", 30)  # each of these workers dies (kill -9, OOM)
        assert taken is not None and taken.deaths == death
        clock.now += 31
    last = make_worker(store, make_settings(tmp_path, fake_cartd.url), clock).run_once()
    assert last is not None and last.id == job_id
    assert last.state == "failed"
    assert last.error is not None and last.error.kind == "worker_died" and not last.error.retryable
    assert last.summary()["worker_deaths"] == MAX_WORKER_DEATHS
    assert fake_cartd.carts == {}  # it was not tried again


def test_the_cart_is_recorded_before_cartd_is_asked_so_a_death_mid_post_leaks_nothing(
    store: JobStore, fake_cartd: FakeCartd, tmp_path: Path, clock: Clock
) -> None:
    job_id = add_job(store, fake_cartd)
    in_post, release = threading.Event(), threading.Event()
    fake_cartd.before_post = lambda: (in_post.set(), release.wait(10))
    worker = make_worker(store, make_settings(tmp_path, fake_cartd.url), clock)
    runner = threading.Thread(target=worker.run_once)
    runner.start()
    try:
        assert in_post.wait(10)
        # Cartd is making the cart now; a kill -9 here must leave its URL in the job.
        job = store.get(job_id)
        assert job is not None and job.cart_url is not None
        assert job.cart_url.rsplit("/", 1)[1] == fake_cartd.requests[-1][1].lstrip("/")
    finally:
        release.set()
        runner.join(10)
    done = store.get(job_id)
    assert done is not None and done.state == "done"
