from __future__ import annotations

import json
import logging
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent as SDKCloudEvent
from werkzeug.test import Client, TestResponse

from downloader_service.errors import DownloaderError
from downloader_service.service.jobs import ErrorKind
from tests.conftest import MakeClient
from tests.events import file_obj, make_event
from tests.fakecartd import Cart, FakeCartd, Member, build_tar, cart_tar, closed_port, cut_after

FOO = b"foo\n" * 3000
BAR = b"bar\n"
JSON = {"Content-Type": "application/json"}


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


def test_post_wrong_event_type_is_400_when_strict(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    event = {**make_event(files), "eventType": "org.pacifica.metadata.deleted"}
    resp = post(make_client(strict=True), event)
    assert resp.status_code == 400
    assert body(resp)["field"] == "type"
    assert "org.pacifica.metadata.deleted" in body(resp)["detail"]
    assert fake_cartd.requests == []


def test_post_event_without_files_is_400_no_files_when_strict(
    make_client: MakeClient, fake_cartd: FakeCartd
) -> None:
    resp = post(make_client(strict=True), make_event([]))
    assert resp.status_code == 400
    assert body(resp)["error"] == "no_files"
    assert fake_cartd.requests == []


def test_post_unsafe_path_is_400_naming_the_object_when_strict(make_client: MakeClient) -> None:
    resp = post(make_client(strict=True), make_event([file_obj(1, "passwd", "../../etc", b"x")]))
    assert resp.status_code == 400
    assert body(resp)["object"] == "data[1] (_id 1)"
    assert "'..'" in body(resp)["detail"]


def test_post_upstream_fixture_is_400_for_the_file_without_id(
    make_client: MakeClient, notifications_event: dict[str, Any]
) -> None:
    resp = post(make_client(strict=True), notifications_event)
    assert resp.status_code == 400
    assert body(resp)["field"] == "_id"


@pytest.mark.parametrize(
    ("event", "kind", "field"),
    [
        ({"eventType": "org.pacifica.metadata.deleted"}, "invalid_event", "type"),
        ({"data": []}, "no_files", "files"),
        ({"data": [{"destinationTable": "Files", "name": "a.txt"}]}, "invalid_event", "_id"),
    ],
    ids=["type", "no-files", "no-id"],
)
def test_post_event_that_cannot_be_downloaded_is_recorded_as_rejected_with_200(
    make_client: MakeClient,
    files: list[dict[str, Any]],
    fake_cartd: FakeCartd,
    event: dict[str, Any],
    kind: str,
    field: str,
) -> None:
    """A sender such as Notifications must not hear 4xx for one bad event: it would stop sending."""
    client = make_client()
    resp = post(client, {**make_event(files, event_id="bad"), **event})
    assert resp.status_code == 200
    answer = body(resp)
    assert answer["state"] == "rejected"
    assert answer["error"] == kind
    assert answer.get("field", field) == field
    assert fake_cartd.requests == []
    shown = body(client.get(answer["status_url"].removeprefix("http://localhost")))
    assert shown["state"] == "rejected"
    assert shown["error"] == kind
    again = post(client, {**make_event(files, event_id="bad"), **event})
    assert body(again)["duplicate"] is True
    assert body(again)["job_id"] == answer["job_id"]
    good = post(client, make_event(files, event_id="good"))
    assert good.status_code == 200
    assert body(good)["state"] == "done"


def test_post_huge_body_is_413_without_reading_it(make_client: MakeClient, tmp_path: Path) -> None:
    resp = make_client(max_body_bytes=1000).post("/", data=b" " * 5000, headers=JSON)
    assert resp.status_code == 413
    assert body(resp)["error"] == "payload_too_large"


def test_token_is_required_when_configured(make_client: MakeClient, files: list[dict[str, Any]]) -> None:
    client = make_client(token="s3cret")
    resp = post(client, make_event(files))
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
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
    client = make_client(
        cart_timeout=0.3, strict=True, retry_base=0.05, retry_max_delay=0.05, retry_window=0.4
    )
    resp = post(client, make_event(files))
    assert resp.status_code == status
    answer = body(resp)
    assert answer["error"] == kind
    assert answer["state"] == "failed"
    assert "download_path" not in answer
    assert leftovers(tmp_path) == []


def test_post_cartd_down_is_retried_and_answered_202_not_5xx(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    """Cartd down: the sync sender hears 202 (the event is safe), the job retries until Cartd is back."""
    down = f"http://127.0.0.1:{closed_port()}"
    client = make_client(cartd_url=down, sync_wait=0.5, retry_base=0.1, retry_max_delay=0.2)
    resp = post(client, make_event(files))
    assert resp.status_code == 202
    answer = body(resp)
    assert answer["state"] in ("queued", "running")
    path = answer["status_url"].removeprefix("http://localhost")
    wait_for(lambda: body(client.get(path)).get("last_error", {}).get("error") == "cartd_unavailable")
    assert body(client.get(path))["attempts"] >= 1
    client.application.service.close()  # type: ignore[attr-defined]
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


def test_cart_stuck_staging_is_retried_on_a_new_cart(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    stuck: set[str] = set()

    def head(cart: Cart) -> tuple[int, str, str]:
        if not stuck:
            stuck.add(cart.uid)
        return (202, "staging", "") if cart.uid in stuck else (204, "ready", "")

    fake_cartd.head = head
    client = make_client(cart_timeout=0.2, retry_base=0.05, retry_max_delay=0.1)
    resp = post(client, make_event(files, event_id="r"))
    assert resp.status_code == 200, resp.data
    answer = body(resp)
    assert answer["state"] == "done"
    assert answer["attempts"] == 2
    assert len(fake_cartd.carts) == 2


def test_failed_job_is_retried_when_the_sender_posts_it_again(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    fake_cartd.head = lambda cart: (202, "staging", "")
    client = make_client(cart_timeout=0.1, retry_window=0)
    first = body(post(client, make_event(files, event_id="r")))
    assert first["state"] == "failed"
    assert first["error"] == "cart_timeout"
    fake_cartd.head = lambda cart: (204, "ready", "")
    again = post(client, make_event(files, event_id="r"))
    assert again.status_code == 200
    assert body(again)["state"] == "done"
    assert body(again)["job_id"] == first["job_id"]


def test_burst_of_events_is_all_accepted_without_429(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client(workers=4, respond_async=True)
    answers = [post(client, make_event(files, event_id=f"b{i}")) for i in range(40)]
    assert {resp.status_code for resp in answers} == {202}
    release.set()
    for resp in answers:
        path = body(resp)["status_url"].removeprefix("http://localhost")
        wait_for(lambda path=path: body(client.get(path))["state"] == "done", 20)


def test_queue_cap_when_configured_is_429_with_retry_after(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client(workers=1, max_queued=1, retry_after=7)
    async_headers = {**JSON, "Prefer": "respond-async"}
    assert post(client, make_event(files, event_id="1"), async_headers).status_code == 202
    wait_for(lambda: body(client.get("/jobs?state=running"))["jobs"] != [])
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
    assert "WebHook-Allowed-Rate" not in resp.headers  # nothing limits the rate: none is promised
    refused = make_client(allowed_origins=("ok.example.org",)).options(
        "/", headers={"WebHook-Request-Origin": "evil.example.org"}
    )
    assert refused.status_code == 403
    assert "WebHook-Allowed-Origin" not in refused.headers


def test_health_ready_says_whether_cartd_the_store_and_the_root_can_work(make_client: MakeClient) -> None:
    client = make_client()
    up = client.get("/health/ready")
    assert up.status_code == 200
    assert body(up)["status"] == "ready"
    assert {name: check["ok"] for name, check in body(up)["checks"].items()} == {
        "store": True,
        "cartd": True,
        "download_root": True,
    }
    assert body(up)["jobs"]["queued"] == 0
    assert body(client.get("/health"))["status"] == "ready"

    down = make_client(cartd_url=f"http://127.0.0.1:{closed_port()}")
    assert down.get("/health/live").status_code == 200  # the process answers: do not restart it
    ready = down.get("/health/ready")
    assert ready.status_code == 503
    assert body(ready)["checks"]["cartd"]["ok"] is False
    assert body(ready)["checks"]["cartd"]["reason"].startswith("Cartd cannot be reached")
    assert down.get("/health").status_code == 503

    full = make_client(min_free_bytes=1 << 62)
    report = body(full.get("/health/ready"))
    assert report["checks"]["download_root"]["ok"] is False
    assert "DOWNLOADER_MIN_FREE_BYTES" in report["checks"]["download_root"]["reason"]


def test_metrics_count_outcomes_and_bytes(make_client: MakeClient, files: list[dict[str, Any]]) -> None:
    client = make_client()
    post(client, make_event(files))
    post(client, make_event([], event_id="empty"))
    text = client.get("/metrics").data.decode()
    assert 'downloader_events_total{outcome="accepted"} 1.0' in text
    assert 'downloader_events_total{outcome="rejected"} 1.0' in text
    assert 'downloader_jobs_finished_total{state="done"} 1.0' in text
    assert 'downloader_jobs{state="done"} 1.0' in text
    assert 'downloader_jobs{state="rejected"} 1.0' in text
    assert 'downloader_errors_total{kind="no_files"} 1.0' in text
    assert "downloader_queue_depth 0.0" in text
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
    resp = post(make_client(strict=True), make_event(files))
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
    resp = post(make_client(read_timeout=0.3, strict=True, retry_window=0), make_event(files))
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
    resp = post(make_client(strict=True), make_event(files))
    assert resp.status_code == 502
    assert body(resp)["error"] == "unsafe_archive"
    assert body(resp)["member"] == member.name
    assert leftovers(tmp_path) == []


def test_unsafe_archive_fails_at_once_and_answers_200_failed_by_default(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    link = Member("data/bar.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    fake_cartd.body = lambda cart, name: [build_tar([Member("data", type=tarfile.DIRTYPE), link])]
    resp = post(make_client(), make_event(files))
    assert resp.status_code == 200
    answer = body(resp)
    assert answer["state"] == "failed"
    assert answer["error"] == "unsafe_archive"
    assert answer["attempts"] == 1
    assert len(fake_cartd.carts) == 1
    assert leftovers(tmp_path) == []


def test_shutdown_hands_running_jobs_back_and_a_new_process_finishes_them(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    release = gate_cart(fake_cartd)
    client = make_client(workers=1, respond_async=True)
    answer = body(post(client, make_event(files, event_id="run")))
    path = answer["status_url"].removeprefix("http://localhost")
    wait_for(lambda: body(client.get(path))["state"] == "running")
    service = client.application.service  # type: ignore[attr-defined]
    service.close(grace=0)
    reopened = make_client(workers=0)
    handed_back = body(reopened.get(path))
    assert handed_back["state"] == "queued"
    assert handed_back["attempts"] == 0
    assert leftovers(tmp_path) == []
    release.set()
    again = make_client(workers=1)
    wait_for(lambda: body(again.get(path))["state"] == "done")
    done = body(again.get(path))
    assert (Path(done["download_path"]) / "data/bar.txt").read_bytes() == BAR
    assert leftovers(tmp_path) == [Path(done["download_path"]).name]


def test_basic_auth_is_accepted_like_notifications_sends_it(
    make_client: MakeClient, files: list[dict[str, Any]]
) -> None:
    import base64

    client = make_client(basic_auth="notify:s3cret", token="tok", admin_token="ops")
    resp = post(client, make_event(files))
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="downloader", Basic realm="downloader"'
    wrong = base64.b64encode(b"notify:nope").decode()
    assert post(client, make_event(files), {**JSON, "Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(b"notify:s3cret").decode()
    assert post(client, make_event(files), {**JSON, "Authorization": f"Basic {right}"}).status_code == 200
    assert client.get("/jobs", headers={"Authorization": "Bearer ops"}).status_code == 200
    assert client.get("/jobs").status_code == 401
    # The sender's credentials post events, nothing more.
    assert client.get("/jobs", headers={"Authorization": "Bearer tok"}).status_code == 403
    assert client.get("/jobs", headers={"Authorization": f"Basic {right}"}).status_code == 403


def test_jobs_list_filters_by_state_and_pages(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    client = make_client()
    for n in range(3):
        post(client, make_event(files, event_id=f"ok-{n}"))
    post(client, make_event([], event_id="empty"))
    everything = body(client.get("/jobs"))
    assert [job["event_id"] for job in everything["jobs"]] == ["empty", "ok-2", "ok-1", "ok-0"]
    assert everything["next"] is None
    first = body(client.get("/jobs?state=done&limit=2"))
    assert [job["event_id"] for job in first["jobs"]] == ["ok-2", "ok-1"]
    second = body(client.get(first["next"].removeprefix("http://localhost")))
    assert [job["event_id"] for job in second["jobs"]] == ["ok-0"]
    assert second["next"] is None
    rejected = body(client.get("/jobs?state=rejected"))["jobs"]
    assert [(job["event_id"], job["error"]) for job in rejected] == [("empty", "no_files")]
    assert client.get("/jobs?state=bogus").status_code == 400
    assert client.get("/jobs?limit=0").status_code == 400


def test_retry_requeues_a_failed_job_and_delete_removes_its_download(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    fake_cartd.head = lambda cart: (500, "error", "archive down")
    client = make_client()
    failed = body(post(client, make_event(files, event_id="f")))
    assert failed["state"] == "failed"
    path = failed["status_url"].removeprefix("http://localhost")
    fake_cartd.head = lambda cart: (204, "ready", "")
    retried = client.post(f"{path}/retry")
    assert retried.status_code == 202
    wait_for(lambda: body(client.get(path))["state"] == "done")
    done = body(client.get(path))
    assert done["attempts"] == 2
    assert client.post(f"{path}/retry").status_code == 409  # done: nothing to retry
    assert client.post(f"{path}/rerun").status_code == 404
    deleted = client.delete(path)
    assert body(deleted) == {"deleted": done["job_id"], "download_removed": True}
    assert not Path(done["download_path"]).exists()
    assert leftovers(tmp_path) == []
    assert client.get(path).status_code == 404
    # The record is gone, so the same event is a new job.
    assert body(post(client, make_event(files, event_id="f")))["job_id"] != done["job_id"]


def test_status_url_uses_the_public_url_not_the_senders_host_header(
    make_client: MakeClient, files: list[dict[str, Any]]
) -> None:
    forged = {**JSON, "Host": "evil.example.org", "Prefer": "respond-async"}
    plain = body(post(make_client(), make_event(files, event_id="h1"), forged))
    assert plain["status_url"].startswith("http://evil.example.org/")  # what the request says
    client = make_client(public_url="https://downloader.example.org/base/")
    resp = post(client, make_event(files, event_id="h2"), forged)
    assert body(resp)["status_url"] == f"https://downloader.example.org/base/jobs/{body(resp)['job_id']}"
    assert resp.headers["Location"] == body(resp)["status_url"]


def test_a_batch_is_stored_whole_or_not_at_all(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    def batch(*event_ids: str, bad: str = "") -> bytes:
        docs = []
        for event_id in event_ids:
            data = [] if event_id == bad else make_event(files)["data"]
            attributes = {"id": event_id, "source": "/s", "type": "org.pacifica.metadata.ingest"}
            docs.append(json.loads(to_structured_event(SDKCloudEvent(attributes, data)).body))
        return json.dumps(docs).encode()

    headers = {"Content-Type": "application/cloudevents-batch+json", "Prefer": "respond-async"}
    strict = make_client(strict=True)
    refused = strict.post("/", data=batch("s1", "s2", "s3", bad="s3"), headers=headers)
    assert refused.status_code == 400
    assert body(refused)["detail"].startswith("batch[2]")
    assert body(strict.get("/jobs"))["jobs"] == []  # nothing of it was stored ...
    assert fake_cartd.carts == {}  # ... and no cart was made

    capped = make_client(max_queued=2, workers=0)
    over = capped.post("/", data=batch("c1", "c2", "c3"), headers=headers)
    assert over.status_code == 429
    assert body(capped.get("/jobs"))["jobs"] == []
    taken = capped.post("/", data=batch("c1", "c2"), headers=headers)
    assert taken.status_code == 202
    assert [answer["event_id"] for answer in body(taken)["events"]] == ["c1", "c2"]


def test_a_slow_cart_delete_does_not_hold_the_answer_and_still_happens(
    make_client: MakeClient, files: list[dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    release = threading.Event()
    fake_cartd.before_delete = lambda: release.wait(10)  # Cartd revoking thousands of tasks
    client = make_client()
    started = time.monotonic()
    resp = post(client, make_event(files, event_id="slow-delete"))
    assert resp.status_code == 200 and body(resp)["state"] == "done"
    assert time.monotonic() - started < 3
    assert fake_cartd.deleted == []
    release.set()
    wait_for(lambda: len(fake_cartd.deleted) == 1)
    assert "completion_events" not in body(
        client.get(body(resp)["status_url"].removeprefix("http://localhost"))
    )


@pytest.mark.parametrize("query", ["limit=1&limit=2", "before=a&before=b", "state=done&state=failed"])
def test_a_query_parameter_given_twice_is_a_400_naming_it(make_client: MakeClient, query: str) -> None:
    client = make_client()
    name = query.partition("=")[0]
    resp = client.get(f"/jobs?{query}")
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"] == "bad_request" and repr(name) in resp.get_json()["detail"]
    page = client.get(f"/?{query}", headers={"Accept": "text/html"})
    assert page.status_code == 400 and repr(name) in page.get_json()["detail"]


def test_retry_of_a_queued_job_runs_it_now_and_of_a_done_one_is_409(
    make_client: MakeClient, files: list[dict[str, Any]]
) -> None:
    intake_only = make_client(workers=0)
    queued = post(
        intake_only, make_event(files, event_id="q-1"), {**JSON, "Prefer": "respond-async"}
    ).get_json()
    assert queued["state"] == "queued"
    resp = intake_only.post(f"/jobs/{queued['job_id']}/retry")
    assert resp.status_code == 202 and resp.get_json()["state"] == "queued"
    done = make_client()
    answer = post(done, make_event(files, event_id="d-1")).get_json()
    assert answer["state"] == "done"
    assert done.post(f"/jobs/{answer['job_id']}/retry").status_code == 409


def test_the_same_id_with_another_body_keeps_the_first_job_and_records_the_conflict(
    make_client: MakeClient, files: list[dict[str, Any]]
) -> None:
    client = make_client()
    first = post(client, make_event(files[:1], event_id="same-id")).get_json()
    assert first["state"] == "done"
    again = post(client, make_event(files[:1], event_id="same-id")).get_json()
    assert again.get("duplicate") is True and "conflict" not in again  # the very same event
    other = post(client, make_event(files[1:], event_id="same-id"))
    assert other.status_code == 200  # 2xx all the same: Notifications would cut us off
    answer = other.get_json()
    assert answer["job_id"] == first["job_id"] and answer["conflict"] is True
    shown = client.get(f"/jobs/{first['job_id']}").get_json()
    assert shown["conflicts"]["count"] == 1 and shown["conflicts"]["last"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'downloader_events_total{outcome="conflict"} 1.0' in metrics
    page = client.get("/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert "(1 conflicting)" in page


def test_a_long_layout_is_cut_to_the_file_systems_limit_and_downloads(
    make_client: MakeClient, files: list[dict[str, Any]]
) -> None:
    client = make_client(layout="{event_id}-{source}-{event_id}/{event_id}{event_id}")
    event_id = "é" * 150  # 300 bytes in UTF-8: a component of three of them is 900
    answer = post(client, make_event(files, event_id=event_id)).get_json()
    assert answer["state"] == "done", answer
    path = Path(answer["download_path"])
    assert (path / "data/bar.txt").read_bytes() == BAR
    for part in path.parts[-2:]:
        assert len(part.encode("utf-8")) <= 255, part
    again = post(client, make_event(files, event_id=event_id + "x")).get_json()
    assert again["state"] == "done" and again["download_path"] != answer["download_path"]


@pytest.mark.parametrize("layout", ["{event_id:>300}", "{event_id!r}", "{event_id"])
def test_a_layout_with_a_format_spec_is_refused_at_start(layout: str) -> None:
    from downloader_service.service.settings import settings_from_env

    with pytest.raises(ValueError, match="DOWNLOADER_LAYOUT"):
        settings_from_env({"DOWNLOADER_LAYOUT": layout})


def test_every_error_kind_has_an_http_status() -> None:
    from downloader_service.service.app import KIND_STATUS, kind_status

    assert set(KIND_STATUS) == set(ErrorKind)
    assert all(400 <= status < 600 for status in KIND_STATUS.values())
    assert kind_status("a kind an older version stored") == 500


def test_every_error_class_has_a_kind_of_its_own() -> None:
    # Each class of the tree (library and service) maps to a kind that says what it is; only
    # the root and exceptions that are not ours are internal errors.
    import inspect

    import downloader_service.errors as library_errors
    import downloader_service.service.errors as service_errors
    from downloader_service.service.jobs import ERROR_KINDS, WorkerDiedError, error_kind

    classes = {
        cls
        for module in (library_errors, service_errors)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, DownloaderError)
    } | {WorkerDiedError}
    for cls in classes - {DownloaderError}:
        assert error_kind(cls("x")) != ErrorKind.INTERNAL_ERROR, cls
    assert error_kind(KeyError("x")) == ErrorKind.INTERNAL_ERROR
    # Subclasses come before their bases, or the base would win.
    for index, (cls, _) in enumerate(ERROR_KINDS):
        assert not any(
            issubclass(later, cls) and later is not cls for later, _ in ERROR_KINDS[index + 1 :]
        ), cls


def test_sync_post_is_answered_when_its_job_ends_not_at_a_poll(
    make_client: MakeClient, files: list[dict[str, Any]]
) -> None:
    client = make_client(sync_wait=30)
    service = client.application.service  # type: ignore[attr-defined]
    # No read of the store within the wait but the first: only the job's end can answer 200.
    service.sync_poll = (60.0, 60.0, 60.0)
    resp = post(client, make_event(files, event_id="woken"))
    assert resp.status_code == 200, resp.data
    assert body(resp)["state"] == "done"
    assert service.store.ends.woken == {"local": 1}


def _cherrypy_only(client: Client) -> Client:
    """The same app's requests, every one through CherryPy's own machinery (no fast POST /)."""
    return type(client)(client.application.wsgiapp)


def _comparable(resp: TestResponse) -> tuple[int, dict[str, str], Any]:
    """Status, headers and JSON body of an answer, with what differs between two runs masked."""
    headers = {name: value for name, value in resp.headers.items() if name not in ("Date", "Content-Length")}
    assert resp.headers["Content-Length"] == str(len(resp.data))
    data = json.loads(resp.data)
    masked = {"job_id", "created", "updated", "finished", "last", "status_url", "download_path", "seconds"}

    def mask(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: "*" if key in masked else mask(item) for key, item in value.items()}
        if isinstance(value, list):
            return [mask(item) for item in value]
        return value

    if "Location" in headers:
        headers["Location"] = "*"
    return resp.status_code, headers, mask(data)


@pytest.mark.parametrize("async_", [False, True])
def test_post_is_answered_the_same_past_cherrypy_and_through_it(
    make_client: MakeClient, files: list[dict[str, Any]], async_: bool, tmp_path: Path
) -> None:
    """``POST /`` served by :class:`Application` itself answers as CherryPy's handler does."""
    sender = {"Authorization": "Bearer t"}
    structured = {"Content-Type": "application/cloudevents+json", **sender}
    event = json.dumps({**make_event(files, version="1.0", event_id="same"), "specversion": "1.0"})
    requests: list[tuple[bytes | str, dict[str, str]]] = [
        (json.dumps(make_event(files, event_id="n-1")), {**JSON, **sender}),
        (event, structured),
        (event, structured),  # a duplicate
        (event.replace("same", "other-type").replace("org.pacifica", "org.else"), structured),
        (
            json.dumps([json.loads(event), json.loads(event.replace("same", "b-2"))]),
            {
                "Content-Type": "application/cloudevents-batch+json",
                **sender,
            },
        ),
        (b"{not json", {**JSON, **sender}),
        (event, {"Content-Type": "text/plain", **sender}),
        (event, {"Content-Type": "application/json"}),  # no credential
        (event, {"Authorization": "Bearer wrong", **JSON}),
        (event, {**structured, "Sec-Fetch-Site": "cross-site"}),
        (event, {**structured, "Origin": "https://elsewhere.example"}),
        (b"x" * 5000, {**JSON, **sender}),  # over the body limit
        (event, {**structured, "Prefer": "respond-async"}),
    ]
    # Async without a worker: each answer's state is "queued", not a race with the download.
    settings = {
        "token": "t",
        "max_body_bytes": 4096,
        "respond_async": async_,
        **({"workers": 0} if async_ else {}),
    }
    fast = make_client(**settings, state_dir=str(tmp_path / "fast"))
    slow = _cherrypy_only(make_client(**settings, state_dir=str(tmp_path / "slow")))
    for data, headers in requests:
        ours, theirs = fast.post("/", data=data, headers=headers), slow.post("/", data=data, headers=headers)
        assert _comparable(ours) == _comparable(theirs), (data[:80], headers)
    strict_fast = make_client(strict=True, state_dir=str(tmp_path / "strict-fast"))
    strict_slow = _cherrypy_only(make_client(strict=True, state_dir=str(tmp_path / "strict-slow")))
    rejected = json.dumps(make_event([], event_id="none"))
    assert _comparable(strict_fast.post("/", data=rejected, headers=JSON)) == _comparable(
        strict_slow.post("/", data=rejected, headers=JSON)
    )


def test_an_accepted_event_is_one_access_line_naming_its_job(
    make_client: MakeClient, files: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(respond_async=True, workers=0)
    for number, served in enumerate((client, _cherrypy_only(client))):
        caplog.clear()
        with caplog.at_level("INFO"):
            answer = post(served, make_event(files, event_id=f"line-{number}"))
        assert answer.status_code == 202
        lines = [record for record in caplog.records if record.levelno >= logging.INFO]
        assert [record.name.split(".")[:2] for record in lines] == [["cherrypy", "access"]], lines
        [line] = lines
        assert '"POST / HTTP/1.1" 202 ' in line.getMessage()
        job = body(answer)
        assert (line.event_id, line.job_id, line.state, line.duplicate) == (  # type: ignore[attr-defined]
            f"line-{number}",
            job["job_id"],
            "queued",
            False,
        )
    caplog.clear()
    batch = [make_event(files, version="1.0", event_id=f"many-{n}") for n in range(2)]
    with caplog.at_level("INFO"):
        client.post(
            "/", data=json.dumps(batch), headers={"Content-Type": "application/cloudevents-batch+json"}
        )
    # A batch keeps a line for each event it made a job of, and the access line.
    assert [record.getMessage() for record in caplog.records if record.name.endswith("intake")] == [
        "event accepted",
        "event accepted",
    ]


def test_redact_masks_what_every_pattern_masks_and_skips_the_rest() -> None:
    # redact() runs a pattern only on text with the character it needs: the same result as all three.
    from downloader_service.service import logs

    def every_pattern(text: str) -> str:
        text = logs._SECRET_PARAM.sub(logs._MASKED, text)
        text = logs._AUTH_HEADER.sub(logs._MASKED, text)
        return logs._URL_PASSWORD.sub(logs._MASKED + "@", text)

    pieces = [
        "GET /jobs?",
        "access_token=abc",
        "&client_password=p",
        "Authorization: Bearer x",
        "authorization=y",
        "'Authorization': 'Basic eA=='",
        "postgresql://u:secret@db/x",
        "http://h:1/",
        "@",
        "=",
        ":",
        " ",
        "queued",
        "3f2a9c1b7d4e",
    ]
    import itertools

    for length in (1, 2, 3):
        for parts in itertools.product(pieces, repeat=length):
            text = "".join(parts)
            assert logs.redact(text) == every_pattern(text), text
