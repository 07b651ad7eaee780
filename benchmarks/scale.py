"""Scale-out figures: worker throughput by workers, and intake rate on SQLite and PostgreSQL.

Run from the repository root, by hand (it is not a test)::

    .venv/bin/python benchmarks/scale.py [--events 60] [--staging 0.2] [--intake-seconds 10]
                                         [--clients 16] [--profile] [--out benchmarks/scale-results.md]

It needs ``.venv`` and a PostgreSQL server installed by ``scripts/install-postgres.sh``; it
starts its own server (``tests/postgres_server.PostgresServer``) and a Cartd stand-in
(``tests/fakecartd.FakeCartd``) whose staging takes a fixed time per cart, so that the workers,
not Cartd, are what is measured. Everything binds 127.0.0.1, lives in one temp directory and is
stopped by PID (and removed) before the script exits.

(a) Worker throughput: ``--events`` events (one 4 KiB file each) are posted as one CloudEvents
batch to an intake-only ``serve``; the clock runs from that POST to the last job's
``finished_at`` in the store. Measured with 1, 2 and 4 ``downloader-service worker``
processes of one download thread each, and with one process of 1, 2 and 4 threads.

(b) Intake: ``--clients`` threads, each with one keep-alive HTTP connection, POST distinct
valid events (CloudEvents 0.1 as Notifications sends them) to ``serve`` with
``DOWNLOADER_WORKERS=0`` and ``DOWNLOADER_ASYNC=true`` for ``--intake-seconds`` (after 5 s of
warm-up); an event counts when it is answered 202. CPU seconds of the service, of PostgreSQL
and of this client process are read from ``/proc`` over the same window, per accepted event.
``--profile`` then samples the service with py-spy during a second window of each run and
prints where its CPU goes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import code_state  # noqa: E402
from devstack.pacifica import free_port  # noqa: E402
from devstack.postgres import PostgresServer  # noqa: E402
from downloader_service.service.jobs import JobState  # noqa: E402
from downloader_service.service.store import JobStore  # noqa: E402
from tests.events import file_obj, make_event  # noqa: E402
from tests.fakecartd import Cart, FakeCartd  # noqa: E402

HOST = "127.0.0.1"
SERVICE_EXE = REPO / ".venv" / "bin" / "downloader-service"
# py-spy (the test extra): the venv's, else the first on PATH.
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
if not PY_SPY.exists() and shutil.which("py-spy"):
    PY_SPY = Path(str(shutil.which("py-spy")))
DEFAULT_OUT = REPO / "benchmarks" / "scale-results.md"
WORKER_COUNTS = (1, 2, 4)
THROUGHPUT_TARGET = 3.0  # 4 workers >= 3x one
INTAKE_TARGET = 800.0  # accepted events/s, one serve process on PostgreSQL (issue 23)
# CPU ms of serve per accepted event, one process (issue 23).
CPU_TARGETS: Final = {"SQLite": 1.0, "PostgreSQL": 1.2}
# Seconds of intake before its window: a fresh SQLite store's WAL grows to its steady size
# (~4 MB, the autocheckpoint) in the first seconds, and commits that grow the file cost more
# (1.2 against 1.0 ms of CPU an event, measured in 4 s windows from the start).
WARMUP = 5.0
QUIET_WAIT = 20.0  # seconds to wait for other load on the machine to stop before a measurement
FILE_BYTES = 4096
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BenchmarkError(RuntimeError):
    """Something did not work as it must: the benchmark stops rather than report it."""


# ----------------------------------------------------------------------------- processes
class Processes:
    """Every process this script starts, each in a session of its own, stopped by PID."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, argv: Sequence[str], env: dict[str, str], logfile: Path) -> subprocess.Popen[bytes]:
        with open(logfile, "ab") as out:
            proc = subprocess.Popen(
                list(argv), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 15) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; by PID."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc, grace=5)


def service_env(work: Path, extra: dict[str, str]) -> dict[str, str]:
    """The environment without any DOWNLOADER_* of the caller's, plus ``extra``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DOWNLOADER_")}
    # PYTHONPATH ahead of the editable install's finder, which may point at another checkout:
    # the code measured is this checkout's (or --baseline's, which sets its own).
    env.update(
        {
            "DOWNLOADER_HOST": HOST,
            "DOWNLOADER_STATE_DIR": str(work / "state"),
            "PYTHONPATH": str(REPO),
            **extra,
        }
    )
    return env


def wait_for(
    check: Callable[[], bool], seconds: float, what: str, proc: subprocess.Popen[bytes], logfile: Path
) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = logfile.read_text(errors="replace")[-3000:]
            raise BenchmarkError(f"{what} did not start (exit {proc.poll()}):\n{tail}")
        time.sleep(0.05)


def start_serve(
    procs: Processes, work: Path, env: dict[str, str], name: str
) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port(HOST)
    logfile = work / f"{name}.log"
    proc = procs.spawn(
        [str(SERVICE_EXE), "serve", "--host", HOST, "--port", str(port)], service_env(work, env), logfile
    )
    url = f"http://{HOST}:{port}"

    def up() -> bool:
        try:
            requests.get(url + "/health/live", timeout=1)
        except requests.RequestException:
            return False
        return True

    wait_for(up, 30, f"serve ({name})", proc, logfile)
    return url, proc


def start_worker(procs: Processes, work: Path, env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
    logfile = work / f"{name}.log"
    proc = procs.spawn(
        [str(SERVICE_EXE), "worker"], service_env(work, {**env, "DOWNLOADER_LOG_LEVEL": "INFO"}), logfile
    )

    def working() -> bool:
        return any(
            json.loads(line).get("message") == "working"
            for line in logfile.read_text(errors="replace").splitlines()
            if line.startswith("{")
        )

    wait_for(working, 30, f"worker ({name})", proc, logfile)
    return proc


# ------------------------------------------------------------------------------- /proc
def cpu_seconds(pid: int, reaped: bool = False) -> float:
    """User + system CPU seconds of one process (0 if it is gone), and of its ended children."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = [int(value) for value in stat[stat.rindex(b")") + 2 :].split()[11:15]]
    return sum(fields if reaped else fields[:2]) / CLK_TCK


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def wait_quiet(limit: float, threshold: float = 0.3) -> float:
    """Wait (at most ``limit`` s) for a second in which the machine uses < ``threshold`` cores.

    The machine may be shared; returns the busy cores of the last second looked at.
    """
    deadline = time.monotonic() + limit
    cores = os.cpu_count() or 1
    while True:
        busy0, total0 = machine_busy()
        time.sleep(1.0)
        busy1, total1 = machine_busy()
        load = cores * (busy1 - busy0) / max(1.0, total1 - total0)
        if load < threshold or time.monotonic() > deadline:
            if load >= threshold:
                log(f"[quiet] the machine stayed busy ({load:.2f} cores); measuring anyway")
            return load


@dataclass
class CpuWindow:
    """CPU seconds per party between :meth:`start` and :meth:`stop`."""

    parties: dict[str, Callable[[], float]]
    began: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)
    machine: tuple[float, float] = (0.0, 0.0)
    cores_busy: float = 0.0  # the whole machine's, in cores
    wall: float = 0.0

    def start(self) -> None:
        self.began = {name: read() for name, read in self.parties.items()}
        self.machine = machine_busy()
        self.wall = time.monotonic()

    def stop(self) -> None:
        self.used = {name: read() - self.began[name] for name, read in self.parties.items()}
        busy, total = machine_busy()
        self.wall = time.monotonic() - self.wall
        cores = os.cpu_count() or 1
        self.cores_busy = cores * (busy - self.machine[0]) / max(1.0, total - self.machine[1])

    @property
    def ours(self) -> float:
        """Cores used by the parties measured (the rest of ``cores_busy`` is someone else's)."""
        return sum(self.used.values()) / max(1e-9, self.wall)


def group_cpu(pid: int) -> Callable[[], float]:
    """CPU seconds of ``pid`` and its children, live or ended (PostgreSQL: the postmaster and backends)."""
    return lambda: cpu_seconds(pid, reaped=True) + sum(cpu_seconds(child) for child in children_of(pid))


def own_cpu() -> float:
    times = os.times()
    return times.user + times.system


# ---------------------------------------------------------------------------- the Cartd
class FixedStaging(dict[str, Cart]):
    """The fake's carts: each reports ``staging`` until ``seconds`` after its POST."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.ready_at: dict[str, float] = {}

    def __setitem__(self, uid: str, cart: Cart) -> None:
        self.ready_at[uid] = time.monotonic() + self.seconds
        super().__setitem__(uid, cart)

    def head(self, cart: Cart) -> tuple[int, str, str]:
        if time.monotonic() >= self.ready_at[cart.uid]:
            return 204, "ready", ""
        return 202, "staging", ""


def start_cartd(staging: float) -> FakeCartd:
    fake = FakeCartd()
    carts = FixedStaging(staging)
    fake.carts = carts
    fake.head = carts.head
    fake.start()
    assert fake.server is not None
    fake.server.handle_error = lambda _request, _address: None  # type: ignore[method-assign]
    # http.server sends headers and body in two writes: with Nagle on, every answer with a body
    # (POST, GET, DELETE) waited ~40 ms for the client's delayed ACK -- 3 x 40 ms per cart that
    # the real Cartd (cheroot sets TCP_NODELAY) does not cost.
    fake.server.RequestHandlerClass.disable_nagle_algorithm = True  # type: ignore[attr-defined]
    return fake


# ---------------------------------------------------------------------- (a) throughput
@dataclass
class ThroughputRow:
    mode: str  # "processes" or "threads"
    workers: int
    events: int
    seconds: float
    cores_busy: float  # the whole machine
    cores_ours: float  # workers, PostgreSQL, the intake and this process (the Cartd stand-in)
    worker_cpu_ms: float  # per event, the worker processes
    pg_cpu_ms: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def throughput(
    pg: PostgresServer, cartd: FakeCartd, work: Path, procs: Processes, events: int, staging: float
) -> list[ThroughputRow]:
    database = pg.create_database("scale_workers")
    root = work / "root-workers"
    root.mkdir()
    env = {
        "DOWNLOADER_DATABASE_URL": database,
        "DOWNLOADER_ROOT": str(root),
        "CARTD_URL": cartd.url,
        "DOWNLOADER_POLL_INTERVAL": "0.05",
        "DOWNLOADER_CART_TIMEOUT": "30",
        "DOWNLOADER_LOG_LEVEL": "WARNING",
    }
    url, intake = start_serve(
        procs, work, {**env, "DOWNLOADER_WORKERS": "0", "DOWNLOADER_ASYNC": "true"}, "intake-a"
    )
    store = JobStore(database)
    rows = []
    file_ids = iter(range(1, 1_000_000))
    try:
        for mode in ("processes", "threads"):
            for count in WORKER_COUNTS:
                if mode == "threads" and count == 1:  # the same thing as one process of one thread
                    rows.append(dataclasses.replace(rows[0], mode="threads"))
                    continue
                name = f"{mode}-{count}"
                if mode == "processes":
                    workers = [
                        start_worker(procs, work, {**env, "DOWNLOADER_WORKERS": "1"}, f"worker-{name}-{n}")
                        for n in range(count)
                    ]
                else:
                    workers = [
                        start_worker(procs, work, {**env, "DOWNLOADER_WORKERS": str(count)}, f"worker-{name}")
                    ]
                try:
                    rows.append(
                        run_batch(url, store, cartd, intake.pid, workers, pg, mode, count, events, file_ids)
                    )
                except BenchmarkError as exc:
                    tails = [
                        f"--- {path.name}\n" + path.read_text(errors="replace")[-2000:]
                        for path in sorted(work.glob(f"worker-{name}*.log"))
                    ]
                    raise BenchmarkError("\n".join([str(exc), *tails])) from None
                finally:
                    for proc in workers:
                        procs.stop(proc)
                row = rows[-1]
                log(
                    f"[workers] {mode:9s} x{count}: {row.events} events in {row.seconds:.2f} s = "
                    f"{row.rate:.2f}/s (cores busy {row.cores_busy:.2f}, ours {row.cores_ours:.2f})"
                )
    finally:
        store.close()
        procs.stop(intake)
    return rows


def run_batch(
    url: str,
    store: JobStore,
    cartd: FakeCartd,
    intake_pid: int,
    workers: list[subprocess.Popen[bytes]],
    pg: PostgresServer,
    mode: str,
    count: int,
    events: int,
    file_ids: Iterator[int],
) -> ThroughputRow:
    batch, expected = [], {}
    for index in range(events):
        file_id = next(file_ids)
        data = (f"{mode}-{count}-{index}\n".encode() * FILE_BYTES)[:FILE_BYTES]
        cartd.add(file_id, data)
        event_id = f"tp-{mode}-{count}-{index}"
        batch.append(make_event([file_obj(file_id, "f.bin", "d", data)], version="1.0", event_id=event_id))
        expected[event_id] = data
    cpu = CpuWindow(
        {
            "workers": lambda: sum(cpu_seconds(p.pid) for p in workers),
            "pg": group_cpu(pg.pid or 0),
            "intake": lambda: cpu_seconds(intake_pid),
            "bench": own_cpu,
        }
    )
    wait_quiet(QUIET_WAIT)
    cpu.start()
    began = time.time()
    resp = requests.post(
        url + "/",
        data=json.dumps(batch),
        headers={"Content-Type": "application/cloudevents-batch+json"},
        timeout=60,
    )
    if resp.status_code != 202:
        raise BenchmarkError(f"the batch was answered {resp.status_code}: {resp.text[:500]}")
    job_ids = [answer["job_id"] for answer in resp.json()["events"]]
    deadline = time.monotonic() + 30 + events
    while True:
        jobs = store.get_many(job_ids)
        if all(job.state == JobState.DONE for job in jobs):
            break
        bad = [job for job in jobs if job.state not in ("queued", "running", JobState.DONE)]
        if bad or time.monotonic() > deadline:
            raise BenchmarkError(f"jobs did not finish: {Counter(job.state for job in jobs)}")
        time.sleep(0.05)  # the end is the last job's finished_at, not when this loop sees it
    cpu.stop()
    seconds = max(job.finished_at or 0.0 for job in jobs) - began
    for job in jobs:  # the work was done, and right
        if (Path(job.download_path or "") / "data" / "d" / "f.bin").read_bytes() != expected[job.event_id]:
            raise BenchmarkError(f"{job.event_id}: wrong or missing download")
    return ThroughputRow(
        mode,
        count,
        events,
        seconds,
        cpu.cores_busy,
        cpu.ours,
        1000 * cpu.used["workers"] / events,
        1000 * cpu.used["pg"] / events,
    )


# -------------------------------------------------------------------------- (b) intake
@dataclass
class IntakeRow:
    store: str
    clients: int
    seconds: float
    accepted: int
    other: Counter[int]
    latencies: list[float]
    cpu: dict[str, float]  # CPU seconds per party over the window
    cores_busy: float
    cores_ours: float
    profile: Profile | None = None
    pg_sessions: int | None = None  # PostgreSQL sessions opened during the window

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds

    def per_event_ms(self, party: str) -> float:
        return 1000 * self.cpu.get(party, 0.0) / max(1, self.accepted)


# What the intake clients send: a 1.0 structured event of three files (what most senders
# send), or Notifications' 0.1 event as application/json (one file).
EVENT_KINDS: Final = {
    "structured": "application/cloudevents+json",
    "notifications": "application/json",
}


class Hammer:
    """``clients`` threads POSTing distinct valid events over keep-alive connections."""

    def __init__(self, urls: list[str], clients: int, tag: str, event: str = "structured") -> None:
        self.ports = [int(url.rsplit(":", 1)[1]) for url in urls]  # client n talks to ports[n % len]
        self.clients = clients
        self.tag = tag
        self.results: list[list[tuple[float, int, float]]] = [[] for _ in range(clients)]
        self.stop = threading.Event()
        self.content_type = EVENT_KINDS[event]
        if event == "structured":
            files = [file_obj(7 + n, f"f{n}.bin", "d", b"x" * (100 + n)) for n in range(3)]
            template = make_event(files, version="1.0", event_id="@ID@")
        else:
            template = make_event([file_obj(7, "f.bin", "d", b"x" * 100)], event_id="@ID@")
        self.template = json.dumps(template).split("@ID@")

    def run(self, number: int) -> None:
        out = self.results[number]
        port = self.ports[number % len(self.ports)]
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        headers = {"Content-Type": self.content_type}
        sent = 0
        while not self.stop.is_set():
            sent += 1
            body = f"{self.tag}-{number}-{sent}".join(self.template).encode()
            began = time.monotonic()
            try:
                conn.request("POST", "/", body, headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
                status = 0
            out.append((time.monotonic(), status, time.monotonic() - began))
        conn.close()

    def window(self, start: float, end: float) -> tuple[int, Counter[int], list[float]]:
        inside = [r for results in self.results for r in results if start <= r[0] < end]
        statuses = Counter(status for _t, status, _l in inside)
        accepted = statuses.pop(202, 0)
        return accepted, statuses, [latency for _t, status, latency in inside if status == 202]


@dataclass
class IntakeSetup:
    cartd: FakeCartd
    work: Path
    procs: Processes
    seconds: float
    clients: int
    profile: bool
    event: str = "structured"


def intake(
    setup: IntakeSetup,
    kind: str,
    database: str | None,
    pg: PostgresServer | None,
    replicas: int = 1,
    code: Path | None = None,
) -> IntakeRow:
    """``replicas`` intake-only ``serve`` processes on one store; the clients spread over them.

    ``code``: run ``serve`` from the package in that directory (``--baseline``), not this checkout.
    """
    work = setup.work
    label = "".join(char if char.isalnum() else "-" for char in kind)
    env = {
        "CARTD_URL": setup.cartd.url,
        "DOWNLOADER_ROOT": str(work / f"root-intake-{label}"),
        "DOWNLOADER_STATE_DIR": str(work / f"state-intake-{label}"),
        "DOWNLOADER_WORKERS": "0",
        "DOWNLOADER_ASYNC": "true",
    }
    if database:
        env["DOWNLOADER_DATABASE_URL"] = database
    if code is not None:
        env["PYTHONPATH"] = str(code)
    started = [start_serve(setup.procs, work, env, f"intake-{label}-{n}") for n in range(replicas)]
    pids = [proc.pid for _url, proc in started]
    parties: dict[str, Callable[[], float]] = {
        "service": lambda: sum(cpu_seconds(pid) for pid in pids),
        "client": own_cpu,
    }
    if pg is not None and pg.pid is not None:
        parties["postgres"] = group_cpu(pg.pid)
    hammer = Hammer([url for url, _proc in started], setup.clients, kind, setup.event)
    threads = [threading.Thread(target=hammer.run, args=(n,), daemon=True) for n in range(setup.clients)]
    cpu = CpuWindow(parties)
    samples: Profile | None = None

    def sessions() -> int | None:
        if pg is None or database is None:
            return None
        name = database.rsplit("/", 1)[1]
        return int(pg.psql(f"SELECT sessions FROM pg_stat_database WHERE datname = '{name}'").strip())

    try:
        wait_quiet(QUIET_WAIT)
        for thread in threads:
            thread.start()
        time.sleep(WARMUP)
        start = time.monotonic()
        opened = sessions()
        cpu.start()
        time.sleep(setup.seconds)
        cpu.stop()
        end = time.monotonic()
        time.sleep(1.0)  # PostgreSQL publishes its counters about once a second
        closed = sessions()
        if setup.profile and replicas == 1:
            samples = py_spy(pids[0], work / f"profile-{kind}.txt", min(setup.seconds, 8.0), hammer)
    finally:
        hammer.stop.set()
        for thread in threads:
            thread.join(30)
        for _url, proc in started:
            setup.procs.stop(proc)
    accepted, other, latencies = hammer.window(start, end)
    name = kind if replicas == 1 else f"{kind}, {replicas} replicas"
    row = IntakeRow(
        name,
        setup.clients,
        end - start,
        accepted,
        other,
        latencies,
        cpu.used,
        cpu.cores_busy,
        cpu.ours,
        samples,
    )
    if opened is not None and closed is not None:
        row.pg_sessions = closed - opened
    log(
        f"[intake] {name}: {row.rate:.0f} accepted/s ({accepted} in {row.seconds:.1f} s, "
        f"others {dict(other)}), "
        "CPU ms/event "
        + ", ".join(f"{p} {row.per_event_ms(p):.2f}" for p in parties)
        + f", cores busy {row.cores_busy:.2f} (ours {row.cores_ours:.2f})"
        + (f", {row.pg_sessions} PostgreSQL sessions opened" if row.pg_sessions is not None else "")
    )
    return row


# ----------------------------------------------------------------------------- py-spy
PROFILE_RATE = 250  # samples per second
# Phases of one request, by frame markers; a sample goes to the deepest phase in its stack.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cheroot: connections, socket reads and writes", ("WorkerThread.run ", "HTTPConnection.communicate ")),
    (
        "cheroot: read + parse the request line and headers",
        ("HTTPRequest.parse_request ", "HTTPRequest.read_request_headers ", "HTTPRequest.read_request_line "),
    ),
    ("CherryPy: WSGI, dispatch, tools, response headers", ("CPWSGIApp.__call__ ",)),
    (
        "POST / past CherryPy: request headers, answer, access line (app.Application)",
        ("Application.__call__ (downloader_service", "Application._post "),
    ),
    ("handler: body, status, JSON answer (app.py)", ("json_handler.<locals>.handler ",)),
    ("webhook: parse + validate the event (webhook.py)", ("service/webhook.py",)),
    ("the job from the event: file list, ids (Intake.new_job)", ("Intake.new_job ",)),
    ("store.add: build + run INSERT ... ON CONFLICT RETURNING, commit", ("JobStore.add ",)),
    (
        "store: pool checkout: pre-ping (a SELECT 1 round trip), or a new connection",
        ("_ConnectionFairy._checkout ",),
    ),
    ("store.add: SELECT of the row just inserted (_select_one)", ("_select_one ",)),
    (
        "store: the answer's Job (from the row inserted, or read back)",
        ("_job (downloader_service/service/store.py", "_new_job ("),
    ),
    ("answer: job summary + status URL (Service.answer)", ("Service.answer ",)),
    ("logging: JSON lines (the access line, with the job), redaction", ("Logger.", "LogManager.")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
)


@dataclass
class Profile:
    gil_seconds: float  # seconds some thread of the process held the GIL (sampled)
    seconds: float
    events: int  # accepted while sampling
    cpu_user: float
    cpu_system: float
    phases: list[tuple[str, float]]  # share of GIL samples


def py_spy(pid: int, out: Path, seconds: float, hammer: Hammer) -> Profile | None:
    """Sample the thread holding the GIL in ``pid`` for ``seconds``; attribute samples to phases."""
    if not PY_SPY.exists():
        log(f"[profile] no {PY_SPY}")
        return None
    argv = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(int(seconds))]
    argv += ["--rate", str(PROFILE_RATE), "--format", "raw", "--output", str(out), "--nonblocking", "--gil"]
    user0, system0 = cpu_split(pid)
    began = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    ended = time.monotonic()
    user1, system1 = cpu_split(pid)
    if result.returncode != 0 or not out.exists():
        log(f"[profile] py-spy failed: {result.stderr.strip()[-300:]}")
        return None
    counts: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        total += int(number)
        phase = "other"
        for frame in stack.split(";"):
            for name, markers in PHASES:
                if any(marker in frame for marker in markers):
                    phase = name
        counts[phase] += int(number)
    return Profile(
        gil_seconds=total / PROFILE_RATE,
        seconds=ended - began,
        events=hammer.window(began, ended)[0],
        cpu_user=user1 - user0,
        cpu_system=system1 - system0,
        phases=[(name, count / max(1, total)) for name, count in counts.most_common()],
    )


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rindex(b")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


# ----------------------------------------------------------------------------- report
def sessions_text(row: IntakeRow) -> str:
    if row.pg_sessions is None:
        return "—"
    return f"{row.pg_sessions} ({row.pg_sessions / row.seconds:.0f}/s)"


def throughput_lines(rows: list[ThroughputRow], args: argparse.Namespace) -> list[str]:
    lines = [
        f"### (a) Worker throughput: {args.events} events of one {FILE_BYTES // 1024} KiB file, "
        "Cartd staging "
        f"{args.staging * 1000:.0f} ms per cart, PostgreSQL job store",
        "",
        f"| workers | as | events/s | ratio to 1 | seconds | cores busy of {os.cpu_count()}: all / ours "
        "| worker CPU ms/event | PostgreSQL CPU ms/event |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("processes", "threads"):
        base = next(row for row in rows if row.mode == mode and row.workers == 1)
        for row in (r for r in rows if r.mode == mode):
            how = (
                f"{row.workers} process(es) x 1 thread"
                if mode == "processes"
                else f"1 process x {row.workers} thread(s)"
            )
            lines.append(
                f"| {row.workers} | {how} | {row.rate:.2f} | {row.rate / base.rate:.2f}x | {row.seconds:.2f} "
                f"| {row.cores_busy:.2f} / {row.cores_ours:.2f} "
                f"| {row.worker_cpu_ms:.1f} | {row.pg_cpu_ms:.1f} |"
            )
    lines += [
        "",
        f"One download thread cannot beat 1/staging = {1 / args.staging:.1f} events/s "
        "(the 1-thread row of `threads` is the 1-process row). "
        f"Target: 4 workers >= {THROUGHPUT_TARGET:g}x one.",
        "",
    ]
    return lines


def render(
    rows: list[ThroughputRow], intakes: list[IntakeRow], args: argparse.Namespace, elapsed: float
) -> str:
    lines = [] if not rows else throughput_lines(rows, args)
    lines += [
        f"### (b) Intake: {args.clients} keep-alive clients POSTing distinct "
        f"valid events ({args.event}: {EVENT_KINDS[args.event]}), `DOWNLOADER_ASYNC=true`, "
        "`DOWNLOADER_WORKERS=0`, default log level (INFO)",
        "",
        "| store | accepted events/s | in (s) | other answers | latency p50 / p99 (ms) "
        "| cores busy: all / ours "
        "| CPU ms/event: service | PostgreSQL | client | PostgreSQL sessions opened |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in intakes:
        lat = sorted(row.latencies) or [0.0]
        p50 = lat[len(lat) // 2] * 1000
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000
        other = ", ".join(f"{n} x {s or 'no answer'}" for s, n in sorted(row.other.items())) or "none"
        pg = f"{row.per_event_ms('postgres'):.2f}" if "postgres" in row.cpu else "—"
        lines.append(
            f"| {row.store} | {row.rate:.0f} | {row.seconds:.1f} | {other} | {p50:.1f} / {p99:.1f} "
            f"| {row.cores_busy:.2f} / {row.cores_ours:.2f} | {row.per_event_ms('service'):.2f} | {pg} "
            f"| {row.per_event_ms('client'):.2f} | {sessions_text(row)} |"
        )
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    for mode in ("processes", "threads"):
        one = next((row for row in rows if row.mode == mode and row.workers == 1), None)
        four = next((row for row in rows if row.mode == mode and row.workers == 4), None)
        if one is not None and four is not None:
            ratio = four.rate / one.rate
            lines.append(
                f"| 4 workers >= {THROUGHPUT_TARGET:g}x 1 ({mode}) | {ratio:.2f}x | "
                f"{'**met**' if ratio >= THROUGHPUT_TARGET else '**missed**'} |"
            )
    for row in intakes:
        if row.store.startswith("PostgreSQL") and "[" not in row.store:
            lines.append(
                f"| intake >= {INTAKE_TARGET:.0f} events/s on {row.store} | {row.rate:.0f}/s | "
                f"{'**met**' if row.rate >= INTAKE_TARGET else '**missed**'} |"
            )
        target = CPU_TARGETS.get(row.store)
        if target is not None:
            cpu = row.per_event_ms("service")
            lines.append(
                f"| intake CPU <= {target:g} ms per event on {row.store} (one process) | {cpu:.2f} ms | "
                f"{'**met**' if cpu <= target else '**missed**'} |"
            )
    for row in intakes:
        base = next((b for b in intakes if b.store.startswith(row.store + " [")), None)
        if base is not None:
            ours, theirs = row.per_event_ms("service"), base.per_event_ms("service")
            lines.append(
                f"| {row.store}: events per CPU-second of serve, against {base.store} (same run) "
                f"| {theirs / max(1e-9, ours):.2f}x ({ours:.2f} vs {theirs:.2f} ms) | (ratio) |"
            )
    for row in intakes:
        prof = row.profile
        if prof is None or not prof.events:
            continue
        per = 1000 / prof.events
        cpu = (prof.cpu_user + prof.cpu_system) * per
        gil = prof.gil_seconds * per
        lines += [
            "",
            f"Where the {row.store} intake's time goes (py-spy `--gil` on `serve` for {prof.seconds:.0f} s "
            "while "
            f"the clients went on: {prof.events / prof.seconds:.0f} events/s; the GIL was held "
            f"{100 * prof.gil_seconds / prof.seconds:.0f} % of the time). Per accepted event: "
            f"{cpu:.2f} ms CPU in `serve` ({prof.cpu_user * per:.2f} user + "
            f"{prof.cpu_system * per:.2f} system), "
            f"of which {gil:.2f} ms Python holding the GIL, by phase (deepest phase in the stack):",
            "",
            "| phase | share of GIL samples | ms per event |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {share * 100:.1f} % | {share * gil:.3f} |" for name, share in prof.phases]
    lines += ["", f"Whole run: {elapsed:.0f} s."]
    return "\n".join(lines) + "\n"


def machine() -> list[str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"- {os.cpu_count()} cores ({cpu}), {platform.machine()}, Python {platform.python_version()}",
        "- everything on 127.0.0.1: `downloader-service` processes, PostgreSQL "
        "(devstack/postgres.py: fsync on, synchronous_commit on, shared_buffers 32MB), the Cartd "
        "stand-in (tests/fakecartd.py, in the benchmark process) and the clients",
    ]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=60, help="events per throughput run (60)")
    parser.add_argument("--staging", type=float, default=0.2, help="Cartd staging seconds per cart (0.2)")
    parser.add_argument("--intake-seconds", type=float, default=10.0, help="measured intake window (10)")
    parser.add_argument("--clients", type=int, default=16, help="intake client threads (16)")
    parser.add_argument("--profile", action="store_true", help="py-spy the intake after measuring it")
    parser.add_argument(
        "--event",
        choices=sorted(EVENT_KINDS),
        default="structured",
        help="what intake clients send: a 1.0 structured event of 3 files (structured, the default), "
        "or Notifications' 0.1 event of one file",
    )
    parser.add_argument("--skip-workers", action="store_true", help="only the intake part")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="also run each intake from the code in this directory (e.g. git archive)",
    )
    parser.add_argument("--baseline-name", default="baseline", help="how the report names --baseline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown report ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    if not SERVICE_EXE.exists():
        raise SystemExit(f"missing {SERVICE_EXE}: make .venv first (bash scripts/test)")
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    began = time.monotonic()
    code_began, load_began = code_state(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="downloader-scale-"))
    procs = Processes()
    pg = PostgresServer(work / "postgres")
    cartd = start_cartd(args.staging)
    try:
        log(f"starting PostgreSQL in {work}")
        pg.start(timeout=60)
        rows = [] if args.skip_workers else throughput(pg, cartd, work, procs, args.events, args.staging)
        setup = IntakeSetup(cartd, work, procs, args.intake_seconds, args.clients, args.profile, args.event)
        baselines = [(args.baseline, f" [{args.baseline_name}]")] if args.baseline else []
        intakes = []
        for kind in ("SQLite", "PostgreSQL"):
            # Each store's row, then (with --baseline) the same from the other code, side by side.
            for code, suffix in [(None, ""), *baselines]:
                database = (
                    pg.create_database(f"scale_intake_{len(intakes)}") if kind == "PostgreSQL" else None
                )
                intakes.append(intake(setup, kind + suffix, database, pg if database else None, code=code))
        intakes.append(
            intake(setup, "PostgreSQL", pg.create_database("scale_intake_replicas"), pg, replicas=2)
        )
        table = render(rows, intakes, args, time.monotonic() - began)
    finally:
        procs.stop_all()
        cartd.stop()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)
    print(table)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([".venv/bin/python", "benchmarks/scale.py", *argv])
    loads = f"- load average (1 min) at the start: {load_began:.2f}, at the end: {os.getloadavg()[0]:.2f}"
    facts = [f"- code: {code_began}", *machine(), loads]
    # Without the workers' part, the report's older sections ("## ...", e.g. the workers' last
    # run) are kept below the new one.
    kept = ""
    if args.skip_workers and args.out.exists():
        old = args.out.read_text(encoding="utf-8")
        at = old.find("\n## ")
        kept = "" if at < 0 else old[at:]
    args.out.write_text(
        "\n".join([f"# Scale-out benchmark, {when}", "", f"Command: `{command}`", "", *facts, "", table])
        + kept,
        encoding="utf-8",
    )
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
