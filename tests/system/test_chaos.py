"""Chaos: 2 intake replicas and 3 worker processes on one PostgreSQL store, workers killed -9.

200 events are posted across both intake-only replicas from 16 threads; a fifth of them
twice, to the two different replicas at the same moment. Meanwhile worker processes are
killed with SIGKILL at seeded random moments and replaced. With short leases the jobs of a
killed worker are taken over; once every job is done, each event must have been downloaded
exactly once: one job, one directory, its files verified, no staging leftovers, and every
duplicate answered 2xx with its twin's job.

``CHAOS_SEED`` changes the seed (events, staging times, kill moments and victims).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.postgres import PostgresServer
from downloader_service.service.jobs import JobState
from downloader_service.service.store import JobStore
from tests.conftest import served, working
from tests.events import file_obj, make_event
from tests.fakecartd import Cart, FakeCartd

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("CHAOS_SEED", "1729"))
EVENTS = 200
DUPLICATE_SHARE = 0.2
CLIENT_THREADS = 16
REPLICAS = 2
WORKER_PROCESSES = 3
THREADS_PER_WORKER = 2
STAGING = (0.05, 0.2)  # seconds Cartd takes to stage one cart, drawn per cart
KILL_PAUSE = (0.5, 2.0)  # seconds between two kills
MAX_KILLS = 12
CHAOS_SECONDS = 25.0  # kills stop after this long, or after MAX_KILLS, or when all is done
SETTLE_SECONDS = 45.0  # after the chaos, every job must be done within this
SOURCE = "/pacifica/metadata/ingest"  # what make_event sends


class TimedCarts(dict[str, Cart]):
    """The fake's carts; each is staged a seeded 50-200 ms after its POST."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.lock = threading.Lock()
        self.ready_at: dict[str, float] = {}

    def __setitem__(self, uid: str, cart: Cart) -> None:
        with self.lock:
            self.ready_at[uid] = time.monotonic() + self.rng.uniform(*STAGING)
        super().__setitem__(uid, cart)

    def head(self, cart: Cart) -> tuple[int, str, str]:
        if time.monotonic() >= self.ready_at[cart.uid]:
            return 204, "ready", ""
        return 202, "staging", ""


@dataclass(frozen=True)
class Event:
    event_id: str
    body: dict[str, Any]
    files: dict[str, bytes]  # path under <download_path>/data -> content
    twice: bool


@dataclass(frozen=True)
class Answer:
    event_id: str
    replica: int
    status: int  # 0: no answer
    job_id: str | None
    duplicate: bool


def make_events(fake: FakeCartd, rng: random.Random) -> list[Event]:
    """200 events of 1-3 files of 1-6 KiB each, every file's bytes its own."""
    file_ids = iter(range(1, 10_000))
    twice = set(rng.sample(range(EVENTS), int(EVENTS * DUPLICATE_SHARE)))
    made = []
    for index in range(EVENTS):
        event_id = f"chaos-{index:03d}"
        objects, files = [], {}
        for number in range(rng.randint(1, 3)):
            file_id = next(file_ids)
            data = f"{event_id} file {number} id {file_id}\n".encode() + rng.randbytes(
                rng.randint(1024, 6144)
            )
            fake.add(file_id, data)
            subdir = f"ev{index}/{'deep/' if number == 2 else ''}part"
            objects.append(file_obj(file_id, f"f{number}.bin", subdir, data))
            files[f"{subdir}/f{number}.bin"] = data
        made.append(Event(event_id, make_event(objects, event_id=event_id), files, index in twice))
    return made


class Clients:
    """Keep-alive sessions per thread and replica; posts one event, or one to each replica at once."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.local = threading.local()
        self.sessions: list[requests.Session] = []

    def session(self, replica: int) -> requests.Session:
        mine: dict[int, requests.Session] = self.local.__dict__.setdefault("sessions", {})
        if replica not in mine:
            mine[replica] = requests.Session()
            self.sessions.append(mine[replica])
        return mine[replica]

    def close(self) -> None:
        for session in self.sessions:
            session.close()

    def post(self, event: Event, replica: int) -> Answer:
        session = self.session(replica)
        try:
            resp = session.post(self.urls[replica] + "/", json=event.body, timeout=30)
        except requests.RequestException:
            return Answer(event.event_id, replica, 0, None, False)
        body = resp.json()
        return Answer(
            event.event_id, replica, resp.status_code, body.get("job_id"), bool(body.get("duplicate"))
        )

    def send(self, index: int, event: Event) -> list[Answer]:
        first = index % REPLICAS
        if not event.twice:
            return [self.post(event, first)]
        # The twin goes to the other replica at the same moment.
        barrier = threading.Barrier(2)
        twin: list[Answer] = []

        def other() -> None:
            barrier.wait(10)
            twin.append(self.post(event, 1 - first))

        helper = threading.Thread(target=other)
        helper.start()
        barrier.wait(10)
        answer = self.post(event, first)
        helper.join(40)
        return [answer, *twin]


class Workers:
    """The worker processes: started in an ExitStack (killed by PID at its end), killed -9 here."""

    def __init__(self, stack: ExitStack, env: dict[str, str], logs: Path) -> None:
        self.stack, self.env, self.logs = stack, env, logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = 0
        self.lock = threading.Lock()

    def start(self) -> subprocess.Popen[bytes]:
        with self.lock:
            self.started += 1
            log = self.logs / f"worker-{self.started:02d}.log"
        # Started from several threads at once: ExitStack only appends (atomic) to its deque.
        proc = self.stack.enter_context(working(self.env, log))
        with self.lock:
            self.procs.append(proc)
        return proc

    def alive(self) -> list[subprocess.Popen[bytes]]:
        with self.lock:
            return [proc for proc in self.procs if proc.poll() is None]


def chaos(workers: Workers, rng: random.Random, stop: threading.Event, kills: list[float]) -> None:
    """Every 0.5-2 s kill -9 a random worker and start a replacement, until told or bounded.

    A replacement starts in a thread of its own, so the next kill may hit it while it starts
    (its recovery of the download root, its first claims).
    """
    began = time.monotonic()
    starting: list[threading.Thread] = []
    try:
        while len(kills) < MAX_KILLS and time.monotonic() - began < CHAOS_SECONDS:
            if stop.wait(rng.uniform(*KILL_PAUSE)):
                return
            alive = workers.alive()
            if not alive:
                continue
            victim = rng.choice(alive)
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            kills.append(time.monotonic() - began)
            replacement = threading.Thread(target=workers.start)
            replacement.start()
            starting.append(replacement)
    finally:
        for thread in starting:
            thread.join(30)


def all_jobs(store: JobStore) -> list[Any]:
    jobs = store.list_jobs(limit=10 * EVENTS)
    assert len(jobs) < 10 * EVENTS
    return jobs


def walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            yield Path(dirpath) / name


def test_chaos_kill_workers_while_replicas_take_duplicates(
    tmp_path: Path, postgres: PostgresServer, fake_cartd: FakeCartd
) -> None:
    began = time.monotonic()
    rng = random.Random(SEED)
    carts = TimedCarts(random.Random(rng.random()))
    fake_cartd.carts = carts
    fake_cartd.head = carts.head
    assert fake_cartd.server is not None  # a killed worker resets its connections: no tracebacks
    fake_cartd.server.handle_error = lambda _request, _address: None  # type: ignore[method-assign]
    events = make_events(fake_cartd, rng)
    root = tmp_path / "root"
    root.mkdir()
    database = postgres.create_database(f"chaos_{uuid.uuid4().hex[:10]}")
    env = {
        "DOWNLOADER_DATABASE_URL": database,
        "DOWNLOADER_ROOT": str(root),
        "CARTD_URL": fake_cartd.url,
        "DOWNLOADER_LEASE_SECONDS": "2",
        "DOWNLOADER_POLL_INTERVAL": "0.1",
        "DOWNLOADER_RETRY_BASE": "0.2",
        "DOWNLOADER_RETRY_MAX_DELAY": "1",
        "DOWNLOADER_CART_TIMEOUT": "10",
    }
    answers: list[Answer] = []
    kills: list[float] = []
    with ExitStack() as stack:
        store = JobStore(database)
        stack.callback(store.close)  # the last thing to stop
        replica_env = {
            **env,
            "DOWNLOADER_WORKERS": "0",
            "DOWNLOADER_ASYNC": "true",
            "DOWNLOADER_LOG_LEVEL": "WARNING",
        }
        workers = Workers(stack, {**env, "DOWNLOADER_WORKERS": str(THREADS_PER_WORKER)}, tmp_path)

        def replica(number: int) -> str:
            (tmp_path / f"replica-{number}").mkdir()
            log = tmp_path / f"replica-{number}" / "serve.log"
            # Entered from several threads at once: ExitStack only appends (atomic) to its deque.
            url, _proc = stack.enter_context(served(replica_env, log))
            return url

        # All five processes at once, on a database without a schema: their upgrades race.
        with ThreadPoolExecutor(REPLICAS + WORKER_PROCESSES) as pool:
            replicas = [pool.submit(replica, number) for number in range(REPLICAS)]
            first_workers = [pool.submit(workers.start) for _number in range(WORKER_PROCESSES)]
        urls = [future.result() for future in replicas]
        for future in first_workers:
            future.result()
        assert len(workers.alive()) == WORKER_PROCESSES
        started = time.monotonic()

        stop = threading.Event()
        killer = threading.Thread(target=chaos, args=(workers, random.Random(rng.random()), stop, kills))
        killer.start()
        try:
            clients = Clients(urls)
            stack.callback(clients.close)
            with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                for sent in pool.map(clients.send, range(EVENTS), events):
                    answers.extend(sent)
            posted = time.monotonic() - started
            deadline = time.monotonic() + CHAOS_SECONDS + SETTLE_SECONDS
            while killer.is_alive() and store.stats()["jobs"][JobState.DONE] < EVENTS:
                killer.join(0.2)
        finally:
            stop.set()
            killer.join(30)
        assert len(workers.alive()) == WORKER_PROCESSES
        while store.stats()["jobs"][JobState.DONE] < EVENTS and time.monotonic() < deadline:
            time.sleep(0.2)
        settled = time.monotonic() - started
        jobs = all_jobs(store)
        # The carts of finished attempts are deleted after the jobs' ends, from the outbox.
        while store.deliveries(state="pending") and time.monotonic() < deadline + 30:
            time.sleep(0.2)
    # Every process is stopped (by PID) now: the disk holds what they left.

    # Every POST answered 2xx; the twins of a duplicate got the same job, one says duplicate.
    assert len(answers) == EVENTS + sum(event.twice for event in events)
    assert [a for a in answers if not 200 <= a.status < 300] == []
    by_event: dict[str, list[Answer]] = {}
    for answer in answers:
        by_event.setdefault(answer.event_id, []).append(answer)
    for event in events:
        got = by_event[event.event_id]
        if event.twice:
            assert {a.replica for a in got} == {0, 1}
            assert got[0].job_id == got[1].job_id, got
            assert sorted(a.duplicate for a in got) == [False, True], got
        else:
            assert len(got) == 1 and not got[0].duplicate

    # Exactly one job per event (duplicates made none), each done, with the answered id.
    states: dict[str, int] = {}
    for job in jobs:
        states[job.state] = states.get(job.state, 0) + 1
    assert len(jobs) == EVENTS, states
    assert states == {JobState.DONE: EVENTS}, [
        (j.event_id, j.state, j.error) for j in jobs if j.state != JobState.DONE
    ]
    job_of = {job.event_id: job for job in jobs}
    assert sorted(job_of) == sorted(event.event_id for event in events)
    assert all(job.source == SOURCE for job in jobs)
    for event in events:
        assert {a.job_id for a in by_event[event.event_id]} == {job_of[event.event_id].id}

    # One directory per event, the one its job names; its files exactly, verified; no leftovers.
    directories = {str(path) for path in root.iterdir()}
    assert directories == {job.download_path for job in jobs}
    for event in events:
        job = job_of[event.event_id]
        data = Path(job.download_path) / "data"
        on_disk = {str(path.relative_to(data)) for path in data.rglob("*") if path.is_file()}
        assert on_disk == set(event.files), event.event_id
        for relative, content in event.files.items():
            assert (data / relative).read_bytes() == content, (event.event_id, relative)
        assert list(root.glob(f"event-{event.event_id}-*")) == [Path(job.download_path)]
    assert [path for path in walk(root) if ".part-" in path.name] == []

    # What the kills cost: attempts beyond the first were takeovers (no download failed here).
    taken_over = sum(1 for job in jobs if job.attempts > 1)
    errors = [
        (path.name, line)
        for path in tmp_path.rglob("*.log")
        for line in path.read_text(errors="replace").splitlines()
        if '"level": "ERROR"' in line or "Traceback" in line
    ]
    assert errors == []
    leaked_carts = len(set(carts) - set(fake_cartd.deleted))
    # Every cart is deleted: also the ones whose worker died mid-POST (recorded beforehand).
    assert leaked_carts == 0, sorted(set(carts) - set(fake_cartd.deleted))
    duplicates = sum(event.twice for event in events)
    print(
        f"\nchaos: events={EVENTS} duplicates_sent={duplicates} kills={len(kills)} "
        f"workers_started={workers.started} jobs_taken_over={taken_over} "
        f"attempts={sum(job.attempts for job in jobs)} carts={len(carts)} carts_left_on_cartd={leaked_carts} "
        f"lost=0 duplicated=0 posted_in={posted:.1f}s all_done_in={settled:.1f}s "
        f"seconds={time.monotonic() - began:.1f} seed={SEED}"
    )
