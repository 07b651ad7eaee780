"""Soak: thousands of events of mixed outcomes through one ``serve``; do its resources plateau?

Usage::

    .venv/bin/python benchmarks/soak.py [--events 5000] [--every 500] [--out benchmarks/soak-results.md]

Runs ``downloader-service serve`` (SQLite store, 4 workers) against a fake Cartd in this
process and posts events in rounds of ``--every``: done (a good cart), failed (Cartd fails
the cart, a cut stream, a flipped byte), rejected (no files, an unsafe path), duplicates (an
event posted before, again), malformed requests (400, 415), plus 200 idle keep-alive
connections opened at two rounds and left for the server to close. After each round, once
the queue is empty, it records the server's RSS and open descriptors. It fails (exit 1)
when the last ``--tail`` events (2,000) still grow them: more than 2 descriptors, or more
than 4 MiB and 3 % of RSS. The curve goes to ``--out`` (markdown) and stdout.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devstack.pacifica import free_port  # noqa: E402
from tests.events import file_obj, make_event  # noqa: E402
from tests.fakecartd import Cart, FakeCartd, cart_tar, cut_after  # noqa: E402

SCRIPT = Path(sys.executable).with_name("downloader-service")
JSON = {"Content-Type": "application/json", "Prefer": "respond-async"}
# A file id's hundreds digit tells the fake Cartd how to misbehave for its cart.
GOOD, CART_ERROR, CUT, FLIPPED = 1, 2, 3, 4
KINDS = (
    "good",
    "good",
    "good",
    "duplicate",
    "cart_error",
    "cut",
    "flipped",
    "no_files",
    "unsafe",
    "malformed",
    "media",
)
IDLE_CONNECTIONS = 200


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fake_cartd() -> FakeCartd:
    fake = FakeCartd().start()

    def behaviour(cart: Cart) -> int:
        return int(cart.fileids[0]["id"]) // 100 % 10

    fake.head = lambda cart: (
        (500, "error", "hash mismatch") if behaviour(cart) == CART_ERROR else (204, "ready", "")
    )

    def body(cart: Cart, name: str) -> Any:
        data = cart_tar(cart.fileids, fake.contents, name)
        return cut_after(data, len(data) // 2) if behaviour(cart) == CUT else iter([data])

    fake.body = body
    return fake


class Load:
    """Builds each kind of request; remembers good events to post again as duplicates."""

    def __init__(self, cartd: FakeCartd) -> None:
        self.cartd = cartd
        self.sent: list[bytes] = []

    def event(self, behaviour: int, n: int) -> bytes:
        file_id = behaviour * 100 + n % 100 + 1000 * (n // 100 + 1)
        data = f"payload {n}\n".encode() * 50
        self.cartd.contents[str(file_id)] = b"X" + data[1:] if behaviour == FLIPPED else data
        return json.dumps(
            make_event([file_obj(file_id, f"f{n}.txt", f"d/{n % 7}", data)], event_id=f"soak-{n}")
        ).encode()

    def request(self, kind: str, n: int) -> tuple[bytes, dict[str, str], int]:
        if kind == "good":
            body = self.event(GOOD, n)
            self.sent.append(body)
            return body, JSON, 202
        if kind == "duplicate" and self.sent:
            return self.sent[n % len(self.sent)], JSON, 200  # known: answered as the job stands
        if kind in ("cart_error", "cut", "flipped", "duplicate"):
            behaviour = {"cart_error": CART_ERROR, "cut": CUT, "flipped": FLIPPED}.get(kind, GOOD)
            return self.event(behaviour, n), JSON, 202
        if kind == "no_files":
            return json.dumps(make_event([], event_id=f"e-{n}")).encode(), JSON, 200
        if kind == "unsafe":
            return (
                json.dumps(make_event([file_obj(5, "x", "../..", b"x")], event_id=f"u-{n}")).encode(),
                JSON,
                200,
            )
        if kind == "malformed":
            return b'{"eventID": ', JSON, 400
        return b"hello", {"Content-Type": "text/plain"}, 415


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """Keep-alive connections that send one request and then say nothing more."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(4096)
        opened.append(sock)
    return opened


def drained(url: str, timeout: float = 300) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = requests.get(f"{url}/health/ready", timeout=10).json().get("jobs", {})
        if jobs.get("queued", 0) == 0 and jobs.get("running", 0) == 0:
            return dict(jobs)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the queue did not drain: {jobs}")
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument(
        "--tail", type=int, default=2000, help="events at the end that must not grow anything"
    )
    parser.add_argument("--clients", type=int, default=32, help="requests at once (the default HTTP threads)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "soak-results.md"))
    args = parser.parse_args(argv)

    cartd = fake_cartd()
    load = Load(cartd)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CARTD_URL": cartd.url,
        "DOWNLOADER_STATE_DIR": str(work / "state"),
        "DOWNLOADER_ROOT": str(work / "root"),
        "DOWNLOADER_DATABASE_URL": "",
        "DOWNLOADER_WORKERS": "4",
        "DOWNLOADER_RETRY_WINDOW": "0",  # every failure final at once: each round ends
        "DOWNLOADER_RETENTION": "0",
        "DOWNLOADER_IDLE_TIMEOUT": "2",
        "DOWNLOADER_LOG_LEVEL": "WARNING",
    }
    log = open(work / "serve.log", "wb")  # noqa: SIM115 - open for the whole run
    proc = subprocess.Popen([str(SCRIPT), "serve", "--port", str(port)], env=env, stdout=log, stderr=log)
    began = time.monotonic()
    samples: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    counter = itertools.count()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(url + "/health/live", timeout=1)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((work / "serve.log").read_text()) from None
                time.sleep(0.05)
        samples.append({"events": 0, "fds": fds(proc.pid), "rss_kb": rss_kb(proc.pid), "seconds": 0.0})

        def post(n: int, session: requests.Session) -> None:
            kind = KINDS[n % len(KINDS)]
            body, headers, expected = load.request(kind, n)
            resp = session.post(url, data=body, headers=headers, timeout=60)
            if resp.status_code not in (expected, 200, 202):
                raise RuntimeError(f"{kind}: {resp.status_code} {resp.text[:300]}")
            outcomes[kind] += 1

        sessions = [requests.Session() for _ in range(args.clients)]
        rounds = args.events // args.every
        for round_number in range(rounds):
            idle = idle_connections(port, IDLE_CONNECTIONS) if round_number in (1, rounds // 2) else []
            numbers = [next(counter) for _ in range(args.every)]
            with ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(lambda n: post(n, sessions[n % args.clients]), numbers))
            for sock in idle:
                sock.close()
            jobs = drained(url)
            time.sleep(2.5)  # past the idle timeout: what the server keeps now, it keeps
            samples.append(
                {
                    "events": (round_number + 1) * args.every,
                    "fds": fds(proc.pid),
                    "rss_kb": rss_kb(proc.pid),
                    "seconds": round(time.monotonic() - began, 1),
                    "jobs": jobs,
                }
            )
            print(json.dumps(samples[-1]), flush=True)
        for session in sessions:
            session.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        cartd.stop()

    mark = next(s for s in samples if s["events"] >= args.events - args.tail)
    last = samples[-1]
    peak_fds = max(s["fds"] for s in samples if s["events"] >= mark["events"])
    peak_rss = max(s["rss_kb"] for s in samples if s["events"] >= mark["events"])
    fd_growth, rss_growth = peak_fds - mark["fds"], peak_rss - mark["rss_kb"]
    holds = fd_growth <= 2 and (rss_growth <= 4096 or rss_growth <= 0.03 * mark["rss_kb"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    lines = [
        "# Soak: resources of one `serve` over thousands of mixed events",
        "",
        f"{datetime.date.today()}, commit {commit.stdout.strip()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; `{' '.join(['.venv/bin/python', 'benchmarks/soak.py', *argv])}`.",
        f"{args.clients} clients at once. Requests by kind: {dict(sorted(outcomes.items()))}; "
        f"{IDLE_CONNECTIONS} idle keep-alive "
        f"connections opened in rounds 2 and {rounds // 2 + 1}.",
        "",
        "| events | open fds | RSS (MiB) | seconds |",
        "|---:|---:|---:|---:|",
        *(f"| {s['events']} | {s['fds']} | {s['rss_kb'] / 1024:.1f} | {s['seconds']} |" for s in samples),
        "",
        f"Last {args.tail} events (from {mark['events']}): descriptors {mark['fds']} -> at most {peak_fds} "
        f"({fd_growth:+d}), RSS {mark['rss_kb'] / 1024:.1f} -> at most {peak_rss / 1024:.1f} MiB "
        f"({rss_growth / 1024:+.1f}); final {last['fds']} fds, {last['rss_kb'] / 1024:.1f} MiB: "
        + ("**plateau**." if holds else "**still growing**."),
        "",
    ]
    Path(args.out).write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
