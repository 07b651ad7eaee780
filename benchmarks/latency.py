"""Service latency: a small event through ``serve`` in sync mode against the library alone.

Run from the repository root, by hand (it is not a test)::

    .venv/bin/python benchmarks/latency.py [--runs 15] [--baseline DIR] [--out FILE]

It starts the real Archive Interface + Cartd (``devstack/pacifica.py``) and a PostgreSQL
server (``devstack/postgres.py``), stores three small files (3, 5 and 8 KiB) in the archive,
and starts these services against that Cartd:

Cartd's database is that PostgreSQL too (one Celery worker process), as the tests run it.

- ``serve`` on a SQLite job store with one download thread in the same process;
- ``serve`` on a PostgreSQL job store with one download thread in the same process;
- an intake-only ``serve`` and a ``downloader-service worker`` process on one PostgreSQL
  store: the job's end reaches the waiting request from another process (LISTEN/NOTIFY).
  The worker polls for new jobs every 0.05 s (``DOWNLOADER_POLL_INTERVAL``; nothing wakes a
  worker in another process when a job arrives), so this row includes up to 50 ms of that.

With ``--baseline DIR`` (a checkout of other code, e.g. ``git archive <commit> | tar -x -C
DIR``) the same services run a second time from that code, side by side, so that before and
after are measured in one run on the same Cartd.

Each run is one cart of the same three files per path, interleaved: the library alone
(``Downloader(None, cartd).download(files, "data", DIR)`` in this process, warm, with a
keep-alive session as the service's worker has) from the call to its return, then each
service: ``POST /`` (CloudEvents 0.1, no ``Prefer``) to the answer, which must be 200 with
``state`` ``done``. The report gives each path's median and 90th percentile, and its
difference to and ratio against the library's median in the same run. Everything binds
127.0.0.1, lives in one temp directory and is stopped by PID before the script exits.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import code_state  # noqa: E402
from benchmarks.scale import HOST, BenchmarkError, Processes, log, machine, service_env, wait_for  # noqa: E402
from devstack.pacifica import PacificaStack, free_port  # noqa: E402
from devstack.postgres import PostgresServer  # noqa: E402
from downloader_service import CloudEvent, Downloader  # noqa: E402
from tests.events import file_obj, make_event  # noqa: E402

PYTHON = REPO / ".venv" / "bin" / "python"
DEFAULT_OUT = REPO / "benchmarks" / "latency-results.md"
TARGET_MS = 30.0  # the service may add at most this to the library's median
SIZES = (3 * 1024, 5 * 1024, 8 * 1024)
CART_TIMEOUT = "30"  # a cart Cartd never stages costs 30 s, not 120
QUIET_LOAD = 0.5
QUIET_WAIT = 180.0  # seconds, at most, waiting for the machine to be quiet

STACK_LINE = (
    "- everything on 127.0.0.1: PostgreSQL (devstack/postgres.py: fsync on, synchronous_commit on), "
    "the real Cartd 0.7.0 (on that PostgreSQL, one Celery worker process) + Archive Interface 0.4.2 "
    "(devstack/pacifica.py, filesystem broker polled every 50 ms), the services and this script"
)


@dataclass
class Route:
    """One way of downloading the event, and what each run of it took."""

    name: str
    url: str | None = None  # None: the library alone
    seconds: list[float] = field(default_factory=list)
    # The service's own part of each run: its wall time less the worker's download call (the
    # answer's ``seconds``), which holds Cartd's staging and so most of the runs' spread.
    added: list[float] = field(default_factory=list)
    other: Counter[str] = field(default_factory=Counter)

    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds) if self.seconds else float("nan")

    def added_ms(self) -> float:
        return 1000 * statistics.median(self.added) if self.added else float("nan")

    def p90_ms(self) -> float:
        values = sorted(self.seconds)
        return 1000 * values[min(len(values) - 1, int(len(values) * 0.9))] if values else float("nan")


def wait_for_quiet(limit: float) -> float:
    """Wait (at most ``limit`` s) for the 1-minute load average to fall below QUIET_LOAD."""
    deadline = time.monotonic() + limit
    while os.getloadavg()[0] >= QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(5)
    load = os.getloadavg()[0]
    if load >= QUIET_LOAD:
        log(f"[quiet] load average {load:.2f} after {limit:.0f} s; measuring anyway")
    return load


def spawn_service(
    procs: Processes, work: Path, name: str, command: str, env: dict[str, str], code: Path | None
) -> subprocess.Popen[bytes]:
    """``downloader-service <command>`` from this checkout, or from the code in ``code``."""
    full = service_env(work, env)
    if code is not None:
        # Ahead of the editable install's finder: the package is imported from ``code``.
        full["PYTHONPATH"] = str(code)
    # -P: not the current directory first on sys.path (this checkout), so PYTHONPATH decides.
    argv = [str(PYTHON), "-P", "-c", "from downloader_service.cli import run; run()", command]
    if command == "serve":
        argv += ["--host", HOST, "--port", env["DOWNLOADER_PORT"]]
    return procs.spawn(argv, full, work / f"{name}.log")


def start_paths(
    procs: Processes, work: Path, stack: PacificaStack, pg: PostgresServer, code: Path | None, tag: str
) -> list[Route]:
    """The three service set-ups of the module docstring, from ``code`` (None: this checkout)."""
    suffix = "" if code is None else f" [{tag}]"
    base = {
        "CARTD_URL": stack.cartd_url,
        "DOWNLOADER_CART_TIMEOUT": CART_TIMEOUT,
        "DOWNLOADER_SYNC_WAIT": "60",
    }
    setups = [
        (f"serve, SQLite, 1 worker thread in it{suffix}", {"DOWNLOADER_WORKERS": "1"}, None),
        (
            f"serve, PostgreSQL, 1 worker thread in it{suffix}",
            {"DOWNLOADER_WORKERS": "1", "DOWNLOADER_DATABASE_URL": pg.create_database(f"lat_one_{tag}")},
            None,
        ),
        (
            f"serve (intake only) + worker process, PostgreSQL{suffix}",
            {"DOWNLOADER_WORKERS": "0", "DOWNLOADER_DATABASE_URL": pg.create_database(f"lat_two_{tag}")},
            {"DOWNLOADER_WORKERS": "1", "DOWNLOADER_POLL_INTERVAL": "0.05", "DOWNLOADER_LOG_LEVEL": "INFO"},
        ),
    ]
    paths = []
    for number, (name, env, worker_env) in enumerate(setups):
        label = f"{tag}-{number}"
        port = str(free_port(HOST))
        common = {**base, **env, "DOWNLOADER_ROOT": str(work / f"root-{label}")}
        common["DOWNLOADER_STATE_DIR"] = str(work / f"state-{label}")
        serve_env = {**common, "DOWNLOADER_PORT": port}
        proc = spawn_service(procs, work, f"serve-{label}", "serve", serve_env, code)
        url = f"http://{HOST}:{port}"
        wait_for(functools.partial(answers, url), 60, f"serve {label}", proc, work / f"serve-{label}.log")
        if worker_env is not None:
            logfile = work / f"worker-{label}.log"
            worker = spawn_service(procs, work, f"worker-{label}", "worker", {**common, **worker_env}, code)
            wait_for(functools.partial(says_working, logfile), 60, "worker", worker, logfile)
        paths.append(Route(name, url))
    return paths


def says_working(logfile: Path) -> bool:
    return b'"working"' in logfile.read_bytes()


def answers(url: str) -> bool:
    try:
        return requests.get(url + "/health/live", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def post_sync(path: Route, event: dict[str, object]) -> None:
    """POST the event and wait for the answer; a 200 with ``done`` counts, anything else is noted."""
    host, port = path.url.removeprefix("http://").split(":") if path.url else ("", "0")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps(event).encode()
    try:
        began = time.monotonic()
        conn.request("POST", "/", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        answer = resp.read()
        took = time.monotonic() - began
    finally:
        conn.close()
    document = json.loads(answer) if resp.status in (200, 202) else {}
    state = document.get("state")
    if resp.status == 200 and state == "done":
        path.seconds.append(took)
        path.added.append(took - float(document["seconds"]))
    else:
        path.other[f"{resp.status} {state}"] += 1


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=15, help="runs per path (15)")
    parser.add_argument("--baseline", type=Path, help="also run the services from the code in this directory")
    parser.add_argument("--baseline-name", default="baseline", help="how the report names --baseline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown report ({DEFAULT_OUT})")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=QUIET_WAIT,
        help=f"seconds to wait for a load average under {QUIET_LOAD} before measuring ({QUIET_WAIT:g})",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    began = time.monotonic()
    code_began = code_state()
    work = Path(tempfile.mkdtemp(prefix="downloader-latency-"))
    procs = Processes()
    pg = PostgresServer(work / "postgres")
    stack: PacificaStack | None = None
    loads: list[float] = []
    try:
        pg.start(timeout=60)
        stack = PacificaStack(
            work / "stack", REPO / ".venv-pacifica", database_url=pg.create_database("cartd")
        )
        stack.start(timeout=120)
        objs = []
        for number, size in enumerate(SIZES):
            data = os.urandom(size)
            stack.put_file(900 + number, data)
            objs.append(file_obj(900 + number, f"f{number}.bin", "bench/latency", data))
        library = Route("library alone (Downloader.download, this process)")
        paths = [library, *start_paths(procs, work, stack, pg, None, "this")]
        if args.baseline is not None:
            paths += start_paths(procs, work, stack, pg, args.baseline.resolve(), args.baseline_name)
        files = CloudEvent.files(make_event(objs, version="1.0"))
        session = requests.Session()
        load_before = wait_for_quiet(args.quiet_wait)
        log(f"[latency] load average {load_before:.2f}; {args.runs} runs of {len(paths)} paths")
        for run in range(args.runs + 1):  # run 0 warms every path up and is not counted
            loads.append(os.getloadavg()[0])
            for path in paths:
                if path.url is None:
                    target = work / f"library-{run}"
                    target.mkdir()
                    started = time.monotonic()
                    Downloader(
                        None, stack.cartd_url, session=session, cart_timeout=float(CART_TIMEOUT)
                    ).download(files, "data", target)
                    took = time.monotonic() - started
                    shutil.rmtree(target)
                    if run:
                        path.seconds.append(took)
                else:
                    counted = Route(path.name, path.url) if not run else path
                    post_sync(counted, make_event(objs, event_id=f"lat-{run}-{paths.index(path)}"))
            log(f"[latency] run {run}: " + ", ".join(f"{p.median_ms():.0f}" for p in paths))
        table = render(paths, args, loads, load_before)
    finally:
        procs.stop_all()
        if stack is not None:
            stack.stop()
        pg.close()
        shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - began
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([".venv/bin/python", "benchmarks/latency.py", *argv])
    code_ended = code_state()
    code = f"- code: {code_began}" + ("" if code_ended == code_began else f" (at the end: {code_ended})")
    text = "\n".join(
        [
            f"# Service latency benchmark, {when}",
            "",
            f"Command: `{command}`",
            "",
            code,
            machine()[0],
            STACK_LINE,
            "",
            table,
        ]
    )
    text += f"\nWhole run: {elapsed:.0f} s.\n"
    print(table)
    args.out.write_text(text, encoding="utf-8")
    log(f"written to {args.out}")
    return 0


def render(paths: list[Route], args: argparse.Namespace, loads: list[float], load_before: float) -> str:
    library = paths[0]
    base = library.median_ms()
    lines = [
        f"Three files (3, 5 and 8 KiB) from the real Cartd 0.7.0 (devstack/pacifica.py), a fresh cart "
        f"per run, {args.runs} interleaved runs per path (plus one warm-up, not counted); "
        f"load average {load_before:.2f} before the runs, median {statistics.median(loads):.2f} "
        f"at the runs' starts (max {max(loads):.2f}).",
        "",
        "| path | runs | median (ms) | p90 (ms) | median - library (ms) | / library "
        "| service's own part: wall - worker's download call, median (ms) | other answers |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for path in paths:
        other = ", ".join(f"{n} x {what}" for what, n in path.other.items()) or "none"
        added = f"{path.added_ms():.1f}" if path.added else "—"
        lines.append(
            f"| {path.name} | {len(path.seconds)} | {path.median_ms():.0f} | {path.p90_ms():.0f} "
            f"| {path.median_ms() - base:+.0f} | {path.median_ms() / base:.2f}x | {added} | {other} |"
        )
    lines += [
        "",
        "Cartd's staging (a directory broker polled every 50 ms) makes most of each run's time and "
        "its spread; the last column takes it out: what the service adds around the library's "
        "download call, from the POST to the answer.",
        "",
        "| target | measured: median - library's; service's own part | verdict |",
        "|---|---|---|",
    ]
    for path in paths[1:]:
        extra = path.median_ms() - base
        verdict = "**met**" if max(extra, path.added_ms()) <= TARGET_MS else "**missed**"
        lines.append(
            f"| {path.name}: ≤ library + {TARGET_MS:.0f} ms | {extra:+.0f} ms; {path.added_ms():.1f} ms "
            f"| {verdict} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchmarkError as exc:
        sys.exit(f"latency: {exc}")
