"""The outbox's deliveries against hostile sinks, and what DELETE of a job leaves owed.

The sinks are our own small server (fault injection the real receivers cannot produce):
one that redirects, one whose 200 has an endless body, one that never answers.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from downloader_service.service.events import CART_DELETE, Deliverer
from downloader_service.service.retry import RetryPolicy
from downloader_service.service.settings import Settings
from downloader_service.service.store import DeliveryState, JobStore, Notice, open_store
from tests.fakecartd import FakeCartd

ids = itertools.count()


class HostileSink:
    """``/redirect`` 302, ``/endless`` 200 with a body that never ends, ``/hang`` no answer."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.stop_hanging = threading.Event()
        self.endless_bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                sink.hits.append(self.path)
                if self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/endless":
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()  # no length: the body ends when the connection does
                    try:
                        while sink.endless_bytes < 256 * 1024 * 1024:
                            self.wfile.write(b"x" * 65536)
                            sink.endless_bytes += 65536
                    except OSError:
                        pass
                elif self.path == "/hang":
                    sink.stop_hanging.wait(60)
                else:  # /elsewhere: where a redirect would have sent a GET
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop_hanging.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink() -> Iterator[HostileSink]:
    server = HostileSink()
    yield server
    server.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[JobStore]:
    opened = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    yield opened
    opened.close()


def _owe(store: JobStore, kind: str, sink: str) -> str:
    """An outbox row, as a job's end writes one (a job made and finished for it)."""
    from downloader_service.service.store import NewJob

    job_id = f"job{next(ids)}"
    [(job, _)] = store.add([NewJob(job_id, "/t", job_id, "t", {"data": []})])
    assert store.claim("w", 60) is not None
    notice = Notice(
        f"n{next(ids)}", kind, sink, {"id": "e", "source": "/s", "type": "t", "specversion": "1.0"}
    )
    assert store.finish(job.id, "w", "/nowhere", "h", {}, [notice])
    return job.id


def _deliverer(store: JobStore, **settings: Any) -> Deliverer:
    values = Settings(poll_interval=0.05, lease_seconds=30, **settings)
    return Deliverer(store, values, "deliverer", RetryPolicy(5, 60, 3600))


def test_a_redirecting_sink_is_not_followed_and_the_event_is_retried(
    store: JobStore, sink: HostileSink
) -> None:
    _owe(store, "org.pacifica.downloader.download.completed", f"{sink.url}/redirect")
    delivery = _deliverer(store).deliver_once()
    assert delivery is not None
    [row] = store.deliveries()
    assert (row.state, row.last_status) == (
        DeliveryState.PENDING,
        302,
    )  # not "sent": a redirect delivers nothing
    assert "redirect" in (row.last_error or "") and "/elsewhere" in (row.last_error or "")
    assert sink.hits == ["/redirect"]  # the GET a follow would make never happened


def test_an_endless_answer_is_read_no_further_than_a_few_kib(store: JobStore, sink: HostileSink) -> None:
    _owe(store, "org.pacifica.downloader.download.completed", f"{sink.url}/endless")
    started = time.monotonic()
    assert _deliverer(store).deliver_once() is not None
    assert time.monotonic() - started < 5
    [row] = store.deliveries()
    assert row.state == DeliveryState.SENT
    assert sink.endless_bytes < 16 * 1024 * 1024  # the sink stopped when we hung up


def test_a_hanging_sink_holds_up_no_cart_deletion(
    store: JobStore, sink: HostileSink, fake_cartd: FakeCartd
) -> None:
    _owe(store, "org.pacifica.downloader.download.completed", f"{sink.url}/hang")
    time.sleep(0.01)
    _owe(store, CART_DELETE, f"{fake_cartd.url}/cart-1")
    deliverer = _deliverer(store)
    deliverer.start()
    try:
        deadline = time.monotonic() + 5
        # Cartd counts the DELETE before it answers, and the row is marked sent after the
        # answer: wait for the row, not only for Cartd (a loaded machine shows the gap).
        states = {}
        while fake_cartd.deleted != ["cart-1"] or states.get(CART_DELETE) != DeliveryState.SENT:
            assert time.monotonic() < deadline, f"the cart was not deleted while the sink hung: {states}"
            time.sleep(0.05)
            states = {row.type: row.state for row in store.deliveries()}
        assert states == {
            CART_DELETE: DeliveryState.SENT,
            "org.pacifica.downloader.download.completed": DeliveryState.PENDING,
        }
    finally:
        sink.stop_hanging.set()
        deliverer.stop()


def test_deleting_a_job_keeps_the_deletion_of_its_cart_owed(store: JobStore, fake_cartd: FakeCartd) -> None:
    fake_cartd.post_status = 201
    job_id = _owe(store, CART_DELETE, f"{fake_cartd.url}/cart-2")
    assert store.delete(job_id) is not None
    assert store.get(job_id) is None
    [row] = store.deliveries()
    assert (row.type, row.state) == (CART_DELETE, DeliveryState.PENDING)  # before: gone with the job
    assert _deliverer(store).deliver_once() is not None
    assert fake_cartd.deleted == ["cart-2"]
