"""`downloader-service worker` as a process beside an intake-only `serve`: health, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests

from downloader_service.service.events import CART_DELETE
from downloader_service.service.store import JobStore
from tests.conftest import free_port, served
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd

SCRIPT = Path(sys.executable).with_name("downloader-service")
DATA = b"worker process\n" * 64


@contextmanager
def worker_process(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``downloader-service worker``; wait for its "working" log line; kill it after."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(SCRIPT), "worker"], env={**os.environ, **env}, stdout=out, stderr=out)
    try:
        wait_until(lambda: b'"working"' in log.read_bytes(), 20, lambda: log.read_text())
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def wait_until(check: Callable[[], bool], seconds: float, why: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, why()
        time.sleep(0.05)


def shared_env(tmp_path: Path, fake_cartd: FakeCartd, **extra: str) -> dict[str, str]:
    (tmp_path / "root").mkdir(exist_ok=True)
    return {
        "CARTD_URL": fake_cartd.url,
        "DOWNLOADER_ROOT": str(tmp_path / "root"),
        "DOWNLOADER_STATE_DIR": str(tmp_path / "state"),  # one SQLite store for both processes
        "DOWNLOADER_POLL_INTERVAL": "0.05",
        **extra,
    }


def job(url: str, job_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = requests.get(f"{url}/jobs/{job_id}", timeout=5).json()
    return answer


def test_worker_process_downloads_what_an_intake_only_replica_stored(
    tmp_path: Path, fake_cartd: FakeCartd
) -> None:
    fake_cartd.add(21, DATA)
    env = shared_env(tmp_path, fake_cartd)
    with served({**env, "DOWNLOADER_WORKERS": "0", "DOWNLOADER_ASYNC": "true"}, tmp_path / "serve.log") as (
        url,
        _proc,
    ):
        answer = requests.post(
            url, json=make_event([file_obj(21, "a.txt", "x", DATA)], event_id="w1"), timeout=10
        )
        assert answer.status_code == 202
        job_id = answer.json()["job_id"]
        time.sleep(0.5)
        assert job(url, job_id)["state"] == "queued"  # nobody downloads in an intake-only replica
        health_port = free_port()
        with worker_process({**env, "DOWNLOADER_HEALTH_PORT": str(health_port)}, tmp_path / "worker.log"):
            wait_until(lambda: job(url, job_id)["state"] == "done", 20)
            health = f"http://127.0.0.1:{health_port}"
            assert requests.get(f"{health}/health/live", timeout=5).json()["status"] == "live"
            ready = requests.get(f"{health}/health/ready", timeout=5)
            assert ready.status_code == 200, ready.text
            metrics = requests.get(f"{health}/metrics", timeout=5).text
            assert 'role="worker"' in metrics
            assert 'downloader_jobs_finished_total{state="done"} 1.0' in metrics
    downloaded = list((tmp_path / "root").glob("event-w1-*/data/x/a.txt"))
    assert [path.read_bytes() for path in downloaded] == [DATA]


def test_sigterm_hands_a_running_job_back_and_the_worker_exits(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    fake_cartd.add(22, DATA)
    fake_cartd.head = lambda cart: (202, "staging", "")  # the download never gets past staging
    env = shared_env(tmp_path, fake_cartd, DOWNLOADER_SHUTDOWN_GRACE="1")
    with served({**env, "DOWNLOADER_WORKERS": "0", "DOWNLOADER_ASYNC": "true"}, tmp_path / "serve.log") as (
        url,
        _proc,
    ):
        answer = requests.post(
            url, json=make_event([file_obj(22, "b.txt", "", DATA)], event_id="w2"), timeout=10
        )
        job_id = answer.json()["job_id"]
        with worker_process(env, tmp_path / "worker.log") as worker:
            wait_until(lambda: job(url, job_id)["state"] == "running", 20)
            # "running" is recorded by the claim, just before the attempt's directory is made
            wait_until(lambda: bool(list((tmp_path / "root").glob(".attempt-*"))), 10)
            started = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0
            assert time.monotonic() - started < 10
        back = job(url, job_id)
        assert back["state"] == "queued"
        assert back["attempts"] == 0  # handed back untried: the attempt does not count
        assert list((tmp_path / "root").iterdir()) == []
        # The abandoned cart is owed a deletion, durably (the outbox), not waited for.
        store = JobStore(f"sqlite:///{tmp_path / 'state' / 'jobs.sqlite3'}")
        try:
            owed = [d for d in store.deliveries(back["job_id"]) if d.type == CART_DELETE]
        finally:
            store.close()
        assert [d.state for d in owed] == ["pending"] and fake_cartd.deleted == []


def test_serve_with_a_root_it_cannot_write_says_so_in_one_line_and_exits(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("in the way")
    env = {
        **os.environ,
        "DOWNLOADER_ROOT": str(tmp_path / "a-file" / "root"),
        "DOWNLOADER_STATE_DIR": str(tmp_path / "state"),
        "DOWNLOADER_PORT": str(free_port()),
    }
    result = subprocess.run(
        [str(SCRIPT), "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    # That one line and nothing else: the store is not made (nor migrated, nor logged) first.
    assert result.stderr.splitlines() == [
        f"downloader-service: cannot start: the download root {tmp_path}/a-file/root cannot be written: "
        "Not a directory"
    ], result.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("variable", "value", "line"),
    [
        ("DOWNLOADER_PORT", "99999", "DOWNLOADER_PORT must be from 1 to 65535, not 99999"),
        ("DOWNLOADER_DATABASE_URL", "mysql://u:p@db/x", "not a mysql URL"),
        ("DOWNLOADER_SYNC_WAIT", "nan", "DOWNLOADER_SYNC_WAIT='nan': not a finite number"),
        (
            "DOWNLOADER_TOKEN_FILE",
            "/no/such/secret",
            "DOWNLOADER_TOKEN_FILE='/no/such/secret' cannot be read",
        ),
        ("DOWNLOADER_TOKN", "s3cret", "DOWNLOADER_TOKN is not a setting of this service"),
    ],
)
def test_serve_refuses_a_bad_setting_in_one_line_before_anything_starts(
    tmp_path: Path, variable: str, value: str, line: str
) -> None:
    env = {**os.environ, "DOWNLOADER_STATE_DIR": str(tmp_path / "state"), variable: value}
    result = subprocess.run(
        [str(SCRIPT), "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    [only] = result.stderr.splitlines()
    assert only.startswith("downloader-service: bad setting: ") and line in only, result.stderr
    assert not (tmp_path / "state").exists()


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "DOWNLOADER_STATE_DIR": str(tmp_path / "state"), "DOWNLOADER_PORT": str(port)}
        result = subprocess.run(
            [str(SCRIPT), "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"downloader-service: cannot start: cannot listen on 127.0.0.1:{port}: in use"
    )


def test_sigterm_while_only_staging_ends_at_once_with_the_default_grace(
    tmp_path: Path, fake_cartd: FakeCartd
) -> None:
    """Nothing is downloaded while Cartd stages: no reason to wait for the grace (6 s)."""
    fake_cartd.add(23, DATA)
    fake_cartd.head = lambda cart: (202, "staging", "")
    env = shared_env(tmp_path, fake_cartd)
    intake = {**env, "DOWNLOADER_WORKERS": "0", "DOWNLOADER_ASYNC": "true"}
    with served(intake, tmp_path / "serve.log") as (url, _proc):
        answer = requests.post(
            url, json=make_event([file_obj(23, "c.txt", "", DATA)], event_id="w3"), timeout=10
        )
        job_id = answer.json()["job_id"]
        with worker_process(env, tmp_path / "worker.log") as worker:
            wait_until(lambda: any(cart.heads for cart in fake_cartd.carts.values()), 20)
            started = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0
            stopped_in = time.monotonic() - started
        assert stopped_in < 2.0, f"took {stopped_in:.1f} s to stop while only staging"
        back = job(url, job_id)
        assert (back["state"], back["attempts"]) == ("queued", 0)
        assert list((tmp_path / "root").iterdir()) == []
        assert fake_cartd.deleted == []  # not waited for: its deletion is in the outbox ...
        fake_cartd.head = lambda cart: (204, "ready", "")
        with worker_process(env, tmp_path / "worker-2.log"):
            wait_until(lambda: job(url, job_id)["state"] == "done", 20)
            wait_until(lambda: len(fake_cartd.deleted) == 2, 20)  # ... which the next worker delivers
        assert len(set(fake_cartd.deleted)) == 2


def test_sigterm_gives_a_transfer_in_progress_its_grace_then_hands_it_back(
    tmp_path: Path, fake_cartd: FakeCartd
) -> None:
    big = os.urandom(1 << 20)
    fake_cartd.add(24, big)

    def trickle(cart: Any, filename: str) -> Iterator[bytes]:
        from tests.fakecartd import cart_tar

        data = cart_tar(cart.fileids, fake_cartd.contents, filename)
        for start in range(0, len(data), 4096):
            yield data[start : start + 4096]
            time.sleep(0.05)  # about 80 KB/s: still arriving when the signal comes

    fake_cartd.body = trickle
    env = shared_env(tmp_path, fake_cartd, DOWNLOADER_SHUTDOWN_GRACE="2")
    intake = {**env, "DOWNLOADER_WORKERS": "0", "DOWNLOADER_ASYNC": "true"}
    with served(intake, tmp_path / "serve.log") as (url, _proc):
        answer = requests.post(
            url, json=make_event([file_obj(24, "d.bin", "", big)], event_id="w4"), timeout=10
        )
        job_id = answer.json()["job_id"]
        with worker_process(env, tmp_path / "worker.log") as worker:
            wait_until(lambda: fake_cartd.bytes_sent > 16384, 20)
            started = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0
            stopped_in = time.monotonic() - started
        assert 1.8 <= stopped_in < 4.5, f"stopped in {stopped_in:.1f} s with a 2 s grace"
        back = job(url, job_id)
        assert (back["state"], back["attempts"]) == ("queued", 0)
        assert list((tmp_path / "root").iterdir()) == []


def test_a_store_file_replaced_under_a_running_service_stops_the_intake(
    tmp_path: Path, fake_cartd: FakeCartd
) -> None:
    """Its connections would write on into the unlinked file, answer 2xx, and lose it all."""
    fake_cartd.add(25, DATA)
    env = shared_env(tmp_path, fake_cartd, DOWNLOADER_WORKERS="0", DOWNLOADER_ASYNC="true")

    def event(event_id: str) -> dict[str, Any]:
        return make_event([file_obj(25, "e.txt", "", DATA)], event_id=event_id)

    with served(env, tmp_path / "serve.log") as (url, _proc):
        first = requests.post(
            url, json=make_event([file_obj(25, "e.txt", "", DATA)], event_id="s1"), timeout=10
        )
        assert first.status_code == 202
        database = tmp_path / "state" / "jobs.sqlite3"
        stranger = tmp_path / "other.sqlite3"
        stranger.write_bytes(database.read_bytes())
        os.replace(stranger, database)  # a restore, a careless copy: another file now
        second = requests.post(
            url, json=make_event([file_obj(25, "e.txt", "", DATA)], event_id="s2"), timeout=10
        )
        assert second.status_code == 503, second.text
        assert second.json()["error"] == "store_unavailable" and "replaced" in second.json()["detail"]
        ready = requests.get(f"{url}/health/ready", timeout=10)
        assert ready.status_code == 503 and "replaced" in ready.json()["checks"]["store"]["reason"]
        database.unlink()
        gone = requests.post(
            url, json=make_event([file_obj(25, "e.txt", "", DATA)], event_id="s3"), timeout=10
        )
        assert gone.status_code == 503 and "gone" in gone.json()["detail"]
