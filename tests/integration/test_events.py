"""Completion events delivered to a real CloudEvents receiver: the npm ``cloudevents`` SDK.

The receiver (tests/cloudevents_receiver/server.js, installed by scripts/test with npm ci)
parses every request with the SDK and writes what it parsed to a file; its path picks the
answer: /ok 202, /reject 400, /flaky 503 twice and then 202.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from downloader_service.service.app import create_app
from downloader_service.service.settings import settings_from_env
from tests.conftest import LocalClient, free_port
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd

RECEIVER = Path(__file__).resolve().parents[1] / "cloudevents_receiver"
DATA = b"completion events\n" * 50
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    node = shutil.which("node")
    if node is None or not (RECEIVER / "node_modules" / "cloudevents").is_dir():
        pytest.fail(
            "the npm receiver is not installed: scripts/test runs npm ci in tests/cloudevents_receiver"
        )
    port, events = free_port(), tmp_path / "received.jsonl"
    events.touch()
    proc = subprocess.Popen(
        [node, str(RECEIVER / "server.js"), str(port), str(events)], stdout=subprocess.PIPE, cwd=RECEIVER
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"listening"
        yield f"http://127.0.0.1:{port}", events
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def received(events: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in events.read_text().splitlines() if line.strip()]


def wait_for(check: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.fixture
def client_for(tmp_path: Path, fake_cartd: FakeCartd) -> Iterator[Callable[[str], Client]]:
    fake_cartd.add(41, DATA)
    apps = []

    def make(sink: str) -> Client:
        settings = settings_from_env(
            {},
            cartd_url=fake_cartd.url,
            download_root=str(tmp_path / "root"),
            state_dir=str(tmp_path / "state"),
            event_sink=sink,
            public_url="http://downloader.test",
            retry_base=0.1,
            retry_max_delay=0.2,
            poll_interval=0.05,
        )
        app = create_app(settings)
        apps.append(app)
        return LocalClient(app)

    yield make
    for app in apps:
        app.service.close()


def post(client: Client, event_id: str) -> dict[str, Any]:
    event = make_event([file_obj(41, "c.txt", "run", DATA)], event_id=event_id)
    resp = client.post("/", data=json.dumps(event), headers=JSON)
    answer: dict[str, Any] = resp.json
    return answer


def test_a_done_job_sends_download_completed(
    receiver: tuple[str, Path], client_for: Callable[[str], Client]
) -> None:
    url, events = receiver
    client = client_for(f"{url}/ok")
    answer = post(client, "done-1")
    assert answer["state"] == "done"
    wait_for(lambda: len(received(events)) == 1)
    [record] = received(events)
    assert record["parsed"], record
    event = record["event"]
    assert event["type"] == "org.pacifica.downloader.download.completed"
    assert event["specversion"] == "1.0"
    assert event["source"] == "http://downloader.test"
    assert event["subject"] == "done-1"
    assert event["eventsource"] == "/pacifica/metadata/ingest"
    assert event["jobid"] == answer["job_id"]
    data = event["data"]
    assert data["download_path"] == answer["download_path"]
    assert (data["files"], data["bytes"]) == (1, len(DATA))
    assert data["status_url"] == f"http://downloader.test/jobs/{answer['job_id']}"
    shown = client.get(f"/jobs/{answer['job_id']}").json["completion_events"]
    wait_for(lambda: client.get(f"/jobs/{answer['job_id']}").json["completion_events"][0]["state"] == "sent")
    assert shown[0]["type"] == "org.pacifica.downloader.download.completed"


def test_a_failed_job_sends_download_failed_with_the_error(
    receiver: tuple[str, Path], client_for: Callable[[str], Client], fake_cartd: FakeCartd
) -> None:
    url, events = receiver
    fake_cartd.head = lambda cart: (500, "error", "file 41 is gone from the archive")
    answer = post(client_for(f"{url}/ok"), "failed-1")
    assert answer["state"] == "failed"
    wait_for(lambda: len(received(events)) == 1)
    event = received(events)[0]["event"]
    assert event["type"] == "org.pacifica.downloader.download.failed"
    assert event["subject"] == "failed-1"
    assert event["data"]["error"]["error"] == "cart_failed"
    assert "gone from the archive" in event["data"]["error"]["detail"]


def test_a_sink_that_is_down_gets_the_event_later_once(
    receiver: tuple[str, Path], client_for: Callable[[str], Client]
) -> None:
    url, events = receiver
    client = client_for(f"{url}/flaky")
    answer = post(client, "flaky-1")
    path = f"/jobs/{answer['job_id']}"
    wait_for(lambda: client.get(path).json["completion_events"][0]["state"] == "sent")
    delivery = client.get(path).json["completion_events"][0]
    assert delivery["attempts"] == 3
    assert delivery["last_status"] == 202
    records = received(events)
    assert [r["path"] for r in records] == ["/flaky"] * 3
    assert len({r["event"]["id"] for r in records}) == 1  # the same event each time: receivers dedupe


def test_a_sink_that_refuses_is_recorded_and_not_retried(
    receiver: tuple[str, Path], client_for: Callable[[str], Client]
) -> None:
    url, events = receiver
    client = client_for(f"{url}/reject")
    answer = post(client, "rejected-1")
    path = f"/jobs/{answer['job_id']}"
    wait_for(lambda: client.get(path).json["completion_events"][0]["state"] == "failed")
    delivery = client.get(path).json["completion_events"][0]
    assert (delivery["attempts"], delivery["last_status"]) == (1, 400)
    assert "400" in delivery["last_error"]
    time.sleep(0.5)
    assert len(received(events)) == 1
