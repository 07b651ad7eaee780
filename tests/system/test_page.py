"""The jobs page at ``GET /`` for browsers: WSGI tests, and one in a real headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from werkzeug.test import Client, TestResponse

from downloader_service.service.page import DETAIL_MAX, PAGE_SIZE, wants_html
from tests.conftest import MakeClient, served
from tests.events import file_obj, make_event
from tests.fakecartd import Cart, FakeCartd

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
HTML = {"Accept": BROWSER_ACCEPT}
JSON = {"Content-Type": "application/json"}
HOSTILE = "<script>alert(1)</script>"
GOOD, BAD = b"good data\n", b"bad data\n"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def fails_file(file_id: int, message: str = "boom") -> Callable[[Cart], tuple[int, str, str]]:
    """A Cartd ``head`` knob: carts holding ``file_id`` fail with ``message``, others are ready."""

    def head(cart: Cart) -> tuple[int, str, str]:
        if any(obj["id"] == str(file_id) for obj in cart.fileids):
            return 500, "error", message
        return 204, "ready", ""

    return head


@pytest.fixture
def good_and_bad(fake_cartd: FakeCartd) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two events: file 71 downloads, the cart of file 72 fails (until the test heals it)."""
    fake_cartd.add(71, GOOD)
    fake_cartd.add(72, BAD)
    fake_cartd.head = fails_file(72)
    good = make_event([file_obj(71, "good.txt", "", GOOD)], event_id="page-good")
    bad = make_event([file_obj(72, "bad.txt", "", BAD)], event_id="page-bad")
    return good, bad


def post(client: Client, event: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = client.post("/", data=json.dumps(event), headers={**JSON, **(headers or {})})
    assert resp.status_code == 200, resp.data
    answer: dict[str, Any] = json.loads(resp.data)
    return answer


def page(resp: TestResponse, status: int = 200) -> str:
    assert resp.status_code == status, resp.data
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    return resp.data.decode()


def row(html: str, job_id: str) -> str:
    found = re.search(rf'<tr id="job-{job_id}"[^>]*>.*?</tr>', html)
    assert found, f"no row for job {job_id}"
    return found.group(0)


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("text/*", True),
        ("application/xhtml+xml", True),
        ("", False),
        ("*/*", False),
        ("application/json", False),
        ("application/json, text/html;q=0.9", False),
        ("text/html;q=0, */*", False),
        ("text/html;q=oops, */*;q=0.1", False),
    ],
)
def test_wants_html_prefers_json_unless_html_is_asked_for_more(accept: str, html: bool) -> None:
    assert wants_html(accept) is html


def test_page_lists_jobs_with_their_outcome(
    make_client: MakeClient, good_and_bad: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    client = make_client()
    done, failed = (post(client, event) for event in good_and_bad)
    assert (done["state"], failed["state"]) == ("done", "failed")
    html = page(client.get("/", headers=HTML))

    done_row = row(html, done["job_id"])
    assert 'data-state="done"' in done_row
    assert ">page-good<" in done_row
    assert ">/pacifica/metadata/ingest<" in done_row
    assert f'<td class="num">{len(GOOD)}</td>' in done_row
    assert f"<code>{done['download_path']}</code>" in done_row
    assert f'<a href="jobs/{done["job_id"]}">JSON</a>' in done_row
    assert 'class="retry"' not in done_row
    assert 'data-method="DELETE"' in done_row

    failed_row = row(html, failed["job_id"])
    assert 'data-state="failed"' in failed_row
    assert "<b>cart_failed</b>" in failed_row
    assert "boom" in failed_row
    assert f'data-method="POST" data-url="jobs/{failed["job_id"]}/retry"' in failed_row
    assert ">all (2)<" in html
    assert ">done (1)<" in html
    assert ">failed (1)<" in html
    # Newest first.
    assert html.index(failed["job_id"]) < html.index(done["job_id"])


def test_page_buttons_name_the_job_api(
    make_client: MakeClient, good_and_bad: tuple[dict[str, Any], dict[str, Any]], fake_cartd: FakeCartd
) -> None:
    client = make_client()
    done, failed = (post(client, event) for event in good_and_bad)
    html = page(client.get("/", headers=HTML))
    buttons = re.findall(r'data-method="(\w+)" data-url="([^"]+)"', html)
    assert ("POST", f"jobs/{failed['job_id']}/retry") in buttons
    assert ("DELETE", f"jobs/{done['job_id']}") in buttons

    # What the script calls, relative to the page at /.
    fake_cartd.head = lambda cart: (204, "ready", "")
    assert client.post(f"/jobs/{failed['job_id']}/retry").status_code == 202
    assert client.delete(f"/jobs/{done['job_id']}").status_code == 200
    assert done["job_id"] not in page(client.get("/", headers=HTML))


def test_page_escapes_hostile_event_ids_sources_and_errors(make_client: MakeClient) -> None:
    client = make_client()
    hostile_source = '"><img src=x onerror=alert(2)>'
    event = {**make_event([], event_id=HOSTILE), "source": hostile_source, "eventType": "<b>evil</b>"}
    rejected = post(client, event)
    assert rejected["state"] == "rejected"
    assert HOSTILE in rejected["detail"]
    html = page(client.get("/", headers=HTML))
    assert html.count("<script") == 1  # the page's own
    assert "<img" not in html
    assert "<b>evil" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in html  # MarkupSafe writes " as &#34;
    assert "&lt;b&gt;evil&lt;/b&gt;" in html
    # No inline event handler anywhere: the script listens for clicks itself.
    assert not re.search(r"<[^>]*\son\w+=", html)


def test_page_shortens_long_error_details_and_keeps_them_whole_in_the_title(make_client: MakeClient) -> None:
    client = make_client()
    long_id = "x" * 300
    post(client, {**make_event([], event_id=long_id), "eventType": "other"})
    html = page(client.get("/", headers=HTML))
    shown = re.search(r'<span class="error" title="([^"]*)">(.*?)</span>', html)
    assert shown is not None
    assert long_id in shown.group(1)
    assert long_id not in shown.group(2)
    assert "…" in shown.group(2)
    assert len(shown.group(2)) < DETAIL_MAX + 50


def test_page_has_a_strict_content_security_policy(make_client: MakeClient) -> None:
    client = make_client()
    first, second = client.get("/", headers=HTML), client.get("/", headers=HTML)
    policy = first.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    nonce = re.search(r"script-src 'nonce-([\w-]+)'", policy)
    assert nonce is not None
    html = page(first)
    assert f'<script nonce="{nonce.group(1)}">' in html
    assert f'<style nonce="{nonce.group(1)}">' in html
    assert nonce.group(1) not in second.headers["Content-Security-Policy"]
    assert first.headers["Referrer-Policy"] == "no-referrer"
    assert first.headers["Cache-Control"] == "no-store"


def test_page_needs_the_operators_token_when_one_is_configured(
    make_client: MakeClient, good_and_bad: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    client = make_client(token="s3cret", admin_token="ops-token")
    failed = post(client, good_and_bad[1], {"Authorization": "Bearer s3cret"})
    refused = client.get("/", headers=HTML)
    assert refused.status_code == 401
    assert "Bearer" in refused.headers["WWW-Authenticate"]
    assert failed["job_id"] not in refused.data.decode()
    assert client.get("/?access_token=wrong", headers=HTML).status_code == 401
    # The sender's credential (kept in clear in Notifications' database) opens nothing here.
    assert client.get("/?access_token=s3cret", headers=HTML).status_code == 403
    assert client.get("/", headers={**HTML, "Authorization": "Bearer s3cret"}).status_code == 403

    assert failed["job_id"] in page(client.get("/", headers={**HTML, "Authorization": "Bearer ops-token"}))
    html = page(client.get("/?access_token=ops-token", headers=HTML))
    # Links keep the token (the script sends it on as a bearer header itself).
    assert f'href="jobs/{failed["job_id"]}?access_token=ops-token"' in html
    assert 'href="./?state=failed&amp;access_token=ops-token"' in html


def test_page_takes_basic_auth_when_configured(make_client: MakeClient) -> None:
    client = make_client(admin_basic_auth="ops:pw")
    refused = client.get("/", headers=HTML)
    assert refused.status_code == 401
    assert 'Basic realm="downloader"' in refused.headers["WWW-Authenticate"]
    credentials = base64.b64encode(b"ops:pw").decode()
    page(client.get("/", headers={**HTML, "Authorization": f"Basic {credentials}"}))


def test_without_an_operators_credential_only_this_host_sees_the_page(make_client: MakeClient) -> None:
    client = make_client(token="s3cret")
    elsewhere = {"REMOTE_ADDR": "192.0.2.7"}
    refused = client.get("/", headers=HTML, environ_base=elsewhere)
    assert refused.status_code == 403 and "DOWNLOADER_ADMIN_TOKEN" in refused.get_json()["detail"]
    assert (
        client.get(
            "/", headers={**HTML, "Authorization": "Bearer s3cret"}, environ_base=elsewhere
        ).status_code
        == 403
    )
    page(client.get("/", headers=HTML))  # from this host
    assert client.get("/", headers=HTML, environ_base={"REMOTE_ADDR": "::1"}).status_code == 200


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "application/json, text/html;q=0.5"])
def test_json_clients_still_get_json_at_root(make_client: MakeClient, accept: str | None) -> None:
    resp = make_client(token="s3cret").get("/", headers={"Accept": accept} if accept else {})
    assert resp.status_code == 200  # no auth: it only describes the service
    assert resp.headers["Content-Type"] == "application/json"
    assert json.loads(resp.data)["service"] == "pacifica-downloader-service"


def test_unknown_paths_stay_json_404_for_browsers(make_client: MakeClient) -> None:
    resp = make_client().get("/favicon.ico", headers=HTML)
    assert resp.status_code == 404
    assert json.loads(resp.data)["error"] == "not_found"


def test_page_filters_by_state(
    make_client: MakeClient, good_and_bad: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    client = make_client()
    done, failed = (post(client, event) for event in good_and_bad)
    html = page(client.get("/?state=failed", headers=HTML))
    assert failed["job_id"] in html
    assert done["job_id"] not in html
    assert '<a href="./?state=failed" class="current" aria-current="page">failed (1)</a>' in html
    assert "No queued jobs." in page(client.get("/?state=queued", headers=HTML))

    refused = page(client.get("/?state=%3Cb%3E", headers=HTML), status=400)
    assert "state must be one of" in refused
    assert "&#39;&lt;b&gt;&#39;" in refused  # the repr's quotes, escaped (MarkupSafe: &#39;)


def test_page_shows_the_newest_jobs_only(make_client: MakeClient) -> None:
    client = make_client(workers=0)
    for index in range(PAGE_SIZE + 2):
        post(client, {**make_event([], event_id=f"n{index}")})
    html = page(client.get("/", headers=HTML))
    assert html.count("<tr id=") == PAGE_SIZE
    assert ">n0<" not in html
    assert f">all ({PAGE_SIZE + 2})<" in html


# --- in a real browser --------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Headless Chromium (Debian's, driven by its chromedriver); in CI a missing one fails."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = (
            f"no {', '.join(missing)}: run scripts/install-browser.sh and pip install -e '.[test]' "
            "(scripts/test does both)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()  # stops the chromedriver it started, and its browser


@pytest.mark.integration
def test_browser_lists_jobs_and_retry_requeues_the_failed_one(
    browser: WebDriver,
    fake_cartd: FakeCartd,
    good_and_bad: tuple[dict[str, Any], dict[str, Any]],
    tmp_path: Path,
) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    root = tmp_path / "root"
    root.mkdir()
    token = "browser-token"
    env = {
        "CARTD_URL": fake_cartd.url,
        "DOWNLOADER_ROOT": str(root),
        "DOWNLOADER_RETRY_WINDOW": "0",
        "DOWNLOADER_TOKEN": "sender-token",
        "DOWNLOADER_ADMIN_TOKEN": token,
    }
    good, bad = good_and_bad
    bad["eventID"] = '<img src=x onerror="alert(1)">'  # an alert would break every call below
    auth = {"Authorization": "Bearer sender-token"}
    with served(env, tmp_path / "server.log") as (url, _proc):
        done, failed = (requests.post(url, json=e, headers=auth, timeout=30).json() for e in (good, bad))
        assert (done["state"], failed["state"]) == ("done", "failed"), (done, failed)

        browser.get(f"{url}/?access_token={token}")
        done_row = browser.find_element(By.ID, f"job-{done['job_id']}")
        failed_row = browser.find_element(By.ID, f"job-{failed['job_id']}")
        assert done_row.find_element(By.CSS_SELECTOR, "td.state").text == "done"
        assert failed_row.find_element(By.CSS_SELECTOR, "td.state").text == "failed"
        assert failed_row.find_element(By.CSS_SELECTOR, "td.event").text == bad["eventID"]
        assert "cart_failed" in failed_row.find_element(By.CSS_SELECTOR, "td.outcome").text
        assert not done_row.find_elements(By.CSS_SELECTOR, "button.retry")

        fake_cartd.head = lambda cart: (204, "ready", "")
        failed_row.find_element(By.CSS_SELECTOR, "button.retry").click()
        # The script calls the API, then reloads: the old row goes stale. Mid-reload Chromium
        # may say so as "Node with given id does not belong to the document" rather than as a
        # stale reference (selenium's staleness_of lets that through and failed CI once).

        def old_row_gone(_driver: WebDriver) -> bool:
            try:
                failed_row.is_enabled()
            except WebDriverException:  # StaleElementReferenceException is one
                return True
            return False

        WebDriverWait(browser, 10).until(old_row_gone)
        deadline = time.monotonic() + 30
        while True:
            state = browser.find_element(By.CSS_SELECTOR, f"#job-{failed['job_id']} td.state").text
            if state == "done":
                break
            assert state in ("queued", "running"), state
            assert time.monotonic() < deadline, f"job still {state}"
            time.sleep(0.2)
            browser.refresh()
        retried = browser.find_element(By.ID, f"job-{failed['job_id']}")
        assert not retried.find_elements(By.CSS_SELECTOR, "button.retry")
        assert str(root) in retried.find_element(By.CSS_SELECTOR, "td.outcome").text
        operator = {"Authorization": f"Bearer {token}"}  # the sender's credential would be a 403
        status = requests.get(f"{url}/jobs/{failed['job_id']}", headers=operator, timeout=10).json()
        assert (status["state"], status["attempts"]) == ("done", 2)

    # The page's own script and style ran under its policy: nothing was refused.
    logged = [entry["message"] for entry in browser.get_log("browser")]
    assert not [message for message in logged if "Content Security Policy" in message], logged
