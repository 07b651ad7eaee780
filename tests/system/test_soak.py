"""A bounded soak: mixed good and bad events through the served app for about a minute.

Every answer must be the one its kind deserves; the server's open file descriptors and
memory must not grow; the download root must hold exactly the successful downloads.
``SOAK_SECONDS`` changes the length (default 60).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import served
from tests.events import file_obj, make_event
from tests.fakecartd import Cart, FakeCartd, cart_tar, cut_after

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
WARM_UP = min(10.0, SOAK_SECONDS / 4)
JSON = {"Content-Type": "application/json"}
# A file id's hundreds digit tells the fake Cartd how to misbehave for its cart.
GOOD, CART_ERROR, CUT, FLIPPED = 1, 2, 3, 4


def behaviour(cart: Cart) -> int:
    return int(cart.fileids[0]["id"]) // 100 % 10


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def proc_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def soak_cartd(fake_cartd: FakeCartd) -> FakeCartd:
    fake_cartd.head = lambda cart: (
        (500, "error", "hash mismatch") if behaviour(cart) == CART_ERROR else (204, "ready", "")
    )

    def body(cart: Cart, name: str) -> Iterator[bytes]:
        data = cart_tar(cart.fileids, fake_cartd.contents, name)
        return cut_after(data, len(data) // 2) if behaviour(cart) == CUT else iter([data])

    fake_cartd.body = body
    return fake_cartd


def test_soak_mixed_events_leak_nothing(soak_cartd: FakeCartd, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    env = {
        "CARTD_URL": soak_cartd.url,
        "DOWNLOADER_ROOT": str(root),
        "DOWNLOADER_WORKERS": "4",
        # Every failure final at once, so that each answer tells its kind's end.
        "DOWNLOADER_RETRY_WINDOW": "0",
        "DOWNLOADER_LOG_LEVEL": "WARNING",
    }
    counter = itertools.count()
    lock = threading.Lock()
    done_paths: set[str] = set()
    outcomes: Counter[str] = Counter()

    def event(kind: int, n: int) -> dict[str, Any]:
        file_id = kind * 100 + n % 100 + 1000 * (n // 100 + 1)
        data = f"payload {n}\n".encode() * 50
        soak_cartd.contents[str(file_id)] = b"X" + data[1:] if kind == FLIPPED else data
        return make_event([file_obj(file_id, f"f{n}.txt", f"d/{n % 7}", data)], event_id=f"soak-{n}")

    # name -> (build the request, expected status, expected job state). Malformed requests
    # are refused; everything that is a CloudEvent is recorded and answered 200 with its end.
    Build = Callable[[int], tuple[bytes, dict[str, str]]]
    requests_by_kind: dict[str, tuple[Build, int, str | None]] = {
        "good": (lambda n: (json.dumps(event(GOOD, n)).encode(), JSON), 200, "done"),
        "malformed": (lambda n: (b'{"eventID": ', JSON), 400, None),
        "no_files": (
            lambda n: (json.dumps(make_event([], event_id=f"e-{n}")).encode(), JSON),
            200,
            "rejected",
        ),
        "unsafe": (
            lambda n: (
                json.dumps(make_event([file_obj(5, "x", "../..", b"x")], event_id=f"u-{n}")).encode(),
                JSON,
            ),
            200,
            "rejected",
        ),
        "media": (lambda n: (b"hello", {"Content-Type": "text/plain"}), 415, None),
        "cart_error": (lambda n: (json.dumps(event(CART_ERROR, n)).encode(), JSON), 200, "failed"),
        "cut": (lambda n: (json.dumps(event(CUT, n)).encode(), JSON), 200, "failed"),
        "flipped": (lambda n: (json.dumps(event(FLIPPED, n)).encode(), JSON), 200, "failed"),
    }
    kinds = list(requests_by_kind)

    with served(env, tmp_path / "server.log") as (url, proc):

        def worker(deadline: float) -> None:
            session = requests.Session()
            while time.monotonic() < deadline:
                n = next(counter)
                kind = kinds[n % len(kinds)]
                build, expected, state = requests_by_kind[kind]
                payload, headers = build(n)
                resp = session.post(url, data=payload, headers=headers, timeout=30)
                assert resp.status_code == expected, (kind, resp.status_code, resp.text)
                answer = resp.json()
                assert answer.get("state") == state, (kind, answer)
                with lock:
                    outcomes[kind] += 1
                    if kind == "good":
                        done_paths.add(answer["download_path"])
                    else:
                        assert "download_path" not in answer, answer
            session.close()

        start = time.monotonic()
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(worker, start + WARM_UP) for _ in range(6)]
            for future in futures:
                future.result()
            fds_warm, rss_warm = proc_fds(proc.pid), proc_rss_kb(proc.pid)
            futures = [pool.submit(worker, start + SOAK_SECONDS) for _ in range(6)]
            for future in futures:
                future.result()
        fds_end, rss_end = proc_fds(proc.pid), proc_rss_kb(proc.pid)
        health = requests.get(url + "/health", timeout=5).json()

    assert health["worker"]["running"] == 0
    assert health["jobs"]["queued"] == 0
    assert all(outcomes[kind] > 0 for kind in kinds), outcomes
    assert fds_end <= fds_warm + 5, (fds_warm, fds_end)
    assert rss_end <= rss_warm + 8_000, (rss_warm, rss_end)  # kB; keeping tracebacks once grew 15 MB
    on_disk = {str(path) for path in root.iterdir()}
    assert on_disk == done_paths  # every success is there, every failure left nothing
    assert not list(root.rglob(".data.part-*"))
    print(
        f"\nsoak: {sum(outcomes.values())} requests in {SOAK_SECONDS:g} s {dict(outcomes)}; "
        f"fds {fds_warm}->{fds_end}, rss {rss_warm}->{rss_end} kB"
    )
