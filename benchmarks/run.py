"""Benchmark our downloader against pacifica-downloader 0.4.1 and ``curl | tar`` on the real Cartd.

Run from the repository root (see benchmarks/README.md)::

    .venv/bin/python benchmarks/run.py [--quick] [--runs N] [--out FILE]

Everything runs on 127.0.0.1: the real Archive Interface + Cartd + Celery worker
(``devstack/pacifica.py``, from ``.venv-pacifica``), every download in a fresh child process
whose peak RSS is read with ``os.wait4``, then, in one run: ours bundled against ours plain,
a bundled download resumed after a cut, ours' peak RSS against the number of files (on a fake
Cartd, memory only) and our webhook service. Temporary files, carts, archive copies and
processes are removed as soon as they are no longer needed, and in any case before the script
exits.
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
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

import requests

from downloader_service import CartAPI, CloudEvent
from downloader_service.cartfile import as_yield_files
from downloader_service.service.settings import DEFAULT_MAX_BODY_BYTES

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devstack.pacifica import PacificaStack, free_port  # noqa: E402
from devstack.postgres import PostgresServer  # noqa: E402
from tests import events  # noqa: E402
from tests.fakecartd import FakeCartd  # noqa: E402

MB = 1 << 20
KiB = 1 << 10
HOST = "127.0.0.1"
POLL = 0.005  # seconds between the harness's status polls
# One download (child process) may take this long: Cartd here takes 2-3 min to stage a cart of
# 2000 small files, and ours then waits for its cart's delete.
CHILD_TIMEOUT = 900.0
CART_TIMEOUT = 900.0  # the limit's wait for Cartd to stage
DELETE_TIMEOUT = 300.0  # the harness's DELETE of a cart
OURS_PYTHON = REPO / ".venv" / "bin" / "python"
SERVICE_EXE = REPO / ".venv" / "bin" / "downloader-service"
UPSTREAM_VENV = REPO / ".venv-upstream"
UPSTREAM_PIN = "pacifica-downloader==0.4.1"
PACIFICA_VENV = Path(os.environ.get("PACIFICA_VENV", REPO / ".venv-pacifica"))
CHILD = Path(__file__).resolve().with_name("download_child.py")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "latest.md"
# "ours" is our Downloader with bundle=False (a plain cart, the one curl | tar reads), "bundle"
# the same with bundle=True; the library's default, bundle="auto", bundles carts of 64 MiB or more.
TOOLS = ("ours", "upstream", "limit")
TOOL_NAMES = {
    "ours": "ours (plain)",
    "bundle": "ours (bundle)",
    "upstream": "upstream 0.4.1",
    "limit": "curl \\| tar (limit)",
    "ceiling": "curl > /dev/null (Cartd)",
}

# Targets (see README), each printed as met or missed with the measured ratio.
PLAIN_READY_TO_DISK_RATIO = 1.0  # 500MB: ours (plain) ready->disk / curl | tar, sha1 included
BUNDLE_WALL_RATIO = 0.8  # 500MB: ours bundled wall / ours plain wall
MANY_FILES_READY_TO_DISK_RATIO = 1.3  # 2000x4KiB: ours ready->disk / curl | tar
RESUME_BYTES_RATIO = 1.15  # bytes fetched in all / the bundle's size, after a cut
RSS_LIMIT_MB = 64.0  # ours' peak RSS, from 3 files to the largest event and to 2 GB
SMALL_WALL_RATIO = 0.2  # extra: the small cart end to end vs upstream

# Carts of 500 MiB downloaded bundled through a proxy that cuts the first GET at each of these
# fractions of its Content-Length. In ten equal files a cut at 90 % falls on the 10th file's
# header, one at 95 % in the middle of that file; one file is the worst case for a downloader
# that resumes from the header of the file the cut hit (it fetches everything before the cut
# twice), while one that resumes from the last byte written fetches little more in every case.
RESUME_SETS: tuple[tuple[str, tuple[int, ...], tuple[float, ...]], ...] = (
    ("10x50MiB", (50 * MB,) * 10, (0.9, 0.95)),
    ("500MB in 1 file", (500 * MB,), (0.9,)),
)
QUICK_RESUME_SETS = RESUME_SETS[:1]
# Ours' peak RSS against the number of files in the event, on a fake Cartd; the largest count,
# always measured, is what the service's body limit admits (computed).
MEMORY_COUNTS = (3, 2000, 20000)
QUICK_MEMORY_COUNTS = (3, 2000)
TINY_MAX = 16  # the fake's files hold 0-16 bytes
NAME_ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

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


# ------------------------------------------------------------------------------ workloads
@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]
    runs: int
    quick_runs: int = 0  # 0: not part of --quick
    single_run: bool = False  # --runs does not apply (the 2GB run is for memory)
    tools: tuple[str, ...] = TOOLS

    def run_count(self, quick: bool, override: int | None) -> int:
        if quick and not self.quick_runs:
            return 0
        if self.single_run:
            return 1
        if override is not None:
            return override
        return self.quick_runs if quick else self.runs


WORKLOADS = (
    Workload("small", (3 * KiB, 5 * KiB, 8 * KiB), runs=7, quick_runs=3),
    Workload("100x1MB", (MB,) * 100, runs=3, quick_runs=2),
    # Cartd stages a cart of 2000 small files in 2-3 minutes here: two runs of each tool.
    Workload("2000x4KiB", (4 * KiB,) * 2000, runs=2),
    # With Cartd's own ceiling: how fast its GET streams to a client that does nothing.
    Workload("10x100MiB", (100 * MB,) * 10, runs=3, tools=(*TOOLS, "ceiling")),
    # Also ours bundled, interleaved with the rest: bundled vs plain wall.
    Workload(
        "500MB", (500 * MB,), runs=5, quick_runs=1, tools=("ours", "bundle", "upstream", "limit", "ceiling")
    ),
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
        return f"{self.subdir}/{self.name}" if self.subdir else self.name

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

    def minimal_metadata(self) -> dict[str, Any]:
        """The smallest ``Files`` object Notifications sends: no ``size`` or ``mimetype``.

        ``subdir`` stays, empty (Notifications always sends it; ours would take it missing).
        """
        return {
            "_id": self.id,
            "destinationTable": "Files",
            "name": self.name,
            "subdir": self.subdir,
            "hashtype": "sha1",
            "hashsum": self.sha1,
        }


def make_event(files: Sequence[StoredFile], event_id: str) -> dict[str, Any]:
    """A Notifications ingest event, CloudEvents 0.1 as Notifications posts it."""
    return events.make_event([f.metadata() for f in files], event_id=event_id)


def compact_json(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


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


# -------------------------------------------------------------------- events of many files
def short_name(index: int) -> str:
    """The ``index``-th shortest name over 62 characters: 0 -> "0", 61 -> "z", 62 -> "00"."""
    chars = []
    index += 1
    while index:
        index, digit = divmod(index - 1, len(NAME_ALPHABET))
        chars.append(NAME_ALPHABET[digit])
    return "".join(reversed(chars))


def tiny_file(index: int) -> tuple[StoredFile, bytes]:
    """File ``index`` of a many-file event: 0-16 bytes, named as short as can be."""
    data = hashlib.sha256(index.to_bytes(8, "big")).digest()[: index % (TINY_MAX + 1)]
    return StoredFile(index, "", short_name(index), len(data), hashlib.sha1(data).hexdigest()), data


def many_files_event(files: Sequence[StoredFile]) -> bytes:
    """The compact CloudEvents body of ``files``' smallest valid objects."""
    return compact_json(events.make_event([f.minimal_metadata() for f in files], event_id="bench-memory"))


def largest_event_files(limit: int) -> int:
    """How many of the smallest valid file objects fit in a CloudEvents body of ``limit`` bytes.

    The objects of :func:`tiny_file`: shortest names first, an empty ``subdir``, sha1 (what
    Notifications sends; an md5 would be 8 characters shorter), ids from 0, compact JSON.
    """
    size = len(many_files_event([]))
    count = 0
    while True:
        grow = len(compact_json(tiny_file(count)[0].minimal_metadata())) + 1  # and a comma
        if size + grow > limit:
            return count
        size += grow
        count += 1


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
    out.write(f"{code} {ended - began!r} {usage.ru_maxrss} {usage.ru_utime + usage.ru_stime!r}")
sys.exit(code if code >= 0 else 128 - code)
"""


@dataclass
class Measured:
    returncode: int
    wall: float  # spawn to reaped, seconds (timed by the launcher)
    maxrss_mb: float  # peak RSS of the process (and of its reaped children), MiB
    cpu: float  # user + system CPU seconds of the process and its reaped children


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
            code, wall, maxrss_kb, cpu = stats.read_text().split()
        except (OSError, ValueError) as exc:
            raise BenchmarkError(f"the launcher of {argv[0]} failed (exit {proc.returncode})") from exc
        finally:
            stats.unlink(missing_ok=True)
        return Measured(int(code), float(wall), int(maxrss_kb) / 1024, float(cpu))  # ru_maxrss: KiB

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
# ------------------------------------------------------------------------------- measuring
@dataclass
class Run:
    wall: float  # the download call (limit: staging + curl | tar), seconds
    staging: float  # start of the call (limit: the POST) to Cartd's ready
    ready_to_disk: float  # Cartd's ready to files on disk
    transfer: float  # the tool's own "ready" to files on disk (limit: curl | tar)
    rss_mb: float  # peak RSS from os.wait4
    cpu: float = 0.0  # the client's user + system CPU seconds (ours: the whole child process)
    load: float = 0.0  # the machine's 1-minute load average as the run began
    own_hwm_mb: float | None = None  # the child's own VmHWM, logged as a cross-check
    # Ours: its return to the end of its background delete (wait_for_deletes). Limit: the
    # harness's DELETE request. Upstream: None, it never deletes its carts.
    delete: float | None = None
    delete_timed_out: bool = False


@dataclass
class ToolStats:
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return float(statistics.median(getattr(run, attribute) for run in self.runs))

    def values(self, attribute: str) -> list[float]:
        return [float(getattr(run, attribute)) for run in self.runs]

    def median_delete(self) -> float | None:
        deletes = [run.delete for run in self.runs if run.delete is not None and not run.delete_timed_out]
        return float(statistics.median(deletes)) if deletes else None

    def peak_rss(self) -> float:
        return max(run.rss_mb for run in self.runs)


@dataclass
class WorkloadResult:
    workload: Workload
    total_bytes: int
    stats: dict[str, ToolStats]


@dataclass
class ResumeResult:
    name: str
    files: int
    cut: float  # the fraction of the bundle at which the proxy cut the first GET
    tar_bytes: int  # the bundle's size: Content-Length of the first, whole, GET
    fetched: int  # body bytes of every GET the proxy forwarded to ours
    gets: list[tuple[str, int]]  # (Range header, status) of each GET
    run: Run


@dataclass
class MemoryPoint:
    files: int
    body_bytes: int  # the event as a compact JSON body
    run: Run


@dataclass
class MemoryResult:
    points: list[MemoryPoint]
    largest: int  # files in the largest event the service admits
    body_limit: int

    def slope_kib_per_file(self) -> float | None:
        """Least-squares slope of peak RSS against the number of files, KiB a file."""
        xs = [float(point.files) for point in self.points]
        if len(set(xs)) < 2:
            return None
        slope = statistics.linear_regression(xs, [point.run.rss_mb for point in self.points]).slope
        return slope * 1024


class _QuietServer(ThreadingHTTPServer):
    """A threaded HTTP server that says nothing when a client goes away (a download ending)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class CuttingProxy:
    """Forward to Cartd; cut the first cart GET at ``fraction`` of its length; count bytes."""

    _HOP_HEADERS = ("connection", "transfer-encoding", "keep-alive", "server", "date")

    def __init__(self, upstream: str, fraction: float) -> None:
        self.upstream = upstream
        self.fraction = fraction
        self.body_bytes = 0  # bytes of GET bodies sent to the downloader, all requests
        self.gets: list[tuple[str, int]] = []  # (Range header, status)
        self.cut = False
        self.tar_bytes = 0  # Content-Length of the first, whole, GET
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://{HOST}:{self.server.server_address[1]}"

    def start(self) -> CuttingProxy:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "range")}
                target = proxy.upstream + self.path
                with requests.request(
                    self.command, target, data=body, headers=headers, stream=True, timeout=300
                ) as resp:
                    self.send_response(resp.status_code)
                    for key, value in resp.headers.items():
                        if key.lower() not in proxy._HOP_HEADERS:
                            self.send_header(key, value)
                    total = resp.headers.get("Content-Length")
                    if total is None and self.command != "HEAD":
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    cut_at = None
                    if self.command == "GET":
                        proxy.gets.append((self.headers.get("Range", ""), resp.status_code))
                        if not proxy.cut and total is not None and resp.status_code == 200:
                            proxy.cut = True
                            proxy.tar_bytes = int(total)
                            cut_at = int(int(total) * proxy.fraction)
                    sent = 0
                    for chunk in resp.raw.stream(MB, decode_content=False):
                        if cut_at is not None and sent + len(chunk) >= cut_at:
                            self.wfile.write(chunk[: cut_at - sent])
                            proxy.body_bytes += cut_at - sent
                            self.wfile.flush()
                            self.close_connection = True
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        if self.command == "GET":
                            proxy.body_bytes += len(chunk)

            do_GET = do_HEAD = do_POST = do_DELETE = _forward

        self.server = _QuietServer((HOST, 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class Bench:
    """The stack, the work dir and the child processes of one benchmark session."""

    def __init__(self, work: Path, stack: PacificaStack, children: Children) -> None:
        self.work = work
        self.stack = stack
        self.children = children
        self.ids = itertools.count(1000)  # a fresh stack: every id is fresh
        self.cart_api = CartAPI(stack.cartd_url, poll_interval=POLL, poll_max_interval=POLL)
        (work / "downloads").mkdir(exist_ok=True)

    # --------------------------------------------------------------------- archive
    def store_files(self, name: str, sizes: Sequence[int]) -> list[StoredFile]:
        src = self.work / "src"
        src.mkdir(exist_ok=True)
        files = []
        for index, size in enumerate(sizes):
            path = src / f"{name}-{index:04d}.bin"
            digest = write_random_file(path, size)
            file = StoredFile(next(self.ids), f"bench/{name}", f"f{index:04d}.bin", size, digest)
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
            requests.delete(cart_url, timeout=DELETE_TIMEOUT)

    # ----------------------------------------------------------------------- tools
    def run_tool(
        self,
        tool: str,
        label: str,
        files: Sequence[StoredFile],
        event: Path,
        via: str | None = None,
        cartd: str | None = None,
    ) -> Run:
        """One verified download of ``files`` by ``tool``; ``via`` a proxy, ``cartd`` another Cartd."""
        dest = Path(tempfile.mkdtemp(prefix=f"{label}-{tool}-", dir=self.work / "downloads"))
        # Start every run with nothing dirty to write back: otherwise the tool that runs right
        # after a big file was stored pays for that file's writeback (seconds for 2 GB).
        os.sync()
        try:
            load = os.getloadavg()[0]
            if tool in ("limit", "ceiling"):
                run = self._run_limit(files, dest, sink=tool == "ceiling")
            else:
                run = self._run_library(tool, event, dest, via, cartd)
            if tool != "ceiling":
                verify(dest, files, f"{label}/{tool}")
            run.load = load
            return run
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    def _run_library(self, tool: str, event: Path, dest: Path, via: str | None, cartd: str | None) -> Run:
        python = UPSTREAM_VENV / "bin" / "python" if tool == "upstream" else OURS_PYTHON
        cartd = cartd or self.stack.cartd_url
        uid = str(uuid.uuid4())
        cart_url = f"{cartd}/{uid}"
        watch = ReadyWatch(cart_url)  # on Cartd itself, never through the proxy
        watch.start()
        out, err = dest.with_suffix(".out"), dest.with_suffix(".err")
        try:
            measured = self.children.measure(
                [str(python), str(CHILD), tool, via or cartd, uid, str(event), str(dest)],
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
            self.delete_cart(cart_url)  # upstream leaves its carts on Cartd; ours deleted its own
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
        # The harness may miss "ready" when ours downloads and deletes a tiny cart between
        # two polls: then the tool's own sighting is the earliest evidence of it.
        ready = min(watch.ready_at or marks["ready_seen"], marks["ready_seen"])
        deleted = marks.get("deleted")
        return Run(
            wall=marks["done"] - marks["start"],
            staging=ready - marks["start"],
            ready_to_disk=marks["done"] - ready,
            transfer=marks["done"] - marks["ready_seen"],
            rss_mb=measured.maxrss_mb,
            cpu=measured.cpu,
            own_hwm_mb=marks["vmhwm_kb"] / 1024,
            delete=None if deleted is None else deleted - marks["done"],
            delete_timed_out=deleted is not None and not marks["deletes_done"],
        )

    def _run_limit(self, files: Sequence[StoredFile], dest: Path, sink: bool = False) -> Run:
        """``curl | tar`` of a plain cart of ``files`` (``sink``: ``curl > /dev/null``, Cartd alone)."""
        cart_files = CloudEvent.files(make_event(files, "limit"))
        began = time.monotonic()
        cart_url = self.cart_api.setup_cart(as_yield_files(cart_files))
        deleted = False
        try:
            self.cart_api.wait_for_cart(cart_url, CART_TIMEOUT)
            staging = time.monotonic() - began
            script = (
                "set -o pipefail; "
                f"curl -sSf --max-time {int(CHILD_TIMEOUT)} {shlex.quote(cart_url + '?filename=data')}"
                + (" > /dev/null" if sink else f" | tar -x -C {shlex.quote(str(dest))}")
            )
            out, err = dest.with_suffix(".out"), dest.with_suffix(".err")
            measured = self.children.measure(["bash", "-c", script], out, err, CHILD_TIMEOUT)
            if measured.returncode != 0:
                raise BenchmarkError(f"curl | tar exited {measured.returncode}:\n{err.read_text()[-3000:]}")
            out.unlink(missing_ok=True)
            err.unlink(missing_ok=True)
            delete_began = time.monotonic()
            deleted = self.cart_api.delete_cart(cart_url)
            delete = time.monotonic() - delete_began
        finally:
            if not deleted:
                self.delete_cart(cart_url)
        return Run(
            wall=staging + measured.wall,
            staging=staging,
            ready_to_disk=measured.wall,
            transfer=measured.wall,
            rss_mb=measured.maxrss_mb,
            cpu=measured.cpu,
            delete=delete,
        )

    def workload(self, workload: Workload, runs: int) -> WorkloadResult:
        log(f"[{workload.name}] storing {len(workload.sizes)} file(s), {sum(workload.sizes) / MB:.1f} MB")
        files = self.store_files(workload.name, workload.sizes)
        event = self.work / f"{workload.name}.json"
        event.write_text(json.dumps(make_event(files, f"bench-{workload.name}")), encoding="utf-8")
        stats = {tool: ToolStats() for tool in workload.tools}
        try:
            for index in range(runs):
                for tool in workload.tools:  # interleaved, so drift over time hits every tool alike
                    run = self.run_tool(tool, workload.name, files, event)
                    stats[tool].runs.append(run)
                    log(
                        f"[{workload.name}] run {index + 1}/{runs} {tool:8s} wall {run.wall:7.3f} s"
                        f"  staging {run.staging:7.3f} s  ready->disk {run.ready_to_disk:7.3f} s"
                        f"  rss {run.rss_mb:6.1f} MB  cpu {run.cpu:6.2f} s  load {run.load:4.2f}"
                        + (f" (VmHWM {run.own_hwm_mb:.1f})" if run.own_hwm_mb is not None else "")
                        + (f"  delete {run.delete:6.3f} s" if run.delete is not None else "")
                        + (" (timed out)" if run.delete_timed_out else "")
                    )
        finally:
            self.drop_from_archive(files)
            event.unlink(missing_ok=True)
        return WorkloadResult(workload, sum(workload.sizes), stats)

    def resume(self, name: str, sizes: Sequence[int], cuts: Sequence[float]) -> list[ResumeResult]:
        """Ours, bundled, through a proxy that cuts the first GET at each of ``cuts``: bytes fetched."""
        log(f"[resume {name}] storing {len(sizes)} file(s), {sum(sizes) / MB:.1f} MB")
        label = "resume-" + name.replace(" ", "-")
        files = self.store_files(label, sizes)
        event = self.work / f"{label}.json"
        event.write_text(json.dumps(make_event(files, f"bench-{label}")), encoding="utf-8")
        results = []
        try:
            for cut in cuts:  # a cart of its own each time
                proxy = CuttingProxy(self.stack.cartd_url, cut).start()
                try:
                    run = self.run_tool("bundle", label, files, event, via=proxy.url)
                finally:
                    proxy.stop()
                if not proxy.cut or len(proxy.gets) < 2:
                    raise BenchmarkError(
                        f"resume {name}: the proxy did not cut a GET, or ours did not ask again"
                    )
                result = ResumeResult(
                    name, len(files), cut, proxy.tar_bytes, proxy.body_bytes, list(proxy.gets), run
                )
                log(
                    f"[resume {name}] cut at {cut:.0%}: fetched {result.fetched} bytes for a"
                    f" {result.tar_bytes}-byte bundle ({result.fetched / result.tar_bytes:.3f}x),"
                    f" GETs {result.gets}, wall {run.wall:.3f} s"
                )
                results.append(result)
        finally:
            self.drop_from_archive(files)
            event.unlink(missing_ok=True)
        return results

    def memory(self, counts: Sequence[int]) -> MemoryResult:
        """Ours' peak RSS for events of ``counts`` files and of the most a body can hold.

        On a fake Cartd (``tests/fakecartd.py``) that is ready at once and serves a tar of tiny
        files: Cartd stages a file in 40-75 ms, too slow for tens of thousands.
        """
        largest = largest_event_files(DEFAULT_MAX_BODY_BYTES)
        fake = FakeCartd().start()
        points = []
        try:
            for count in sorted({*counts, largest}):
                points.append(self._memory_point(fake, count))
        finally:
            fake.stop()
        return MemoryResult(points, largest, DEFAULT_MAX_BODY_BYTES)

    def _memory_point(self, fake: FakeCartd, count: int) -> MemoryPoint:
        log(f"[memory] an event of {count} files (fake Cartd)")
        files = []
        for index in range(count):
            file, data = tiny_file(index)
            fake.contents[str(file.id)] = data
            files.append(file)
        body = many_files_event(files)
        if len(body) > DEFAULT_MAX_BODY_BYTES:
            raise BenchmarkError(f"the event of {count} files is {len(body)} bytes, over the body limit")
        event = self.work / f"memory-{count}.json"
        event.write_bytes(body)
        try:
            run = self.run_tool("ours", f"memory-{count}", files, event, cartd=fake.url)
        finally:
            event.unlink(missing_ok=True)
            fake.contents.clear()
            fake.carts.clear()
            fake.requests.clear()
        log(
            f"[memory] {count} files, {len(body)} bytes of event: peak RSS {run.rss_mb:.1f} MB"
            f" (VmHWM {run.own_hwm_mb:.1f}), wall {run.wall:.3f} s"
        )
        return MemoryPoint(count, len(body), run)


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
    reject_statuses: dict[str, dict[int, int]]  # kind of invalid body -> {status: count}
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
        reject_statuses=reject[1],
        reject_seconds=reject[2],
        cartd_task_failures=0,
    )


def _reject_invalid(url: str) -> tuple[int, dict[str, dict[int, int]], float]:
    """Post malformed JSON and a file-less event from 4 keep-alive sessions for ~5 s.

    Returns how many requests were sent, the answers' statuses by kind of body, the seconds.
    """
    bodies = [
        ("malformed JSON", b'{"cloudEventsVersion": "0.1", "eventID": '),
        ("an event without files", json.dumps(make_event([], "no-files")).encode()),
    ]
    headers = {"Content-Type": "application/json"}
    log(f"[service] invalid events from {REJECT_THREADS} threads for {REJECT_SECONDS:g} s")
    began = time.perf_counter()
    deadline = began + REJECT_SECONDS

    def hammer(_index: int) -> Counter[tuple[str, int]]:
        answers: Counter[tuple[str, int]] = Counter()
        with requests.Session() as session:
            for kind, body in itertools.cycle(bodies):
                if time.perf_counter() >= deadline:
                    break
                resp = session.post(url + "/", data=body, headers=headers, timeout=30)
                answers[kind, resp.status_code] += 1
        return answers

    with ThreadPoolExecutor(max_workers=REJECT_THREADS) as pool:
        answers = sum(pool.map(hammer, range(REJECT_THREADS)), Counter[tuple[str, int]]())
    elapsed = time.perf_counter() - began
    by_kind: dict[str, dict[int, int]] = {kind: {} for kind, _body in bodies}
    for (kind, status), count in sorted(answers.items()):
        by_kind[kind][status] = count
    return answers.total(), by_kind, elapsed


# -------------------------------------------------------------------------------- report
@dataclass
class Results:
    workloads: list[WorkloadResult] = field(default_factory=list)
    resumes: list[ResumeResult] = field(default_factory=list)
    memory: MemoryResult | None = None
    service: ServiceResult | None = None


def code_state() -> str:
    """The commit checked out, and whether (and where) the working tree differs from it."""

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(REPO), *argv], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"(git {argv[0]} failed: {exc})"
        return done.stdout

    commit = git("log", "-1", "--format=%h (%s)").strip()
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    if not changed:
        return f"commit {commit}, working tree clean"
    shown = ", ".join(changed[:20]) + (f" and {len(changed) - 20} more" if len(changed) > 20 else "")
    return f"commit {commit}, working tree dirty ({shown})"


def machine_facts(code_began: str, code_ended: str) -> list[str]:
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
    code = f"- code at the start: {code_began}"
    code += "; the same at the end" if code_ended == code_began else f"\n- code at the end: {code_ended}"
    return [
        code,
        f"- CPU: {command('nproc')} cores ({cpu}), {command('uname', '-m')}; load average at the end: {load}",
        f"- memory (`free -g`, GiB): total {mem.split()[1] if len(mem.split()) > 1 else '?'}",
        f"- Python {platform.python_version()} ({platform.platform()})",
        "- Cartd 0.7.0 + Archive Interface 0.4.2 (devstack/pacifica.py, Cartd on PostgreSQL, one Celery"
        " worker process, filesystem broker polled every 50 ms), all on 127.0.0.1",
    ]


def fmt(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}"


def verdict(met: bool) -> str:
    return "**met**" if met else "**missed**"


def delete_cell(tool: str, stats: ToolStats) -> str:
    if tool == "upstream":
        return "never"
    median = stats.median_delete()
    timed_out = sum(run.delete_timed_out for run in stats.runs)
    cell = "—" if median is None else fmt(median)
    return cell + (f" ({timed_out} over {DELETE_TIMEOUT:g} s)" if timed_out else "")


def render(results: Results, quick: bool, elapsed: float) -> str:
    lines = [
        "| workload | tool | runs | wall (s) | start→ready (s) | ready→disk (s) | tool's transfer (s) "
        "| transfer MB/s | client CPU (s) | load | cart delete, after return (s) | peak RSS (MB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results.workloads:
        for tool, stats in result.stats.items():
            transfer = stats.median("transfer")
            rate = result.total_bytes / MB / transfer
            lines.append(
                f"| {result.workload.name} | {TOOL_NAMES[tool]} | {len(stats.runs)} "
                f"| {fmt(stats.median('wall'))} | {fmt(stats.median('staging'))} "
                f"| {fmt(stats.median('ready_to_disk'))} | {fmt(transfer)} "
                f"| {fmt(rate, 0 if rate >= 10 else 2)} | {fmt(stats.median('cpu'), 2)} "
                f"| {fmt(stats.median('load'), 2)} | {delete_cell(tool, stats)} "
                f"| {fmt(stats.peak_rss(), 1)} |"
            )
    lines += [
        "",
        "ours (plain) = our `Downloader` with `bundle=False`, the plain cart `curl | tar` reads too"
        ' (the library\'s default, `bundle="auto"`, would bundle every workload here of 64 MiB or'
        " more); ours (bundle) = `bundle=True`. Limit rows: wall = Cartd staging alone (POST to"
        " `ready`, polled every 5 ms) + `curl | tar`; start→ready is that staging time. Cart delete:"
        " ours returns first and deletes its cart in a background thread; the column is the time"
        " from its return until `Downloader.wait_for_deletes()` returns (not in wall). Upstream"
        " 0.4.1 never deletes its carts (the harness deletes them afterwards, untimed); for the"
        " limit it is the harness's own `DELETE` (not in wall). `curl > /dev/null` rows: Cartd's own"
        " speed, to a client that writes nothing. Client CPU: user + system seconds of the"
        " measured process and its children (ours: the whole Python process, start-up included;"
        " ours hashes every byte, `curl | tar` does not), on the same 2 cores as Cartd's server,"
        " which takes about one core while it streams. Load: the 1-minute load average as each"
        " run began. All figures are medians except peak RSS (the maximum).",
    ]
    comparable = [r for r in results.workloads if all(tool in r.stats for tool in TOOLS)]
    if comparable:
        lines += [
            "",
            "| workload | ours / upstream wall | ours ready→disk / curl\\|tar | ours transfer / curl\\|tar "
            "| ours RSS (MB) | upstream RSS (MB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
    for result in comparable:
        ours, upstream, limit = (result.stats[tool] for tool in TOOLS)
        lines.append(
            f"| {result.workload.name} | {ours.median('wall') / upstream.median('wall'):.2f}x "
            f"| {ours.median('ready_to_disk') / limit.median('ready_to_disk'):.2f}x "
            f"| {ours.median('transfer') / limit.median('transfer'):.2f}x "
            f"| {fmt(ours.peak_rss(), 1)} | {fmt(upstream.peak_rss(), 1)} |"
        )
    lines += render_bundles(results.workloads)
    lines += render_resumes(results.resumes)
    if results.memory is not None:
        lines += render_memory(results.memory)
    lines += ["", "| target | measured | verdict |", "|---|---|---|"]
    lines += targets(results)
    if results.service is not None:
        lines += render_service(results.service)
    lines += ["", f"Whole run: {elapsed:.0f} s ({elapsed / 60:.1f} min){' (--quick)' if quick else ''}."]
    return "\n".join(lines) + "\n"


def render_bundles(workloads: Sequence[WorkloadResult]) -> list[str]:
    """Ours bundled against ours plain, where both ran (interleaved, one cart a run)."""
    both = [r for r in workloads if "bundle" in r.stats and "ours" in r.stats]
    if not both:
        return []
    lines = [
        "",
        "Bundled vs plain (ours, `bundle=True` vs `bundle=False`, interleaved, each run a cart of its"
        " own; wall = the call, start to return):",
        "",
        "| workload | mode | runs | wall (s), median | walls (s) | start→ready (s) | ready→disk (s) "
        "| bundle / plain wall |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for result in both:
        plain, bundle = result.stats["ours"], result.stats["bundle"]
        ratio = bundle.median("wall") / plain.median("wall")
        for tool, stats in (("ours", plain), ("bundle", bundle)):
            walls = ", ".join(fmt(wall) for wall in stats.values("wall"))
            lines.append(
                f"| {result.workload.name} | {TOOL_NAMES[tool]} | {len(stats.runs)} "
                f"| {fmt(stats.median('wall'))} | {walls} | {fmt(stats.median('staging'))} "
                f"| {fmt(stats.median('ready_to_disk'))} "
                f"| {f'{ratio:.2f}x' if tool == 'bundle' else ''} |"
            )
    return lines


def render_resumes(resumes: Sequence[ResumeResult]) -> list[str]:
    if not resumes:
        return []
    lines = [
        "",
        "Resume: ours with `bundle=True` through a proxy that cuts the first GET at a fraction of its"
        " Content-Length (one run each, a cart of its own):",
        "",
        "| cart | cut at | bundle (bytes) | fetched in all (bytes) | fetched / bundle "
        "| GETs (Range → status) | wall (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for resume in resumes:
        gets = "; ".join(f"{rng or 'whole'} → {status}" for rng, status in resume.gets)
        lines.append(
            f"| {resume.name} | {resume.cut:.0%} | {resume.tar_bytes} | {resume.fetched} "
            f"| {resume.fetched / resume.tar_bytes:.3f}x "
            f"| {gets} | {fmt(resume.run.wall)} | {fmt(resume.run.rss_mb, 1)} |"
        )
    return lines


def render_memory(memory: MemoryResult) -> list[str]:
    lines = [
        "",
        "Peak RSS against the number of files — **fake Cartd, memory only** (`tests/fakecartd.py`:"
        f" ready at once, a plain tar of files of 0-{TINY_MAX} bytes; the event made of the smallest"
        " valid file objects, compact JSON, ours with `bundle=False`, a fresh process each):",
        "",
        "| files | event body (bytes) | wall (s) | peak RSS (MB) | VmHWM (MB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for point in memory.points:
        mark = (
            f" (largest under the {memory.body_limit // MB} MiB body limit)"
            if point.files == memory.largest
            else ""
        )
        lines.append(
            f"| {point.files}{mark} | {point.body_bytes} | {fmt(point.run.wall)} "
            f"| {fmt(point.run.rss_mb, 1)} "
            f"| {fmt(point.run.own_hwm_mb or 0, 1)} |"
        )
    slope = memory.slope_kib_per_file()
    if slope is not None:
        lines += ["", f"Slope (least squares over these points): {slope:.3f} KiB of peak RSS per file."]
    return lines


def targets(results: Results) -> list[str]:
    by_name = {result.workload.name: result for result in results.workloads}
    rows = []
    big = by_name.get("500MB")
    if big:
        ours, limit = big.stats["ours"].median("ready_to_disk"), big.stats["limit"].median("ready_to_disk")
        transfer = big.stats["ours"].median("transfer")
        ratio = ours / limit
        rows.append(
            f"| 500MB plain ready→disk <= {PLAIN_READY_TO_DISK_RATIO}x `curl \\| tar` (ours verifies sha1)"
            f" | {ratio:.2f}x ({fmt(ours)} s vs {fmt(limit)} s; ours' own transfer {fmt(transfer)} s ="
            f" {transfer / limit:.2f}x, the rest is its poll interval)"
            f" | {verdict(ratio <= PLAIN_READY_TO_DISK_RATIO)} |"
        )
        plain, bundle = big.stats["ours"].median("wall"), big.stats["bundle"].median("wall")
        ratio = bundle / plain
        rows.append(
            f"| 500MB bundle wall <= {BUNDLE_WALL_RATIO}x ours' plain wall | {ratio:.2f}x ({fmt(bundle)} s vs"
            f" {fmt(plain)} s, medians of {len(big.stats['bundle'].runs)})"
            f" | {verdict(ratio <= BUNDLE_WALL_RATIO)} |"
        )
    else:
        rows.append(
            f"| 500MB plain ready→disk <= {PLAIN_READY_TO_DISK_RATIO}x `curl \\| tar` | not measured | — |"
        )
        rows.append(f"| 500MB bundle wall <= {BUNDLE_WALL_RATIO}x ours' plain wall | not measured | — |")
    many = by_name.get("2000x4KiB")
    if many:
        ours, limit = many.stats["ours"].median("ready_to_disk"), many.stats["limit"].median("ready_to_disk")
        transfer = many.stats["ours"].median("transfer")
        ratio = ours / limit
        rows.append(
            f"| 2000x4KiB ready→disk <= {MANY_FILES_READY_TO_DISK_RATIO}x `curl \\| tar` | {ratio:.2f}x"
            f" ({fmt(ours)} s vs {fmt(limit)} s; ours' own transfer {fmt(transfer)} s ="
            f" {transfer / limit:.2f}x, the rest is its poll interval)"
            f" | {verdict(ratio <= MANY_FILES_READY_TO_DISK_RATIO)} |"
        )
    else:
        rows.append(
            f"| 2000x4KiB ready→disk <= {MANY_FILES_READY_TO_DISK_RATIO}x `curl \\| tar`"
            " | not measured (--quick) | — |"
        )
    for resume in results.resumes:
        ratio = resume.fetched / resume.tar_bytes
        worst = " (one file: the worst case for a resume from the file's header)" if resume.files == 1 else ""
        rows.append(
            f"| resume after a cut at {resume.cut:.0%}, {resume.name}{worst}:"
            f" bytes fetched <= {RESUME_BYTES_RATIO}x the bundle"
            f" | {ratio:.3f}x ({resume.fetched} / {resume.tar_bytes} bytes)"
            f" | {verdict(ratio <= RESUME_BYTES_RATIO)} |"
        )
    if not results.resumes:
        rows.append(f"| resume: bytes fetched <= {RESUME_BYTES_RATIO}x the bundle | not measured | — |")
    rss = {
        f"{result.workload.name} {TOOL_NAMES[tool]}": stats.peak_rss()
        for result in results.workloads
        for tool, stats in result.stats.items()
        if tool in ("ours", "bundle")
    }
    rss.update({f"resume {resume.name}": resume.run.rss_mb for resume in results.resumes})
    if results.memory is not None:
        rss.update({f"{point.files} files (fake Cartd)": point.run.rss_mb for point in results.memory.points})
    if rss:
        worst = max(rss, key=lambda name: rss[name])
        covered = ["3 files" if "small" in by_name else None]
        if results.memory is not None:
            covered.append(f"the largest event ({results.memory.largest} files)")
        covered.append("2 GB" if "2GB" in by_name else None)
        scope = ", ".join(c for c in covered if c) or "what was measured"
        rows.append(
            f"| ours' peak RSS <= {RSS_LIMIT_MB:.0f} MB from 3 files to the largest event and to 2 GB"
            f" (measured: {scope}) | {fmt(rss[worst], 1)} MB (largest, at {worst}; smallest"
            f" {fmt(min(rss.values()), 1)} MB) | {verdict(rss[worst] <= RSS_LIMIT_MB)} |"
        )
    small = by_name.get("small")
    if small:
        ours, upstream = small.stats["ours"].median("wall"), small.stats["upstream"].median("wall")
        limit = small.stats["limit"].median("wall")
        ratio = ours / upstream
        rows.append(
            f"| extra: small cart end to end <= {SMALL_WALL_RATIO}x upstream | {ratio:.2f}x"
            f" ({fmt(ours)} s vs {fmt(upstream)} s; staging + `curl \\| tar` alone: {limit / upstream:.2f}x)"
            f" | {verdict(ratio <= SMALL_WALL_RATIO)} |"
        )
    return rows


def render_service(service: ServiceResult) -> list[str]:
    lat = service.latencies
    others = (
        ", ".join(
            f"{n} x {'no answer' if s == NO_ANSWER else s}"
            for s, n in sorted(service.statuses.items())
            if s != 200
        )
        or "none"
    )
    return [
        "",
        f"Service (`downloader-service serve`, {SERVICE_WORKERS} workers, SQLite job store,"
        " synchronous answers):",
        "",
        "| measure | value |",
        "|---|---|",
        f"| concurrent events (1-3 small files each) | {service.events} |",
        f"| answered 200 | {service.answered_200} (others: {others}) |",
        "| Cartd tasks failed meanwhile (worker log; their carts never get ready) "
        f"| {service.cartd_task_failures} |",
        f"| files on disk and matching sha1 | {service.files_verified} / {service.files_expected} |",
        f"| latency p50 / p95 / max (s) | {fmt(percentile(lat, 0.5))} / {fmt(percentile(lat, 0.95))}"
        f" / {fmt(max(lat))} |",
        f"| all {service.events} answered after (s) | {fmt(service.burst_seconds)} |",
        f"| invalid events posted ({REJECT_THREADS} keep-alive clients; malformed JSON and an event"
        " without files, alternately) "
        f"| {service.reject_count / service.reject_seconds:.0f} requests/s "
        f"({service.reject_count} in {service.reject_seconds:.1f} s) |",
        *(
            f"| answers to {kind} | {', '.join(f'{n} x {s}' for s, n in statuses.items()) or 'none'} |"
            for kind, statuses in service.reject_statuses.items()
        ),
    ]


def write_report(path: Path, table: str, args: argparse.Namespace, code_began: str) -> None:
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(shlex.quote(part) for part in [".venv/bin/python", "benchmarks/run.py", *args.argv])
    text = "\n".join(
        [
            f"# Benchmark results, {when}",
            "",
            f"Command: `{command}`",
            "",
            *machine_facts(code_began, code_state()),
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


def preflight(upstream: bool = True) -> None:
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
    if upstream:
        ensure_upstream_venv()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the cleanup below


@contextlib.contextmanager
def session(upstream: bool = True) -> Iterator[Bench]:
    """The real stack in a temp dir of its own; every process stopped, every file removed after."""
    preflight(upstream)
    signal.signal(signal.SIGTERM, _terminate)
    children = Children()
    work = Path(tempfile.mkdtemp(prefix="pacifica-bench-"))
    # Cartd's database on PostgreSQL, as Pacifica runs it (on SQLite bursts strand carts).
    postgres = PostgresServer(work / "postgres")
    stack: PacificaStack | None = None
    try:
        log(f"starting PostgreSQL and the Pacifica stack in {work}")
        postgres.start(timeout=60)
        stack = PacificaStack(work / "stack", PACIFICA_VENV, database_url=postgres.create_database("cartd"))
        stack.start(timeout=90)
        yield Bench(work, stack, children)
    except BaseException:
        log("the benchmark failed or was interrupted: stopping every process and removing its files")
        raise
    finally:
        children.stop_all()
        if stack is not None:
            stack.stop()
        postgres.close()
        shutil.rmtree(work, ignore_errors=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke check: small, 100x1MB and 500MB (one run), one resume, memory up to 2000 files",
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


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    code_began = code_state()
    results = Results()

    def phase(name: str, since: float) -> None:
        now = time.monotonic()
        log(f"[{name}] done in {now - since:.0f} s; {now - began:.0f} s since the start")

    with session() as bench:
        for workload in WORKLOADS:
            runs = workload.run_count(args.quick, args.runs)
            if runs:
                since = time.monotonic()
                results.workloads.append(bench.workload(workload, runs))
                phase(workload.name, since)
        for name, sizes, cuts in QUICK_RESUME_SETS if args.quick else RESUME_SETS:
            since = time.monotonic()
            results.resumes += bench.resume(name, sizes, cuts)
            phase(f"resume {name}", since)
        since = time.monotonic()
        results.memory = bench.memory(QUICK_MEMORY_COUNTS if args.quick else MEMORY_COUNTS)
        phase("memory", since)
        since = time.monotonic()
        results.service = bench_service(bench)
        phase("service", since)
        table = render(results, args.quick, time.monotonic() - began)
    print(table)
    write_report(args.out, table, args, code_began)
    log(f"written to {args.out}; whole run {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
