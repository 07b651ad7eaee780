"""Who may do what (service/auth.py): the sender's credential, the operators', strangers, other sites."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests

from downloader_service.service.auth import check_same_origin, is_loopback
from tests.conftest import MakeClient, served
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd

ELSEWHERE = {"REMOTE_ADDR": "192.0.2.7"}
SENDER = {"Authorization": "Bearer sender-token"}
OPERATOR = {"Authorization": "Bearer ops-token"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def failed_job(make_client: MakeClient, fake_cartd: FakeCartd) -> tuple[Any, str]:
    """A client with both credentials set, and a failed job (Cartd failed its cart) to act on."""
    fake_cartd.add(34, b"x")
    fake_cartd.head = lambda cart: (500, "error", "no such file")
    client = make_client(token="sender-token", admin_token="ops-token", retry_window=0.0)
    event = make_event([file_obj(34, "x.txt", "", b"x")], event_id="auth-1")
    answer = client.post("/", data=json.dumps(event), headers={**JSON, **SENDER}).get_json()
    assert answer["state"] == "failed", answer
    return client, answer["job_id"]


def test_the_senders_credential_posts_events_and_opens_nothing_else(failed_job: tuple[Any, str]) -> None:
    client, job_id = failed_job
    for method, path in (("GET", "/jobs"), ("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/retry")):
        resp = client.open(path, method=method, headers=SENDER)
        assert resp.status_code == 403, (method, path, resp.get_data(as_text=True))
    assert client.delete(f"/jobs/{job_id}", headers=SENDER).status_code == 403
    assert client.get(f"/jobs/{job_id}", headers=OPERATOR).get_json()["state"] == "failed"  # untouched
    assert client.get("/jobs").status_code == 401  # no credential: asked for one
    assert client.post(f"/jobs/{job_id}/retry", headers=OPERATOR).status_code == 202


def test_the_operators_credential_does_not_post_events(failed_job: tuple[Any, str]) -> None:
    client, _job_id = failed_job
    event = make_event([file_obj(34, "x.txt", "", b"x")], event_id="auth-2")
    assert client.post("/", data=json.dumps(event), headers={**JSON, **OPERATOR}).status_code == 401


def test_without_an_operators_credential_only_this_host_operates(make_client: MakeClient) -> None:
    client = make_client(token="sender-token")
    assert client.get("/jobs").status_code == 200
    refused = client.get("/jobs", environ_base=ELSEWHERE)
    assert refused.status_code == 403 and "DOWNLOADER_ADMIN_TOKEN" in refused.get_json()["detail"]
    assert client.get("/jobs", headers=SENDER, environ_base=ELSEWHERE).status_code == 403


def test_health_ready_shows_paths_and_urls_to_operators_only(make_client: MakeClient, tmp_path: Path) -> None:
    client = make_client(admin_token="ops-token", database_url=f"sqlite:///{tmp_path}/secret-place.db")
    public = client.get("/health/ready")
    text = public.get_data(as_text=True)
    assert str(tmp_path) not in text and "sqlite" not in text and "127.0.0.1" not in text, text
    assert set(public.get_json()["checks"]) == {"store", "cartd", "download_root"}
    full = client.get("/health/ready", headers=OPERATOR).get_data(as_text=True)
    assert "secret-place.db" in full and str(tmp_path) in full


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost"},
        {"Origin": "null"},
    ],
    ids=["other-origin", "cross-site", "same-site", "opaque-origin"],
)
def test_a_browser_request_from_another_site_changes_nothing(
    failed_job: tuple[Any, str], headers: dict[str, str]
) -> None:
    client, job_id = failed_job
    before = client.get(f"/jobs/{job_id}", headers=OPERATOR).get_json()
    resp = client.post(f"/jobs/{job_id}/retry", headers={**OPERATOR, **headers})
    assert resp.status_code == 403 and resp.get_json()["error"] == "cross_site"
    assert client.delete(f"/jobs/{job_id}", headers={**OPERATOR, **headers}).status_code == 403
    after = client.get(f"/jobs/{job_id}", headers=OPERATOR).get_json()
    assert (after["state"], after["attempts"]) == (before["state"], before["attempts"])


def test_check_same_origin_lets_the_page_and_non_browsers_through() -> None:
    own = "http://127.0.0.1:8080"
    check_same_origin("POST", {}, own)  # curl, the CLI, Notifications: no browser headers
    check_same_origin("POST", {"Origin": "http://127.0.0.1:8080", "Sec-Fetch-Site": "same-origin"}, own)
    check_same_origin("DELETE", {"Origin": "http://127.0.0.1"}, "http://127.0.0.1:80")
    # Behind a TLS proxy without DOWNLOADER_PUBLIC_URL: the same host, another scheme and port.
    check_same_origin(
        "POST", {"Origin": "https://ops.example", "Sec-Fetch-Site": "same-origin"}, "http://ops.example"
    )
    check_same_origin("GET", {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}, own)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("192.0.2.7") and not is_loopback("")


def test_a_cross_site_form_post_over_a_real_socket_is_refused(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    """What a form on another site makes a logged-in browser send (basic auth goes by itself)."""
    fake_cartd.add(35, b"y")
    fake_cartd.head = lambda cart: (500, "error", "no such file")
    root = tmp_path / "root"
    root.mkdir()
    env = {
        "CARTD_URL": fake_cartd.url,
        "DOWNLOADER_ROOT": str(root),
        "DOWNLOADER_RETRY_WINDOW": "0",
        "DOWNLOADER_ADMIN_BASIC_AUTH": "ops:pw",
    }
    with served(env, tmp_path / "server.log") as (url, _proc):
        event = make_event([file_obj(35, "y.txt", "", b"y")], event_id="csrf-1")
        job = requests.post(url, json=event, timeout=30).json()
        assert job["state"] == "failed", job
        browser = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
        retry = f"{url}/jobs/{job['job_id']}/retry"
        forged = requests.post(retry, auth=("ops", "pw"), headers=browser, timeout=10)
        assert forged.status_code == 403
        state = requests.get(f"{url}/jobs/{job['job_id']}", auth=("ops", "pw"), timeout=10).json()
        assert (state["state"], state["attempts"]) == ("failed", 1)
        page = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
        own = requests.post(retry, auth=("ops", "pw"), headers=page, timeout=10)
        assert own.status_code == 202
