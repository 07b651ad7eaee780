"""Benchmark our downloader against pacifica-downloader 0.4.1 and ``curl | tar`` on the real Cartd.

Run from the repository root (see benchmarks/README.md)::

    .venv/bin/python benchmarks/run.py [--quick] [--runs N] [--out FILE]

Everything runs on 127.0.0.1: the real Archive Interface + Cartd + Celery worker
(``devstack/pacifica.py``, from ``.venv-pacifica``), every download in a fresh child process
whose peak RSS is read with ``os.wait4``, and then our webhook service. Temporary files,
carts, archive copies and processes are removed as soon as they are no longer needed, and in
any case before the script exits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from downloader_service import CartAPI, CloudEvent
from downloader_service.cartfile import as_yield_files

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devstack.pacifica import PacificaStack, free_port  # noqa: E402
from tests import events  # noqa: E402

MB = 1 << 20
HOST = "127.0.0.1"
POLL = 0.005  # seconds between the harness's status polls
CHILD_TIMEOUT = 300.0  # seconds one download (child process) may take
CART_TIMEOUT = 300.0
OURS_PYTHON = REPO / ".venv" / "bin" / "python"
SERVICE_EXE = REPO / ".venv" / "bin" / "downloader-service"
UPSTREAM_VENV = REPO / ".venv-upstream"
UPSTREAM_PIN = "pacifica-downloader==0.4.1"
PACIFICA_VENV = Path(os.environ.get("PACIFICA_VENV", REPO / ".venv-pacifica"))
CHILD = Path(__file__).resolve().with_name("download_child.py")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "latest.md"
TOOLS = ("ours", "upstream", "limit")

# Targets (see README): small end to end vs upstream; 500MB ready->disk vs curl | tar; RSS.
SMALL_WALL_RATIO = 0.2
READY_TO_DISK_RATIO = 1.05
RSS_LIMIT_MB = 64.0
RSS_FLAT_MB = 5.0  # "flat": ours' peak RSS at 2GB within this of its peak at 100x1MB

SERVICE_EVENTS = 50
SERVICE_CART_TIMEOUT = 30  # seconds; a cart stuck on Cartd's side must not hold the run for 120 s
NO_ANSWER = 0  # the "status" of a request that got no HTTP answer
SERVICE_WORKERS = 4
REJECT_SECONDS = 5.0
REJECT_THREADS = 4


class BenchmarkError(RuntimeError):
    """A run failed or produced a wrong download: the benchmark stops rather than report it."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Appended to the stack's Celery config module, which Cartd and its worker both import.
# ------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]
    runs: int
    quick_runs: int = 0  # 0: not part of --quick
    single_run: bool = False  # --runs does not apply (the 2GB run is for memory)

    def run_count(self, quick: bool, override: int | None) -> int:
        if quick and not self.quick_runs:
            return 0
        if self.single_run:
            return 1
        if override is not None:
            return override
        return self.quick_runs if quick else self.runs


WORKLOADS = (
    Workload("small", (3 * 1024, 5 * 1024, 8 * 1024), runs=7, quick_runs=3),
    Workload("100x1MB", (MB,) * 100, runs=3, quick_runs=2),
    Workload("500MB", (500 * MB,), runs=3),
    Workload("2GB", (2048 * MB,), runs=1, single_run=True),
)


@dataclass(frozen=True)
class StoredFile:
    id: int
    subdir: str
    name: str
    size: int
    sha1: str

    @property
    def path(self) -> str:
        return f"{self.subdir}/{self.name}"

    def metadata(self) -> dict[str, Any]:
        """The ``Files`` object Notifications would send for this file."""
        return {
            "_id": self.id,
            "destinationTable": "Files",
            "name": self.name,
            "subdir": self.subdir,
            "hashtype": "sha1",
            "hashsum": self.sha1,
            "size": self.size,
            "mimetype": "application/octet-stream",
        }


def make_event(files: Sequence[StoredFile], event_id: str) -> dict[str, Any]:
    """A Notifications ingest event, CloudEvents 0.1 as Notifications posts it."""
    return events.make_event([f.metadata() for f in files], event_id=event_id)


def sha1_file(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(MB):
            digest.update(chunk)
    return digest.hexdigest()


def write_random_file(path: Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; return their sha1 (computed while writing)."""
    digest = hashlib.sha1()
    with open(path, "wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(MB, left))
            digest.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def verify(root: Path, files: Sequence[StoredFile], what: str) -> None:
    """Every file is there with its size; all (<= 12 files) or a sample of 12 match their sha1."""
    for file in files:
        path = root / "data" / file.path
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise BenchmarkError(f"{what}: {file.path} missing: {exc}") from exc
        if size != file.size:
            raise BenchmarkError(f"{what}: {file.path} has {size} bytes, expected {file.size}")
    step = max(1, len(files) // 12)
    sample = [*files[::step][:12], files[-1]]
    for file in dict.fromkeys(sample):
        actual = sha1_file(root / "data" / file.path)
        if actual != file.sha1:
            raise BenchmarkError(f"{what}: {file.path} sha1 {actual}, expected {file.sha1}")


# ------------------------------------------------------------------------------- processes
# Runs one measured command and reads its peak RSS with os.wait4. A small process of its own
# does this, not the harness: Linux keeps the high-water RSS of the image a child was forked
# from across exec, so a child of this ~35 MB harness would never report less than that.
LAUNCHER = """
import os, sys, time
stats, argv = sys.argv[1], sys.argv[2:]
began = time.monotonic()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_pid, status, usage = os.wait4(pid, 0)
ended = time.monotonic()
code = os.waitstatus_to_exitcode(status)
with open(stats, "w") as out:
    out.write(f"{code} {ended - began!r} {usage.ru_maxrss}")
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Measured:
    returncode: int
    wall: float  # spawn to reaped, seconds (timed by the launcher)
    maxrss_mb: float  # peak RSS of the process (and of its reaped children), MiB


class Children:
    """Every process this script starts, each leading its own process group, stopped by PID."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def spawn(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def measure(self, argv: Sequence[str], stdout: Path, stderr: Path, timeout: float) -> Measured:
        """Run ``argv`` to its end through the launcher: its exit code, wall time and peak RSS."""
        stats = stdout.with_suffix(".rusage")
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(stats), *argv]
            proc = self.spawn(launcher, stdout=out, stderr=err)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop(proc)
            raise BenchmarkError(f"{argv[0]} did not finish within {timeout:g} s") from None
        try:
            code, wall, maxrss_kb = stats.read_text().split()
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"the launcher of {argv[0]} failed (exit {proc.returncode})") from exc
        finally:
            stats.unlink(missing_ok=True)
        return Measured(int(code), float(wall), int(maxrss_kb) / 1024)  # ru_maxrss is in KiB

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10) -> None:
        """SIGTERM the process group ``proc`` leads, SIGKILL it after ``grace`` seconds."""
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
        # A launcher killed mid-run may leave its child behind in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def stop_all(self) -> None:
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            self.stop(proc)


class ReadyWatch(threading.Thread):
    """Poll ``HEAD cart_url`` every 5 ms and note the first moment Cartd answers ``ready``."""

    def __init__(self, cart_url: str) -> None:
        super().__init__(daemon=True)
        self.cart_url = cart_url
        self.ready_at: float | None = None
        self.stopped = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.stopped.is_set():
                try:
                    resp = session.head(self.cart_url, timeout=5)
                except requests.RequestException:
                    resp = None
                if (
                    resp is not None
                    and resp.status_code == 204
                    and resp.headers.get("X-Pacifica-Status") == "ready"
                ):
                    self.ready_at = time.monotonic()
                    return
                self.stopped.wait(POLL)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)


# ------------------------------------------------------------------------------- measuring
@dataclass
class Run:
    wall: float  # the download call (limit: staging + curl | tar), seconds
    staging: float  # start of the call (limit: the POST) to Cartd's ready
    ready_to_disk: float  # Cartd's ready to files on disk
    transfer: float  # the tool's own "ready" to files on disk (limit: curl | tar)
    rss_mb: float  # peak RSS from os.wait4
    own_hwm_mb: float | None = None  # the child's own VmHWM, logged as a cross-check


@dataclass
class ToolStats:
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def peak_rss(self) -> float:
        return max(run.rss_mb for run in self.runs)


@dataclass
class WorkloadResult:
    workload: Workload
    total_bytes: int
    stats: dict[str, ToolStats]


class Bench:
    """The stack, the work dir and the child processes of one benchmark session."""

    def __init__(self, work: Path, stack: PacificaStack, children: Children) -> None:
        self.work = work
        self.stack = stack
        self.children = children
        self.ids = itertools.count(1000)  # a fresh stack: every id is fresh
        self.cart_api = CartAPI(stack.cartd_url, poll_interval=POLL, poll_max_interval=POLL)

    # --------------------------------------------------------------------- archive
    def store_workload(self, workload: Workload) -> list[StoredFile]:
        src = self.work / "src"
        src.mkdir(exist_ok=True)
        files = []
        for index, size in enumerate(workload.sizes):
            path = src / f"{workload.name}-{index:03d}.bin"
            digest = write_random_file(path, size)
            file = StoredFile(next(self.ids), f"bench/{workload.name}", f"f{index:03d}.bin", size, digest)
            self.stack.put_file_from_path(file.id, path)
            path.unlink()  # the archive has it now
            files.append(file)
        return files

    def drop_from_archive(self, files: Sequence[StoredFile]) -> None:
        for file in files:
            self.stack.archive_path(file.id).unlink(missing_ok=True)

    def cartd_task_failures(self) -> int:
        """How many Cartd Celery tasks have failed so far (each leaves its cart "staging")."""
        try:
            return self.stack.logs["worker"].read_text(errors="replace").count("raised unexpected")
        except OSError:
            return 0

    def delete_cart(self, cart_url: str) -> None:
        with contextlib.suppress(requests.RequestException):
            requests.delete(cart_url, timeout=30)

    # ----------------------------------------------------------------------- tools
    def run_tool(self, tool: str, workload: Workload, files: Sequence[StoredFile], event: Path) -> Run:
        dest = Path(tempfile.mkdtemp(prefix=f"{workload.name}-{tool}-", dir=self.work / "downloads"))
        # Start every run with nothing dirty to write back: otherwise the tool that runs right
        # after a big file was stored pays for that file's writeback (seconds for 2 GB).
        os.sync()
        try:
            run = self._run_limit(files, dest) if tool == "limit" else self._run_library(tool, event, dest)
            verify(dest, files, f"{workload.name}/{tool}")
            return run
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _run_library(self, tool: str, event: Path, dest: Path) -> Run:
        python = OURS_PYTHON if tool == "ours" else UPSTREAM_VENV / "bin" / "python"
        uid = str(uuid.uuid4())
        cart_url = f"{self.stack.cartd_url}/{uid}"
        watch = ReadyWatch(cart_url)
        watch.start()
        out, err = dest.with_suffix(".out"), dest.with_suffix(".err")
        try:
            measured = self.children.measure(
                [str(python), str(CHILD), tool, self.stack.cartd_url, uid, str(event), str(dest)],
                out,
                err,
                CHILD_TIMEOUT,
            )
            watch.stop()
            if measured.returncode != 0:
                raise BenchmarkError(f"{tool} exited {measured.returncode}:\n{err.read_text()[-3000:]}")
            marks = json.loads(out.read_text())
        finally:
            watch.stop()
            self.delete_cart(cart_url)  # upstream leaves its carts on Cartd (ours deletes it)
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
        # The harness may miss "ready" when ours downloads and deletes a tiny cart between
        # two polls: then the tool's own sighting is the earliest evidence of it.
        ready = min(watch.ready_at or marks["ready_seen"], marks["ready_seen"])
        return Run(
            wall=marks["done"] - marks["start"],
            staging=ready - marks["start"],
            ready_to_disk=marks["done"] - ready,
            transfer=marks["done"] - marks["ready_seen"],
            rss_mb=measured.maxrss_mb,
            own_hwm_mb=marks["vmhwm_kb"] / 1024,
        )

    def _run_limit(self, files: Sequence[StoredFile], dest: Path) -> Run:
        cart_files = CloudEvent.files(make_event(files, "limit"))
        began = time.monotonic()
        cart_url = self.cart_api.setup_cart(as_yield_files(cart_files))
        try:
            self.cart_api.wait_for_cart(cart_url, CART_TIMEOUT)
            staging = time.monotonic() - began
            script = (
                "set -o pipefail; "
                f"curl -sSf --max-time {int(CHILD_TIMEOUT)} {shlex.quote(cart_url + '?filename=data')}"
                f" | tar -x -C {shlex.quote(str(dest))}"
            )
            out, err = dest.with_suffix(".out"), dest.with_suffix(".err")
            measured = self.children.measure(["bash", "-c", script], out, err, CHILD_TIMEOUT)
            if measured.returncode != 0:
                raise BenchmarkError(f"curl | tar exited {measured.returncode}:\n{err.read_text()[-3000:]}")
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
        finally:
            self.cart_api.delete_cart(cart_url)
        return Run(
            wall=staging + measured.wall,
            staging=staging,
            ready_to_disk=measured.wall,
            transfer=measured.wall,
            rss_mb=measured.maxrss_mb,
        )

    def workload(self, workload: Workload, runs: int) -> WorkloadResult:
        (self.work / "downloads").mkdir(exist_ok=True)
        log(f"[{workload.name}] storing {len(workload.sizes)} file(s), {sum(workload.sizes) / MB:.1f} MB")
        files = self.store_workload(workload)
        event = self.work / f"{workload.name}.json"
        event.write_text(json.dumps(make_event(files, f"bench-{workload.name}")), encoding="utf-8")
        stats = {tool: ToolStats() for tool in TOOLS}
        try:
            for index in range(runs):
                for tool in TOOLS:  # interleaved, so drift over time hits every tool alike
                    run = self.run_tool(tool, workload, files, event)
                    stats[tool].runs.append(run)
                    log(
                        f"[{workload.name}] run {index + 1}/{runs} {tool:8s} wall {run.wall:7.3f} s"
                        f"  staging {run.staging:7.3f} s  ready->disk {run.ready_to_disk:7.3f} s"
                        f"  rss {run.rss_mb:6.1f} MB"
                        + (f" (VmHWM {run.own_hwm_mb:.1f})" if run.own_hwm_mb is not None else "")
                    )
        finally:
            self.drop_from_archive(files)
            event.unlink(missing_ok=True)
        return WorkloadResult(workload, sum(workload.sizes), stats)


# -------------------------------------------------------------------------------- service
@dataclass
class ServiceResult:
    events: int
    answered_200: int
    statuses: dict[int, int]
    files_expected: int
    files_verified: int
    latencies: list[float]
    burst_seconds: float
    reject_count: int
    reject_400: int
    reject_seconds: float
    cartd_task_failures: int  # Celery tasks of Cartd that raised meanwhile (their carts stay staging)


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


@contextlib.contextmanager
def running_service(bench: Bench, root: Path) -> Iterator[str]:
    """Our webhook service as a subprocess on a free local port; stopped by PID afterwards."""
    port = free_port(HOST)
    env = {
        **os.environ,
        "CARTD_URL": bench.stack.cartd_url,
        "DOWNLOADER_ROOT": str(root),
        "DOWNLOADER_WORKERS": str(SERVICE_WORKERS),
        # A job store of the run's own, beside the downloads.
        "DOWNLOADER_STATE_DIR": str(root.parent / "service-state"),
        "DOWNLOADER_HOST": HOST,
        "DOWNLOADER_CART_TIMEOUT": str(SERVICE_CART_TIMEOUT),
    }
    logfile = bench.work / "service.log"
    with open(logfile, "wb") as out:
        proc = bench.children.spawn(
            [str(SERVICE_EXE), "serve", "--host", HOST, "--port", str(port)], env=env, stdout=out, stderr=out
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"the service did not start:\n{logfile.read_text()[-3000:]}")
            time.sleep(0.05)
        yield url
    finally:
        bench.children.stop(proc, grace=15)


def bench_service(bench: Bench) -> ServiceResult:
    log(f"[service] storing files for {SERVICE_EVENTS} events")
    rng = random.Random(50)
    events: list[tuple[dict[str, Any], list[StoredFile]]] = []
    for index in range(SERVICE_EVENTS):
        files = []
        for number in range(rng.randint(1, 3)):
            data = os.urandom(rng.randint(1024, 8 * 1024))
            file = StoredFile(
                next(bench.ids), f"svc/{index}", f"f{number}.bin", len(data), hashlib.sha1(data).hexdigest()
            )
            bench.stack.put_file(file.id, data)
            files.append(file)
        events.append((make_event(files, f"bench-svc-{index}-{uuid.uuid4().hex[:8]}"), files))
    root = bench.work / "service-root"
    root.mkdir()
    failures_before = bench.cartd_task_failures()
    try:
        with running_service(bench, root) as url:
            result = _drive_service(url, events)
        result.cartd_task_failures = bench.cartd_task_failures() - failures_before
        return result
    finally:
        bench.drop_from_archive([file for _event, files in events for file in files])


def _drive_service(url: str, events: list[tuple[dict[str, Any], list[StoredFile]]]) -> ServiceResult:
    barrier = threading.Barrier(len(events))

    def post(event: dict[str, Any]) -> tuple[int, float, dict[str, Any]]:
        body = json.dumps(event).encode()
        barrier.wait(30)
        began = time.perf_counter()
        try:
            resp = requests.post(
                url + "/", data=body, headers={"Content-Type": "application/json"}, timeout=300
            )
        except requests.RequestException as exc:  # lost: no answer at all
            log(f"[service] {event['eventID']}: no answer after {time.perf_counter() - began:.3f} s: {exc}")
            return NO_ANSWER, time.perf_counter() - began, {}
        return resp.status_code, time.perf_counter() - began, resp.json()

    log(f"[service] {len(events)} concurrent events")
    began = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=len(events))
    try:
        answers = list(pool.map(post, [event for event, _files in events]))
    finally:  # on an interruption, let the threads go (stopping the service ends their requests)
        barrier.abort()
        pool.shutdown(wait=False, cancel_futures=True)
    burst = time.perf_counter() - began
    statuses: dict[int, int] = {}
    verified = 0
    for (status, _latency, body), (_event, files) in zip(answers, events, strict=True):
        statuses[status] = statuses.get(status, 0) + 1
        if status != 200:
            continue
        root = Path(body["download_path"])
        verify(root, files, f"service event {body.get('event_id')}")
        verified += len(files)
    reject = _reject_invalid(url)
    return ServiceResult(
        events=len(events),
        answered_200=statuses.get(200, 0),
        statuses=statuses,
        files_expected=sum(len(files) for _event, files in events),
        files_verified=verified,
        latencies=[latency for _status, latency, _body in answers],
        burst_seconds=burst,
        reject_count=reject[0],
        reject_400=reject[1],
        reject_seconds=reject[2],
        cartd_task_failures=0,
    )


def _reject_invalid(url: str) -> tuple[int, int, float]:
    """Post malformed JSON and a file-less event from 4 keep-alive sessions for ~5 s."""
    bodies = [b'{"cloudEventsVersion": "0.1", "eventID": ', json.dumps(make_event([], "no-files")).encode()]
    headers = {"Content-Type": "application/json"}
    log(f"[service] invalid events from {REJECT_THREADS} threads for {REJECT_SECONDS:g} s")
    began = time.perf_counter()
    deadline = began + REJECT_SECONDS

    def hammer(_index: int) -> tuple[int, int]:
        sent = rejected = 0
        with requests.Session() as session:
            for body in itertools.cycle(bodies):
                if time.perf_counter() >= deadline:
                    break
                resp = session.post(url + "/", data=body, headers=headers, timeout=30)
                sent += 1
                rejected += resp.status_code == 400
        return sent, rejected

    with ThreadPoolExecutor(max_workers=REJECT_THREADS) as pool:
        counts = list(pool.map(hammer, range(REJECT_THREADS)))
    elapsed = time.perf_counter() - began
    return sum(c[0] for c in counts), sum(c[1] for c in counts), elapsed


# -------------------------------------------------------------------------------- report
def machine_facts() -> list[str]:
    def command(*argv: str) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"({' '.join(argv)} failed: {exc})"

    mem = next((line for line in command("free", "-g").splitlines() if line.startswith("Mem:")), "?")
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"- CPU: {command('nproc')} cores ({cpu}), {command('uname', '-m')}; load average at the end: {load}",
        f"- memory (`free -g`, GiB): total {mem.split()[1] if len(mem.split()) > 1 else '?'}",
        f"- Python {platform.python_version()} ({platform.platform()})",
        "- Cartd 0.7.0 + Archive Interface 0.4.2 (devstack/pacifica.py, SQLite, one Celery worker,"
        " filesystem broker polled every 50 ms), all on 127.0.0.1",
    ]


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def render(results: list[WorkloadResult], service: ServiceResult | None, quick: bool, elapsed: float) -> str:
    lines = [
        "| workload | tool | runs | wall (s) | start→ready (s) | ready→disk (s) | tool's transfer (s) "
        "| transfer MB/s | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"ours": "ours", "upstream": "upstream 0.4.1", "limit": "curl \\| tar (limit)"}
    for result in results:
        for tool in TOOLS:
            stats = result.stats[tool]
            transfer = stats.median("transfer")
            rate = result.total_bytes / MB / transfer
            lines.append(
                f"| {result.workload.name} | {names[tool]} | {len(stats.runs)} | {fmt(stats.median('wall'))} "
                f"| {fmt(stats.median('staging'))} | {fmt(stats.median('ready_to_disk'))} | {fmt(transfer)} "
                f"| {fmt(rate, 0 if rate >= 10 else 2)} "
                f"| {fmt(stats.peak_rss(), 1)} |"
            )
    lines += [
        "",
        "Limit rows: wall = Cartd staging alone (POST to `ready`, polled every 5 ms) + `curl | tar`;"
        " start→ready is that staging time. All figures are medians except peak RSS (the maximum).",
        "",
        "| workload | ours / upstream wall | ours ready→disk / curl\\|tar | ours transfer / curl\\|tar "
        "| ours RSS (MB) | upstream RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        ours, upstream, limit = (result.stats[tool] for tool in TOOLS)
        lines.append(
            f"| {result.workload.name} | {ours.median('wall') / upstream.median('wall'):.2f}x "
            f"| {ours.median('ready_to_disk') / limit.median('ready_to_disk'):.2f}x "
            f"| {ours.median('transfer') / limit.median('transfer'):.2f}x "
            f"| {fmt(ours.peak_rss(), 1)} | {fmt(upstream.peak_rss(), 1)} |"
        )
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += targets(results)
    if service is not None:
        lat = service.latencies
        others = (
            ", ".join(
                f"{n} x {'no answer' if s == NO_ANSWER else s}"
                for s, n in sorted(service.statuses.items())
                if s != 200
            )
            or "none"
        )
        lines += [
            "",
            f"Service (`downloader-service serve`, {SERVICE_WORKERS} workers, SQLite job store,"
            " synchronous answers):",
            "",
            "| measure | value |",
            "|---|---|",
            f"| concurrent events (1-3 small files each) | {service.events} |",
            f"| answered 200 | {service.answered_200} (others: {others}) |",
            f"| Cartd tasks failed meanwhile (worker log; their carts never get ready) "
            f"| {service.cartd_task_failures} |",
            f"| files on disk and matching sha1 | {service.files_verified} / {service.files_expected} |",
            f"| latency p50 / p95 / max (s) | {fmt(percentile(lat, 0.5))} / {fmt(percentile(lat, 0.95))}"
            f" / {fmt(max(lat))} |",
            f"| all {service.events} answered after (s) | {fmt(service.burst_seconds)} |",
            f"| invalid events rejected ({REJECT_THREADS} keep-alive clients, malformed JSON + no files) "
            f"| {service.reject_count / service.reject_seconds:.0f} requests/s "
            f"({service.reject_count} in {service.reject_seconds:.1f} s) |",
            f"| of which answered 400 | {service.reject_400} / {service.reject_count} |",
        ]
    lines += ["", f"Whole run: {elapsed:.0f} s{' (--quick)' if quick else ''}."]
    return "\n".join(lines) + "\n"


def targets(results: list[WorkloadResult]) -> list[str]:
    by_name = {result.workload.name: result for result in results}
    rows = []
    small = by_name.get("small")
    if small:
        ours, upstream = small.stats["ours"].median("wall"), small.stats["upstream"].median("wall")
        limit = small.stats["limit"].median("wall")
        ratio = ours / upstream
        rows.append(
            f"| small cart end to end <= {SMALL_WALL_RATIO}x upstream | {ratio:.2f}x"
            f" ({fmt(ours)} s vs {fmt(upstream)} s; staging + `curl \\| tar` alone: {limit / upstream:.2f}x)"
            f" | {verdict(ratio <= SMALL_WALL_RATIO)} |"
        )
    big = by_name.get("500MB")
    if big:
        ours, limit = big.stats["ours"].median("ready_to_disk"), big.stats["limit"].median("ready_to_disk")
        transfer = big.stats["ours"].median("transfer")
        ratio = ours / limit
        rows.append(
            f"| 500MB ready→disk <= {READY_TO_DISK_RATIO}x `curl \\| tar` (ours verifies sha1) | {ratio:.2f}x"
            f" ({fmt(ours)} s vs {fmt(limit)} s; ours' own transfer {fmt(transfer)} s ="
            f" {transfer / limit:.2f}x, the rest is its poll interval)"
            f" | {verdict(ratio <= READY_TO_DISK_RATIO)} |"
        )
    else:
        rows.append("| 500MB ready→disk <= 1.05x `curl \\| tar` | not measured (--quick) | — |")
    rss = {result.workload.name: result.stats["ours"].peak_rss() for result in results}
    worst = max(rss, key=lambda name: rss[name])
    rows.append(
        f"| ours' peak RSS <= {RSS_LIMIT_MB:.0f} MB | {fmt(rss[worst], 1)} MB (largest, at {worst}) "
        f"| {verdict(rss[worst] <= RSS_LIMIT_MB)} |"
    )
    if "2GB" in rss and "100x1MB" in rss:
        growth = rss["2GB"] - rss["100x1MB"]
        rows.append(
            f"| ours' peak RSS flat from 1 MB files to a 2 GB file (within {RSS_FLAT_MB:g} MB) "
            f"| {fmt(rss['100x1MB'], 1)} → {fmt(rss['2GB'], 1)} MB ({growth:+.1f}) "
            f"| {verdict(abs(growth) <= RSS_FLAT_MB)} |"
        )
    else:
        rows.append("| ours' peak RSS flat up to 2 GB | not measured (--quick) | — |")
    return rows


def write_report(path: Path, table: str, args: argparse.Namespace) -> None:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(shlex.quote(part) for part in [".venv/bin/python", "benchmarks/run.py", *args.argv])
    text = "\n".join(
        [
            f"# Benchmark results, {when}",
            "",
            f"Command: `{command}`",
            "",
            *machine_facts(),
            "",
            table,
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------- setup
def ensure_upstream_venv() -> None:
    """Create ``.venv-upstream`` with pacifica-downloader 0.4.1, unless it is already there."""
    python = UPSTREAM_VENV / "bin" / "python"
    check = (
        "import importlib.metadata as m, pacifica.downloader; "
        "assert m.version('pacifica-downloader') == '0.4.1'"
    )
    ignore = UPSTREAM_VENV / ".gitignore"  # like newer venvs: keep git, and with it ruff, out
    if python.exists() and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0:
        ignore.write_text("*\n", encoding="utf-8")
        return
    log(f"creating {UPSTREAM_VENV} with {UPSTREAM_PIN}")
    base = shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(UPSTREAM_VENV)], check=True)
    ignore.write_text("*\n", encoding="utf-8")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", UPSTREAM_PIN],
        check=True,
    )
    subprocess.run([str(python), "-c", check], check=True)


def preflight() -> None:
    missing = [
        str(p) for p in (OURS_PYTHON, SERVICE_EXE, PACIFICA_VENV / "bin" / "pacifica-cartd") if not p.exists()
    ]
    for exe in ("curl", "tar", "bash"):
        if shutil.which(exe) is None:
            missing.append(exe)
    if missing:
        raise SystemExit(
            "missing: "
            + ", ".join(missing)
            + " (run `bash scripts/test` first; it makes .venv and .venv-pacifica)"
        )
    ensure_upstream_venv()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="only small and 100x1MB, fewer runs (a smoke check)"
    )
    parser.add_argument("--runs", type=int, help="runs per workload (the 2GB memory run is always one)")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"markdown report (default {DEFAULT_OUT})"
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    args.argv = list(argv)
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup below


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    preflight()
    signal.signal(signal.SIGTERM, _terminate)
    began = time.monotonic()
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="pacifica-bench-"))
    stack = PacificaStack(work / "stack", PACIFICA_VENV)
    try:
        log(f"starting the Pacifica stack in {work}")
        stack.start(timeout=90)
        bench = Bench(work, stack, children)
        results = []
        for workload in WORKLOADS:
            runs = workload.run_count(args.quick, args.runs)
            if runs:
                results.append(bench.workload(workload, runs))
        service = bench_service(bench)
        table = render(results, service, args.quick, time.monotonic() - began)
    except BaseException:
        log("the benchmark failed or was interrupted: stopping every process and removing its files")
        raise
    finally:
        children.stop_all()
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(table)
    write_report(args.out, table, args)
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
