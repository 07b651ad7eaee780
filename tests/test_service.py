from __future__ import annotations

import json
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent as SDKCloudEvent
from werkzeug.test import Client, TestResponse

from downloader_service.service import create_app
from downloader_service.settings import settings_from_env
from tests.events import file_obj, make_event
from tests.fakecartd import Cart, FakeCartd, Member, build_tar, cart_tar, closed_port, cut_after

FOO = b"foo\n" * 3000
BAR = b"bar\n"
JSON = {"Content-Type": "application/json"}

MakeClient = Callable[..., Client]


@pytest.fixture
def make_client(tmp_path: Path, fake_cartd: FakeCartd) -> Iterator[MakeClient]:
    apps = []

    def make(**overrides: Any) -> Client:
        overrides.setdefault("cartd_url", fake_cartd.url)
        overrides.setdefault("download_root", str(tmp_path / "root"))
        (tmp_path / "root").mkdir(exist_ok=True)
        app = create_app(settings_from_env({}, **overrides))
        apps.append(app)
        return Client(app)

    yield make
    for app in apps:
        app.service.runner.shutdown()


@pytest.fixture
def files(fake_cartd: FakeCartd) -> list[dict[str, Any]]:
    fake_cartd.add(34, FOO)
    fake_cartd.add(35, BAR)
    return [file_obj(34, "foo.txt", "a/b/", FOO), file_obj(35, "bar.txt", "", BAR)]


def post(client: Client, event: dict[str, Any], headers: dict[str, str] | None = None) -> TestResponse:
    return client.post("/", data=json.dumps(event), headers=headers or JSON)


def body(resp: TestResponse) -> dict[str, Any]:
    assert resp.headers["Content-Type"] == "application/json"
    data: dict[str, Any] = json.loads(resp.data)
    return data


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "root").iterdir())


def test_post_notifications_event_downloads_into_fresh_directory(
    make_client: MakeClient, files: list[dict[str, Any]], tmp_path: Path
) -> None:
    resp = post(make_client(), make_event(files, event_id="ev-7"))
    assert resp.status_code == 200
    answer = body(resp)
    path = Path(answer["download_path"])
    assert path.parent == tmp_path / "root"
    assert path.name.startswith("event-ev-7-")
    assert (path / "data/a/b/foo.txt").read_bytes() == FOO
    assert (path / "data/bar.txt").read_bytes() == BAR
    assert answer["files"] == 2
    assert answer["bytes"] == len(FOO) + len(BAR)
    assert answer["event_id"] == "ev-7"
    assert answer["state"] == "done"


def test_post_structured_and_binary_1_0_events(make_client: MakeClient, files: list[dict[str, Any]]) -> None:
    client = make_client()
    data = make_event(files)["data"]
    attrs = {"source": "/test", "type": "org.pacifica.metadata.ingest"}
    structured = to_structured_event(SDKCloudEvent({**attrs, "id": "s1"}, data))
    resp = client.post("/", data=structured.body, headers={"Content-Type": "application/cloudevents+json"})
    assert resp.status_code == 200, resp.data
    assert (Path(body(resp)["download_path"]) / "data/bar.txt").read_bytes() == BAR

    binary = to_binary_event(SDKCloudEvent({**attrs, "id": "b1"}, {}))
    headers = {**binary.headers, "content-type": "application/json; charset=utf-8"}
    resp = client.post("/", data=json.dumps(data), headers=headers)
    assert resp.status_code == 200, resp.data
    assert (Path(body(resp)["download_path"]) / "data/a/b/foo.txt").read_bytes() == FOO


def test_post_batch_downloads_each_event(make_client: MakeClient, files: list[dict[str, Any]]) -> None:
    data = make_event(files)["data"]
    docs = [
        json.loads(
            to_structured_event(
                SDKCloudEvent({"id": f"e{i}", "source": "/s", "type": "org.pacifica.metadata.ingest"}, data)
            ).body
        )
        for i in range(2)
    ]
    resp = make_client().post(
        "/", data=json.dumps(docs), headers={"Content-Type": "application/cloudevents-batch+json"}
    )
    assert resp.status_code == 200
    answers = body(resp)["events"]
    assert [a["event_id"] for a in answers] == ["e0", "e1"]
    assert len({a["download_path"] for a in answers}) == 2


@pytest.mark.parametrize(
    ("content_type", "payload", "status", "kind", "field"),
    [
        ("application/json", b"{oops", 400, "invalid_event", "body"),
        ("application/json", b'{"a": 1}', 400, "invalid_event", "specversion"),
        (
            "application/cloudevents+json",
            b'{"specversion": "1.0", "source": "s", "type": "t"}',
            400,
            "invalid_event",
            "id",
        ),
        ("text/plain", b"hello", 415, "unsupported_media_type", "content-type"),
    ],
)
def test_post_bad_requests_get_json_errors(
    make_client: MakeClient,
    tmp_path: Path,
    content_type: str,
    payload: bytes,
    status: int,
    kind: str,
    field: str,
) -> None:
    resp = make_client().post("/", data=payload, headers={"Content-Type": content_type})
    assert resp.status_code == status
    assert body(resp)["error"] == kind
    assert body(resp)["field"] == field
    assert leftovers(tmp_path) == []


def test_post_wrong_event_type_is_400(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    event = {**make_event(files), "eventType": "org.pacifica.metadata.deleted"}
    resp = post(make_client(), event)
    assert resp.status_code == 400
    assert body(resp)["field"] == "type"
    assert "org.pacifica.metadata.deleted" in body(resp)["detail"]
    assert fake_cartd.requests == []


def test_post_event_without_files_is_400_no_files(make_client: MakeClient, fake_cartd: FakeCartd) -> None:
    resp = post(make_client(), make_event([]))
    assert resp.status_code == 400
    assert body(resp)["error"] == "no_files"
    assert fake_cartd.requests == []


def test_post_unsafe_path_is_400_naming_the_object(make_client: MakeClient) -> None:
    resp = post(make_client(), make_event([file_obj(1, "passwd", "../../etc", b"x")]))
    assert resp.status_code == 400
    assert body(resp)["object"] == "data[1] (_id 1)"
    assert "'..'" in body(resp)["detail"]


def test_post_upstream_fixture_is_400_for_the_file_without_id(
    make_client: MakeClient, notifications_event: dict[str, Any]
) -> None:
    resp = post(make_client(), notifications_event)
    assert resp.status_code == 400
    assert body(resp)["field"] == "_id"


def test_post_huge_body_is_413_without_reading_it(make_client: MakeClient, tmp_path: Path) -> None:
    resp = make_client(max_body_bytes=1000).post("/", data=b" " * 5000, headers=JSON)
    assert resp.status_code == 413
    assert body(resp)["error"] == "payload_too_large"


def test_token_is_required_when_configured(make_client: MakeClient, files: list[dict[str, Any]]) -> None:
    client = make_client(token="s3cret")
    resp = post(client, make_event(files))
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert post(client, make_event(files), {**JSON, "Authorization": "Bearer wrong"}).status_code == 401
    assert post(client, make_event(files), {**JSON, "Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.parametrize(
    ("breakage", "status", "kind"),
    [
        ("cart_error", 502, "cart_failed"),
        ("never_ready", 504, "cart_timeout"),
        ("cut", 502, "download_interrupted"),
        ("flipped", 502, "integrity"),
    ],
)
def test_post_failures_map_to_retry_statuses_and_leave_nothing(
    make_client: MakeClient,
    files: list[dict[str, Any]],
    fake_cartd: FakeCartd,
    tmp_path: Path,
    breakage: str,
    status: int,
    kind: str,
) -> None:
    if breakage == "cart_error":
        fake_cartd.head = lambda cart: (500, "error", "file 34 hash mismatch in archive")
    elif breakage == "never_ready":
        fake_cartd.head = lambda cart: (202, "staging", "")
    elif breakage == "cut":
        fake_cartd.body = lambda cart, name: cut_after(
            cart_tar(cart.fileids, fake_cartd.contents, name), 4000
        )
    else:
        fake_cartd.contents["34"] = b"X" + FOO[1:]
    resp = post(make_client(cart_timeout=0.3), make_event(files))
    assert resp.status_code == status
    answer = body(resp)
    assert answer["error"] == kind
    assert answer["state"] == "failed"
    assert "download_path" not in answer
    assert leftovers(tmp_path) == []


def test_post_cartd_down_is_502(make_client: MakeClient, files: list[dict[str, Any]], tmp_path: Path) -> None:
    resp = post(make_client(cartd_url=f"http://127.0.0.1:{closed_port()}"), make_event(files))
    assert resp.status_code == 502
    assert body(resp)["error"] == "cartd_unavailable"
    assert body(resp)["retryable"] is True
    assert leftovers(tmp_path) == []


def gate_cart(fake_cartd: FakeCartd) -> threading.Event:
    """Keep carts staging until the returned event is set."""
    release = threading.Event()
    fake_cartd.head = lambda cart: (204, "ready", "") if release.is_set() else (202, "staging", "")
    return release


def wait_for(predicate: Callable[[], bool], seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_async_mode_answers_202_then_status_url_reports(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client()
    resp = post(client, make_event(files), {**JSON, "Prefer": "respond-async"})
    assert resp.status_code == 202
    answer = body(resp)
    assert resp.headers["Location"] == answer["status_url"]
    assert resp.headers["Preference-Applied"] == "respond-async"
    status_path = answer["status_url"].removeprefix("http://localhost")
    assert body(client.get(status_path))["state"] in ("queued", "running")
    release.set()
    wait_for(lambda: body(client.get(status_path))["state"] == "done")
    final = body(client.get(status_path))
    assert (Path(final["download_path"]) / "data/bar.txt").read_bytes() == BAR


def test_async_failure_is_reported_on_status_url(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    fake_cartd.head = lambda cart: (500, "error", "boom")
    client = make_client(respond_async=True)
    answer = body(post(client, make_event(files)))
    path = answer["status_url"].removeprefix("http://localhost")
    wait_for(lambda: body(client.get(path))["state"] == "failed")
    final = body(client.get(path))
    assert final["error"] == "cart_failed"
    assert "boom" in final["detail"]
    assert leftovers(tmp_path) == []


def test_unknown_job_is_404(make_client: MakeClient) -> None:
    resp = make_client().get("/jobs/nope")
    assert resp.status_code == 404
    assert body(resp)["error"] == "not_found"


def test_duplicate_event_does_not_start_a_second_cart(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    client = make_client()
    first = body(post(client, make_event(files, event_id="same")))
    second = post(client, make_event(files, event_id="same"))
    assert second.status_code == 200
    assert body(second)["download_path"] == first["download_path"]
    assert body(second)["duplicate"] is True
    assert len(fake_cartd.carts) == 1
    other = body(post(client, make_event(files, event_id="other")))
    assert other["download_path"] != first["download_path"]
    assert len(fake_cartd.carts) == 2


def test_duplicate_while_running_gets_status(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client()
    first = post(client, make_event(files, event_id="x"), {**JSON, "Prefer": "respond-async"})
    second = post(client, make_event(files, event_id="x"))
    assert second.status_code == 202
    assert body(second)["job_id"] == body(first)["job_id"]
    release.set()
    path = body(first)["status_url"].removeprefix("http://localhost")
    wait_for(lambda: body(client.get(path))["state"] == "done")
    assert len(fake_cartd.carts) == 1


def test_retryable_failure_may_be_retried(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    fake_cartd.head = lambda cart: (202, "staging", "")
    client = make_client(cart_timeout=0.2)
    assert post(client, make_event(files, event_id="r")).status_code == 504
    fake_cartd.head = lambda cart: (204, "ready", "")
    assert post(client, make_event(files, event_id="r")).status_code == 200
    assert len(fake_cartd.carts) == 2


def test_all_workers_busy_is_429_with_retry_after(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client(workers=1, queue_size=1, retry_after=7)
    async_headers = {**JSON, "Prefer": "respond-async"}
    assert post(client, make_event(files, event_id="1"), async_headers).status_code == 202
    assert post(client, make_event(files, event_id="2"), async_headers).status_code == 202
    resp = post(client, make_event(files, event_id="3"), async_headers)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "7"
    assert body(resp)["error"] == "busy"
    release.set()
    wait_for(lambda: post(client, make_event(files, event_id="3"), async_headers).status_code == 202)


def test_webhook_handshake(make_client: MakeClient) -> None:
    resp = make_client().options("/", headers={"WebHook-Request-Origin": "notify.example.org"})
    assert resp.status_code == 200
    assert resp.headers["WebHook-Allowed-Origin"] == "notify.example.org"
    assert resp.headers["WebHook-Allowed-Rate"] == "120"
    refused = make_client(allowed_origins=("ok.example.org",)).options(
        "/", headers={"WebHook-Request-Origin": "evil.example.org"}
    )
    assert refused.status_code == 403
    assert "WebHook-Allowed-Origin" not in refused.headers


def test_health_says_whether_cartd_answers(make_client: MakeClient) -> None:
    up = body(make_client().get("/health"))
    assert up["status"] == "ok"
    assert up["cartd"]["reachable"] is True
    down = make_client(cartd_url=f"http://127.0.0.1:{closed_port()}").get("/health")
    assert down.status_code == 200
    assert body(down)["cartd"]["reachable"] is False


def test_metrics_count_outcomes_and_bytes(make_client: MakeClient, files: list[dict[str, Any]]) -> None:
    client = make_client()
    post(client, make_event(files))
    post(client, make_event([]))
    text = client.get("/metrics").data.decode()
    assert 'downloader_events_total{outcome="done"} 1.0' in text
    assert 'downloader_events_total{outcome="rejected"} 1.0' in text
    assert f"downloader_bytes_total {float(len(FOO) + len(BAR))}" in text
    assert "downloader_files_total 2.0" in text
    assert "downloader_download_seconds_count 1.0" in text
    assert "downloader_jobs_in_flight 0.0" in text


@pytest.mark.parametrize(
    ("method", "path", "status"), [("get", "/nope", 404), ("put", "/", 405), ("delete", "/health", 405)]
)
def test_unknown_routes_answer_json(make_client: MakeClient, method: str, path: str, status: int) -> None:
    resp = getattr(make_client(), method)(path)
    assert resp.status_code == status
    assert "error" in json.loads(resp.data)
    assert resp.headers["Content-Type"] == "application/json"


def test_unrequested_member_in_cart_is_502_unsafe_archive(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    def with_extra(cart: Cart, name: str) -> list[bytes]:
        extra = [*cart.fileids, {"id": "99", "path": "../../escape.sh"}]
        fake_cartd.contents["99"] = b"#!/bin/sh"
        return [cart_tar(extra, fake_cartd.contents, name)]

    fake_cartd.body = with_extra
    resp = post(make_client(), make_event(files))
    assert resp.status_code == 502
    assert body(resp)["error"] == "unsafe_archive"
    assert body(resp)["member"].startswith("data/..")
    assert leftovers(tmp_path) == []
    assert not (tmp_path / "escape.sh").exists()


def test_stalled_stream_fires_read_timeout_and_is_502(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    from tests.fakecartd import stall_after

    fake_cartd.body = lambda cart, name: stall_after(
        cart_tar(cart.fileids, fake_cartd.contents, name), 2048, 3
    )
    started = time.monotonic()
    resp = post(make_client(read_timeout=0.3), make_event(files))
    assert time.monotonic() - started < 2.5
    assert resp.status_code == 502
    assert body(resp)["error"] == "download_interrupted"
    assert body(resp)["retryable"] is True
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "member",
    [
        Member("data/bar.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
        Member("data/bar.txt", type=tarfile.LNKTYPE, linkname="/etc/passwd"),
        Member("/etc/cron.d/evil", b"* * * * * root sh"),
        Member("data/bar.txt", type=tarfile.CHRTYPE),
        Member("data/bar.txt", type=tarfile.FIFOTYPE),
        Member("elsewhere/bar.txt", BAR),
    ],
    ids=["symlink", "hardlink", "absolute", "device", "fifo", "outside"],
)
def test_hostile_tar_from_cartd_is_502_unsafe_archive(
    make_client: MakeClient,
    files: list[dict[str, Any]],
    fake_cartd: FakeCartd,
    tmp_path: Path,
    member: Member,
) -> None:
    fake_cartd.body = lambda cart, name: [build_tar([Member("data", type=tarfile.DIRTYPE), member])]
    resp = post(make_client(), make_event(files))
    assert resp.status_code == 502
    assert body(resp)["error"] == "unsafe_archive"
    assert body(resp)["member"] == member.name
    assert leftovers(tmp_path) == []


def test_shutdown_ends_queued_jobs_so_no_request_waits_forever(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client(workers=1, queue_size=2)
    async_headers = {**JSON, "Prefer": "respond-async"}
    first = body(post(client, make_event(files, event_id="run"), async_headers))
    queued = body(post(client, make_event(files, event_id="queued"), async_headers))
    runner = client.application.service.runner  # type: ignore[attr-defined]
    runner.shutdown(wait=False)
    release.set()
    job = runner.get(queued["job_id"])
    assert job is not None
    assert job.future.result(timeout=5) is None
    assert job.state == "failed"
    assert "stopped before" in str(job.error)
    assert runner.get(first["job_id"]).future.result(timeout=5) is None
