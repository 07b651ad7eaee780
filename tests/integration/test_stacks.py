"""The test harnesses themselves: a real PostgreSQL server and the real Notifications sender."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest

from devstack.notifications import NotificationsStack, ingest_jsonpath
from devstack.postgres import PostgresServer
from tests.conftest import load_fixture

pytestmark = pytest.mark.integration

CE_01_ATTRIBUTES = {
    "cloudEventsVersion",
    "eventID",
    "eventType",
    "source",
    "eventTime",
    "contentType",
    "extensions",
    "data",
}


class Receiver:
    """A local webhook target: records every POST and answers ``status``."""

    def __init__(self, status: int = 200):
        self.status = status
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append((self.path, dict(self.headers), body))
                answer = b"receiver says no" if receiver.status >= 400 else b"{}"
                self.send_response(receiver.status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/events"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    yield rec
    rec.stop()


def event(case: str) -> dict[str, Any]:
    """The upstream fixture event with a unique eventID and a ``testCase`` extension."""
    doc = load_fixture("notifications-event-0.1.json")
    doc["eventID"] = f"{case}-{uuid.uuid4()}"
    doc["extensions"]["testCase"] = case
    return doc


def test_postgres_takes_connections_and_queries(postgres: PostgresServer) -> None:
    assert postgres.url.startswith(f"postgresql://postgres:{postgres.password}@127.0.0.1:{postgres.port}/")
    url = postgres.create_database(f"harness_{uuid.uuid4().hex[:8]}")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t SELECT generate_series(1, 10)")
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (55,)
        max_connections = conn.execute("SHOW max_connections").fetchone()
        assert max_connections is not None
        assert int(max_connections[0]) >= 200
        assert conn.execute("SELECT inet_server_addr()::text").fetchone() == ("127.0.0.1/32",)


def test_postgres_survives_kill_and_restart(tmp_path: Path) -> None:
    with PostgresServer(tmp_path) as server:
        url = server.create_database("chaos")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (42)")
        server.kill()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url, connect_timeout=2)
        server.start(timeout=30)
        with psycopg.connect(url) as conn:  # same port and password: the URL stays valid
            assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
    assert not (tmp_path / "cluster").exists()


def test_notifications_delivers_an_event(notifications_stack: NotificationsStack, receiver: Receiver) -> None:
    stack = notifications_stack
    case = f"deliver-{uuid.uuid4()}"
    sub = stack.subscribe(
        "deliver", ingest_jsonpath(testCase=case), receiver.url, extensions={"fromSub": "yes"}
    )
    sent = event(case)

    task_id = stack.send(sent)
    assert uuid.UUID(task_id)
    stack.wait_for(lambda: (sent["eventID"], 200) in stack.deliveries())

    assert len(receiver.requests) == 1
    path, headers, body = receiver.requests[0]
    assert path == "/events"
    assert headers["Content-Type"] == "application/json"
    assert not any(name.lower().startswith("ce-") for name in headers)
    got = json.loads(body)
    assert set(got) == CE_01_ATTRIBUTES
    assert got["eventID"] == sent["eventID"]
    assert got["data"] == sent["data"]
    # The subscription's extensions are merged into the event's.
    assert got["extensions"] == {**sent["extensions"], "fromSub": "yes"}
    assert stack.subscription(sub)["disabled"] is None
    assert stack.policy is not None
    assert ("dmlb2001", sent) in stack.policy.requests


def test_failing_receiver_gets_its_subscription_disabled(
    notifications_stack: NotificationsStack, receiver: Receiver
) -> None:
    stack = notifications_stack
    case = f"disable-{uuid.uuid4()}"
    receiver.status = 500
    sub = stack.subscribe("disable", ingest_jsonpath(testCase=case), receiver.url)
    assert stack.subscription(sub)["disabled"] is None
    first = event(case)

    stack.send(first)
    info = stack.wait_for(lambda: (doc := stack.subscription(sub))["disabled"] and doc)
    assert info["error"] == "receiver says no"
    # route_event disables the subscription before it records the answer: wait for the record.
    stack.wait_for(lambda: (first["eventID"], 500) in stack.deliveries())

    # Nothing more reaches it: the next event is logged but not routed to the subscription.
    second = event(case)
    stack.send(second)
    time.sleep(1)
    assert len(receiver.requests) == 1
    assert second["eventID"] not in [event_id for event_id, _status in stack.deliveries()]

    # Re-enabled by hand, it gets later events again.
    receiver.status = 200
    assert stack.enable(sub)["disabled"] is None
    third = event(case)
    stack.send(third)
    stack.wait_for(lambda: (third["eventID"], 200) in stack.deliveries())
    stack.unsubscribe(sub)
