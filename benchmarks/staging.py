"""Cartd's staging on SQLite against PostgreSQL: time per file, and carts lost in a burst.

Run from the repository root, by hand (it is not a test)::

    .venv/bin/python benchmarks/staging.py [--files 200] [--burst 20] [--runs 2] [--out FILE]

For each database it starts the real Archive Interface + Cartd (``devstack/pacifica.py``):
on a SQLite file with one Celery worker process (more deadlock), and on PostgreSQL
(``devstack/postgres.py``) with one, as the tests, the demo and the benchmarks now run it,
and with two.
Then, ``--runs`` times: one cart of ``--files`` files of 4 KiB, timed from its POST to
``ready`` (a ``HEAD`` every 5 ms), per file; and a burst of ``--burst`` carts of 3 files
POSTed at once from as many threads, each timed to ``ready``; a cart not ready after 60 s
counts as stuck (Cartd's worker failed its task). Everything binds 127.0.0.1, lives in one
temp directory and is stopped by PID before the script exits.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.run import code_state  # noqa: E402
from benchmarks.scale import log, machine  # noqa: E402
from devstack.pacifica import PacificaStack  # noqa: E402
from devstack.postgres import PostgresServer  # noqa: E402
from tests.fakecartd import sha1  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "staging-results.md"
FILE_BYTES = 4096
STUCK_AFTER = 60.0
POLL = 0.005
POST_TRIES = 10
RESETS = [0]  # cart POSTs whose connection Cartd reset (sent again)
RESETS_LOCK = threading.Lock()

STACK_LINE = (
    "- everything on 127.0.0.1: PostgreSQL (devstack/postgres.py: fsync on, synchronous_commit on), "
    "the real Cartd 0.7.0 + Archive Interface 0.4.2 (devstack/pacifica.py, filesystem broker polled "
    "every 50 ms) and this script"
)


@dataclass
class Backend:
    name: str
    per_file_ms: list[float] = field(default_factory=list)
    burst_ready: list[float] = field(default_factory=list)  # seconds to ready, carts that got there
    burst_all: list[float] = field(default_factory=list)  # seconds until the burst's last ready cart
    stuck: int = 0
    carts: int = 0
    resets: int = 0
    loads: list[float] = field(default_factory=list)


class Ids:
    def __init__(self) -> None:
        self.next = 5000
        self.lock = threading.Lock()

    def take(self) -> int:
        with self.lock:
            self.next += 1
            return self.next


def store_files(stack: PacificaStack, ids: Ids, count: int) -> list[dict[str, str]]:
    fileids = []
    for _ in range(count):
        file_id = ids.take()
        data = os.urandom(FILE_BYTES)
        stack.put_file(file_id, data)
        fileids.append(
            {"id": str(file_id), "path": f"s/{file_id}.bin", "hashtype": "sha1", "hashsum": sha1(data)}
        )
    return fileids


def staged(session: requests.Session, cartd: str, fileids: list[dict[str, str]]) -> float | None:
    """POST a cart and wait for ``ready``: seconds, or None if stuck (or failed) after STUCK_AFTER."""
    url = f"{cartd}/{uuid.uuid4().hex}"
    began = time.monotonic()
    for attempt in range(POST_TRIES):
        try:
            resp = session.post(url, json={"fileids": fileids}, timeout=60)
            break
        except requests.ConnectionError:
            # Cartd's CherryPy listens with a backlog of 5: a burst gets some connections
            # reset. Sent again, as a sender would; counted, and the time still runs.
            with RESETS_LOCK:
                RESETS[0] += 1
            if attempt == POST_TRIES - 1:
                raise
            time.sleep(0.1)
    resp.raise_for_status()
    try:
        while time.monotonic() - began < STUCK_AFTER:
            head = session.head(url, timeout=30)
            if head.headers.get("X-Pacifica-Status") == "ready":
                return time.monotonic() - began
            if head.status_code >= 500:
                return None
            time.sleep(POLL)
        return None
    finally:
        session.delete(url, timeout=120)


def measure(stack: PacificaStack, backend: Backend, args: argparse.Namespace, ids: Ids) -> None:
    session = requests.Session()
    for run in range(args.runs):
        backend.loads.append(os.getloadavg()[0])
        files = store_files(stack, ids, args.files)
        took = staged(session, stack.cartd_url, files)
        backend.carts += 1
        if took is None:
            backend.stuck += 1
        else:
            backend.per_file_ms.append(1000 * took / args.files)
        log(f"[staging] {backend.name} run {run}: {args.files} files in {took} s")
        resets = RESETS[0]
        ready = burst([store_files(stack, ids, 3) for _ in range(args.burst)], stack.cartd_url)
        backend.resets += RESETS[0] - resets
        backend.carts += args.burst
        backend.stuck += args.burst - len(ready)
        backend.burst_ready += ready
        if ready:
            backend.burst_all.append(max(ready))
        last = max(ready or [0.0])
        log(f"[staging] {backend.name} burst {run}: {len(ready)}/{args.burst} ready, last at {last:.2f} s")


def burst(carts: list[list[dict[str, str]]], cartd: str) -> list[float]:
    """POST every cart at once (a thread each); the seconds to ``ready`` of those that got there."""
    results: list[float | None] = [None] * len(carts)
    barrier = threading.Barrier(len(carts))

    def one(index: int) -> None:
        barrier.wait()
        with requests.Session() as own:
            results[index] = staged(own, cartd, carts[index])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(len(carts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [value for value in results if value is not None]


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200, help="files in the timed cart (200)")
    parser.add_argument("--burst", type=int, default=20, help="carts of 3 files posted at once (20)")
    parser.add_argument("--runs", type=int, default=2, help="runs per database (2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown report ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    began = time.monotonic()
    code = code_state()
    work = Path(tempfile.mkdtemp(prefix="downloader-staging-"))
    pg = PostgresServer(work / "postgres")
    ids = Ids()
    backends = []
    try:
        pg.start(timeout=60)
        setups = (("SQLite", False, 1), ("PostgreSQL", True, 1), ("PostgreSQL", True, 2))
        for name, postgres, workers in setups:
            backend = Backend(f"{name}, {workers} worker process{'es' if workers > 1 else ''}")
            database = pg.create_database(f"cartd_{len(backends)}") if postgres else None
            with PacificaStack(
                work / f"stack-{len(backends)}",
                REPO / ".venv-pacifica",
                database_url=database,
                worker_processes=workers,
            ) as stack:
                measure(stack, backend, args, ids)
            backends.append(backend)
    finally:
        pg.close()
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"One cart of {args.files} files of {FILE_BYTES // 1024} KiB, POST to `ready`, and a burst of "
        f"{args.burst} carts of 3 files posted at once; {args.runs} runs per database.",
        "",
        "| Cartd database | staging per file, ms (each run) | burst: carts ready, median s "
        "| burst: last ready, s | carts stuck (not ready in 60 s) | burst POSTs reset by Cartd, sent again "
        "| load average at the runs' starts |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for b in backends:
        runs = ", ".join(f"{value:.1f}" for value in b.per_file_ms) or "—"
        median = f"{statistics.median(b.burst_ready):.2f}" if b.burst_ready else "—"
        last = ", ".join(f"{value:.2f}" for value in b.burst_all) or "—"
        loads = ", ".join(f"{value:.2f}" for value in b.loads)
        lines.append(
            f"| {b.name} | {runs} | {median} | {last} | {b.stuck} of {b.carts} | {b.resets} | {loads} |"
        )
    table = "\n".join(lines) + "\n"
    print(table)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([".venv/bin/python", "benchmarks/staging.py", *argv])
    args.out.write_text(
        "\n".join(
            [
                f"# Cartd staging benchmark, {when}",
                "",
                f"Command: `{command}`",
                "",
                f"- code: {code}",
                machine()[0],
                STACK_LINE,
                "",
                table,
            ]
        )
        + f"\nWhole run: {time.monotonic() - began:.0f} s.\n",
        encoding="utf-8",
    )
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
