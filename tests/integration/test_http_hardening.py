"""The served HTTP edge against hostile clients: framing, nesting, slow sockets, secrets, SIGTERM.

Every test talks to the console script on 127.0.0.1 through real sockets (``served()``),
with a bounded number of connections that all end by themselves.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import select
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from downloader_service.service.logs import JsonFormatter, redact
from downloader_service.service.store import open_store
from tests.conftest import served
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd

NESTED = b"[" * 100_000 + b"]" * 100_000
BINARY_HEADERS = (
    b"ce-specversion: 1.0\r\nce-id: deep\r\nce-source: /t\r\nce-type: org.pacifica.metadata.ingest\r\n"
)


@pytest.fixture
def server(fake_cartd: FakeCartd, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    root = tmp_path / "root"
    root.mkdir()
    env = {
        "CARTD_URL": fake_cartd.url,
        "DOWNLOADER_ROOT": str(root),
        "DOWNLOADER_MAX_BODY_BYTES": "1000000",
        "DOWNLOADER_REQUEST_TIMEOUT": "3",
        "DOWNLOADER_IDLE_TIMEOUT": "2",
        "DOWNLOADER_TOKEN": "s3cret-token",
    }
    with served(env, tmp_path / "server.log") as (url, proc):
        yield url, proc, tmp_path / "server.log"


def started(log: Path) -> None:
    """Wait until CherryPy's bus has started: SIGTERM before that ends the process with 70."""
    deadline = time.monotonic() + 10
    while "ENGINE Bus STARTED" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def exchange(url: str, request: bytes, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; ``(status, headers, body)`` of the answer."""
    with socket.create_connection(address(url), timeout=timeout) as sock:
        sock.sendall(request)
        reply = b""
        while data := sock.recv(65536):  # a server still waiting makes this time out
            reply += data
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def post(content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST / HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s3cret-token\r\nContent-Type: "
        + content_type
        + b"\r\n"
        + extra
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
    )


@pytest.mark.parametrize(
    ("content_type", "extra"),
    [
        (b"application/json", b""),
        (b"application/cloudevents+json", b""),
        (b"application/cloudevents-batch+json", b""),
        (b"application/json", BINARY_HEADERS),
    ],
    ids=["json", "structured", "batch", "binary"],
)
def test_deeply_nested_body_is_400_invalid_event(
    server: tuple[str, subprocess.Popen[bytes], Path], content_type: bytes, extra: bytes
) -> None:
    url, _proc, log = server
    status, _headers, body = exchange(url, post(content_type, NESTED, extra))
    assert status == 400, body
    answer = json.loads(body)
    assert answer["error"] == "invalid_event"
    assert "64" in answer["detail"]
    assert "Traceback" not in log.read_text()


def test_malformed_chunk_size_is_400_json(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, _proc, _log = server
    request = (
        b"POST / HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s3cret-token\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n"
    )
    status, headers, body = exchange(url, request)
    assert status == 400
    assert headers["Connection"] == "close"
    assert json.loads(body)["error"] == "bad_request"


def test_negative_content_length_is_400_json(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, _proc, _log = server
    status, headers, body = exchange(
        url, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: -5\r\n\r\n{}"
    )
    assert (status, headers["Content-Type"]) == (400, "application/json")
    assert json.loads(body) == {
        "error": "bad_request",
        "detail": "Content-Length '-5' is not a number of bytes",
    }


@pytest.mark.parametrize(
    ("framing", "detail"),
    [
        (b"Content-Length: 2\r\nContent-Length: 10\r\n", "more than one Content-Length header"),
        (
            b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
            "Content-Length and Transfer-Encoding together",
        ),
    ],
    ids=["two-lengths", "length-and-chunked"],
)
def test_ambiguous_framing_is_400_at_once(
    server: tuple[str, subprocess.Popen[bytes], Path], framing: bytes, detail: str
) -> None:
    url, _proc, _log = server
    request = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n" + framing + b"\r\n{}"
    started = time.monotonic()
    status, headers, body = exchange(url, request, timeout=5)
    assert time.monotonic() - started < 2
    assert (status, headers["Connection"]) == (400, "close")
    assert json.loads(body) == {"error": "bad_request", "detail": detail}


def test_health_answers_while_slow_and_silent_clients_hold_connections(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    """50 clients send their head a byte a second, 50 declare a body and send none.

    Before the gate, each held a pool thread (for as long as it trickled, or 10 s each):
    /health did not answer for a minute. Now they wait without a thread and are closed,
    the trickling ones with 408, at DOWNLOADER_REQUEST_TIMEOUT (3 s here).
    """
    url, _proc, _log = server
    stop = threading.Event()
    answers: list[bytes] = []

    def slow_head() -> None:
        with socket.create_connection(address(url), timeout=10) as sock:
            for byte in b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"." * 20:
                if stop.wait(1):
                    return
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered: sending more would only reset the connection
                sock.send(bytes([byte]))
            with contextlib.suppress(OSError):
                answers.append(sock.recv(4096))

    def silent_body() -> None:
        with socket.create_connection(address(url), timeout=10) as sock:
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
            )
            with contextlib.suppress(OSError):
                sock.recv(4096)  # until the server gives up on us

    clients = [threading.Thread(target=slow_head) for _ in range(50)]
    clients += [threading.Thread(target=silent_body) for _ in range(50)]
    for client in clients:
        client.start()
    latencies = []
    try:
        time.sleep(0.5)  # every client connected and started
        for _ in range(10):
            started = time.monotonic()
            resp = requests.get(url + "/health", timeout=2)
            latencies.append(time.monotonic() - started)
            assert resp.status_code == 200, resp.text
            time.sleep(0.2)
        for client in clients:
            client.join(10)  # the server closes them all by its deadlines
        assert not any(client.is_alive() for client in clients)
    finally:
        stop.set()
    assert max(latencies) < 2, latencies
    assert statistics.median(latencies) < 0.5, latencies
    late = [answer for answer in answers if answer.startswith(b"HTTP/1.1 408 ")]
    assert late and b'"error": "request_timeout"' in late[0], answers[:3]


def test_slow_body_over_the_prebuffer_is_408_by_the_deadline(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _proc, _log = server
    body = b" " * 100_000  # more than the gate waits for: a pool thread reads the rest
    with socket.create_connection(address(url), timeout=10) as sock:
        sock.sendall(post(b"application/json", body)[:-30_000])
        started = time.monotonic()
        reply = b""
        while data := sock.recv(65536):
            reply += data
    assert 2 < time.monotonic() - started < 6
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"


def test_keep_alive_pipelined_and_continue_requests_still_work(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, _proc, _log = server
    with requests.Session() as session:
        for _ in range(3):  # one kept-alive connection
            assert session.get(url + "/health", timeout=5).status_code == 200
    pipelined = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n" * 2
    status, _headers, body = exchange(
        url, pipelined + b"GET /health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    assert body.count(b"HTTP/1.1 200 OK") == 2  # the two after the first, in the first's body
    with socket.create_connection(address(url), timeout=5) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer s3cret-token\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            b"Content-Length: 2\r\nConnection: close\r\n\r\n"
        )
        assert sock.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"{}")
        reply = b""
        while data := sock.recv(65536):
            reply += data
    assert reply.startswith(b"HTTP/1.1 400 ")  # {} is not a CloudEvent: the body was read
    assert b"100 Continue" not in reply


def test_secrets_never_reach_the_log(server: tuple[str, subprocess.Popen[bytes], Path]) -> None:
    url, proc, log = server
    resp = requests.get(
        url + "/jobs?access_token=s3cret-token&client_password=pw-99&limit=5",
        headers={"Authorization": "Bearer s3cret-token", "Referer": "http://x/?api_key=key-77"},
        timeout=5,
    )
    assert resp.status_code == 200
    started(log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    text = log.read_text()
    for secret in ("s3cret-token", "pw-99", "key-77"):
        assert secret not in text
    access = [json.loads(line) for line in text.splitlines() if "/jobs?" in line]
    assert "access_token=[REDACTED]&client_password=[REDACTED]&limit=5" in access[0]["message"]


def test_json_formatter_redacts_headers_urls_and_extras() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tests.redaction")
    logger.addHandler(handler)
    try:
        logger.error(
            "Request Headers:\n  Authorization: Basic dXNlcjpwdw==\n  Host: t",
            extra={"store": "postgresql://u:hunter2@db/jobs", "headers": {"Authorization": "Bearer abc.def"}},
        )
    finally:
        logger.removeHandler(handler)
    line = stream.getvalue()
    for secret in ("dXNlcjpwdw", "hunter2", "abc.def"):
        assert secret not in line
    entry = json.loads(line)
    assert entry["store"] == "postgresql://u:[REDACTED]@db/jobs"
    assert entry["headers"] == {"Authorization": "[REDACTED]"}
    assert redact("?limit=5&state=failed") == "?limit=5&state=failed"


def test_sigterm_answers_a_waiting_sync_post_202_and_exits(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    fake_cartd.add(7, b"seven")
    fake_cartd.head = lambda cart: (202, "staging", "")  # never ready
    root = tmp_path / "root"
    root.mkdir()
    env = {"CARTD_URL": fake_cartd.url, "DOWNLOADER_ROOT": str(root), "DOWNLOADER_SHUTDOWN_GRACE": "2"}
    answer: dict[str, Any] = {}

    def send() -> None:
        event = make_event([file_obj(7, "seven.txt", "", b"seven")], event_id="term-1")
        resp = requests.post(url, json=event, timeout=30)
        answer.update(status=resp.status_code, body=resp.json())

    with served(env, tmp_path / "server.log") as (url, proc):
        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 10
        while not requests.get(url + "/jobs?state=running", timeout=5).json()["jobs"]:
            assert time.monotonic() < deadline, "the download never started"
            time.sleep(0.05)
        started(tmp_path / "server.log")
        proc.send_signal(signal.SIGTERM)
        sender.join(10)
        assert answer.get("status") == 202, answer
        assert answer["body"]["status_url"].endswith("/jobs/" + answer["body"]["job_id"])
        stopped = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - stopped < 10
    store = open_store(f"sqlite:///{tmp_path / 'state' / 'jobs.sqlite3'}", upgrade=False)
    try:
        job = store.get(answer["body"]["job_id"])
    finally:
        store.close()
    assert job is not None
    assert job.state == "queued"  # handed back for the next start, not lost


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_an_unauthenticated_huge_body_is_refused_without_being_read(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    """401 from the head; the 128 MiB body is neither read into memory nor waited for."""
    url, proc, _log = server
    declared = 128 * 1024 * 1024
    before = _peak_rss_kb(proc.pid)
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % declared
    )
    with socket.create_connection(address(url), timeout=10) as sock:
        sock.sendall(head)
        reply = b""
        sent = 0
        chunk = b"0" * (1 << 20)
        with contextlib.suppress(OSError):  # the server closes while we still send
            while b"\r\n\r\n" not in reply and sent < declared:
                sock.sendall(chunk)
                sent += len(chunk)
                ready, _, _ = select.select([sock], [], [], 0)
                if ready:
                    reply += sock.recv(65536)
            while data := sock.recv(65536):
                reply += data
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"Connection: close" in reply.partition(b"\r\n\r\n")[0]
    assert sent < declared / 4, f"sent {sent} bytes before the answer"
    assert _peak_rss_kb(proc.pid) - before < 40_000  # kB; reading it whole cost 250 MB


def test_an_unread_chunked_body_is_not_parsed_as_a_second_request(
    server: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    """A retry (which reads no body) with a chunked body that holds a request: one answer."""
    url, _proc, _log = server
    smuggled = b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    request = (
        b"POST /jobs/nosuchjob/retry HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
    )
    with socket.create_connection(address(url), timeout=5) as sock:
        sock.sendall(request)
        reply = b""
        while data := sock.recv(65536):
            reply += data
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert reply.startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5\r\n\r\nhello", "whitespace between"),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "whitespace",
        ),
        (b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-A: 1\r\n  folded\r\n\r\n", "folded"),
        (b"GET /health/live HTTP/1.1\r\nHost: t\r\nBad Name: 1\r\n\r\n", "not a token"),
        (
            b"GET /health/live HTTP/1.1\r\nHost: t\r\n"
            b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n\r\n",
            "more than one",
        ),
        (b"GET /health/live HTTP/1.1\nHost: t\n\n", "bare LF"),
        (b"GET /health/live HTTP/1.1\r\nHost: t\nX: y\r\n\r\n", "bare LF"),
    ],
    ids=["cl-space-colon", "te-space-colon", "obs-fold", "bad-name", "two-te", "bare-lf", "one-bare-lf"],
)
def test_heads_rfc_9112_refuses_are_400_at_once(
    server: tuple[str, subprocess.Popen[bytes], Path], head: bytes, why: str
) -> None:
    url, _proc, _log = server
    started = time.monotonic()
    status, headers, body = exchange(url, head, timeout=5)
    assert status == 400, body
    assert time.monotonic() - started < 2  # not after the 2 s idle timeout, nor the deadline
    assert headers.get("Connection") == "close"
    assert why in json.loads(body)["detail"], body


def test_the_gate_and_the_request_read_fields_with_one_parser() -> None:
    from downloader_service.service.http import _body_wanted, parse_fields

    head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length : 5"
    with pytest.raises(ValueError, match="whitespace between"):
        parse_fields(head.split(b"\r\n")[1:])
    with pytest.raises(ValueError, match="whitespace between"):
        _body_wanted(head)
    assert parse_fields([b"accept: a", b"ACCEPT:b", b"content-length:  7 "]) == {
        b"Accept": b"a, b",
        b"Content-Length": b"7",
    }
    assert _body_wanted(b"POST / HTTP/1.1\r\nContent-Length: 7\r\nExpect: 100-continue") == (7, True)
    assert _body_wanted(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked") == (None, False)


def test_an_answer_is_held_until_it_ends_and_sent_in_one_write() -> None:
    from downloader_service.service.http import HOLD_LIMIT, _Outbox

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(5)
        theirs.setblocking(False)
        outbox = _Outbox(ours, "wb", 8192)
        outbox.write(b"not held ")  # outside an answer: at once
        assert theirs.recv(100) == b"not held "
        outbox.holding = True
        outbox.write(b"HTTP/1.1 200 OK\r\n\r\n")
        outbox.write(b"{}")
        with pytest.raises(BlockingIOError):
            theirs.recv(100)  # nothing yet
        outbox.release()
        assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n{}"
        assert outbox.bytes_written == len(b"not held HTTP/1.1 200 OK\r\n\r\n{}")
        outbox.holding = True
        outbox.write(b"x" * HOLD_LIMIT)  # a large answer is not held whole
        theirs.setblocking(True)
        theirs.settimeout(5)
        received = b""
        while len(received) < HOLD_LIMIT:
            received += theirs.recv(HOLD_LIMIT)
        assert received == b"x" * HOLD_LIMIT and outbox.holding
        outbox.release()
