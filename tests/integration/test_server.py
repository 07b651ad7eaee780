"""The console script serving on a real socket: what the WSGI tests cannot show."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import served
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd

SCRIPT = Path(sys.executable).with_name("downloader-service")


@pytest.fixture
def server(fake_cartd: FakeCartd, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    root = tmp_path / "root"
    root.mkdir()
    env = {"CARTD_URL": fake_cartd.url, "DOWNLOADER_ROOT": str(root), "DOWNLOADER_MAX_BODY_BYTES": "100000"}
    with served(env, tmp_path / "server.log") as (url, proc):
        yield url, proc, tmp_path / "server.log"


def test_served_app_downloads_and_logs_json_lines(
    server: tuple[str, subprocess.Popen[bytes], Path], fake_cartd: FakeCartd
) -> None:
    url, proc, log = server
    fake_cartd.add(5, b"five")
    event = make_event([file_obj(5, "five.txt", "n", b"five")], event_id="served-1")
    resp = requests.post(url, json=event, timeout=30)
    assert resp.status_code == 200, resp.text
    assert (Path(resp.json()["download_path"]) / "data/n/five.txt").read_bytes() == b"five"

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    done = [r for r in records if r["message"] == "event downloaded"]
    assert len(done) == 1
    assert done[0]["event_id"] == "served-1"
    assert done[0]["files"] == 1
    assert done[0]["bytes"] == 4
    assert done[0]["cart_url"].startswith(fake_cartd.url)


def test_chunked_body_over_limit_is_413_without_reading_it_all(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _proc, _log = server
    host, port = url.removeprefix("http://").split(":")
    chunk = b"%x\r\n%s\r\n" % (10_000, b" " * 10_000)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        # limit + 1 bytes of body, and the body never ends (no last chunk). Sending more than
        # the server reads would race its close: unread data makes the kernel reset the
        # connection, and the 413 can be lost with it, or the send itself breaks the pipe.
        for _ in range(10):
            sock.sendall(chunk)
        sock.sendall(b"1\r\n \r\n")
        reply = b""
        while True:  # a server waiting for the end of the body makes recv time out here
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"Connection: close" in head
    assert json.loads(rest)["error"] == "payload_too_large"


def test_declared_length_over_limit_is_413(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, _proc, _log = server
    resp = requests.post(url, data=b"{" * 200_000, headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 413
    assert resp.json()["error"] == "payload_too_large"
