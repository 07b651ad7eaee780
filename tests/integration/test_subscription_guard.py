"""The subscription survives, with the real sender: pacifica-notifications 0.5.2 and ``serve``.

Each test uses a Notifications user of its own (``GET /eventmatch`` lists one user's
subscriptions) and a JSONPath rule of its own (``testCase`` in the events' extensions), so
the session-wide Notifications routes it nothing of another test's. The service guards its
subscription every ``DOWNLOADER_SUBSCRIPTION_CHECK`` (1 s here) seconds.

The restart scenario leaves one row per engine on stdout (and in ``$DELIVERY_REPORT``):
service down N s with K events arriving, re-enabled after S s, the gap's window, replayed,
downloaded, duplicated.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.notifications import NotificationsStack, ingest_jsonpath
from devstack.pacifica import PacificaStack
from devstack.postgres import PostgresServer
from tests.conftest import SCRIPT, free_port, served
from tests.events import file_obj, make_event

pytestmark = pytest.mark.integration

CHECK = "1"  # DOWNLOADER_SUBSCRIPTION_CHECK: seconds
DOWN_SECONDS = float(os.environ.get("SUBSCRIPTION_DOWN_SECONDS", "10"))


class Site:
    """One test's service settings, Notifications user and rule, events and files."""

    def __init__(
        self,
        tmp_path: Path,
        engine: str,
        postgres: PostgresServer,
        cartd: PacificaStack,
        notifications: NotificationsStack,
        file_ids: Iterator[int],
        notifications_url: str | None = None,
    ) -> None:
        self.case = f"sub-{engine[:2]}-{uuid.uuid4().hex[:10]}"
        self.user = f"user-{self.case}"
        self.tmp_path, self.cartd, self.notifications, self.file_ids = (
            tmp_path,
            cartd,
            notifications,
            file_ids,
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = tmp_path / "downloads"
        self.env = {
            "CARTD_URL": cartd.cartd_url,
            "DOWNLOADER_ROOT": str(self.root),
            "DOWNLOADER_STATE_DIR": str(tmp_path / "state"),
            "DOWNLOADER_DATABASE_URL": "",
            "DOWNLOADER_ASYNC": "true",
            "DOWNLOADER_RETRY_BASE": "0.5",
            "DOWNLOADER_RETRY_MAX_DELAY": "3",
            "DOWNLOADER_CART_TIMEOUT": "8",
            "DOWNLOADER_PUBLIC_URL": self.url,
            "DOWNLOADER_NOTIFICATIONS_URL": notifications_url or notifications.url,
            "DOWNLOADER_NOTIFICATIONS_USER": self.user,
            "DOWNLOADER_SUBSCRIPTION_JSONPATH": ingest_jsonpath(testCase=self.case),
            "DOWNLOADER_SUBSCRIPTION_NAME": f"downloader {self.case}",
            "DOWNLOADER_SUBSCRIPTION_CHECK": CHECK,
        }
        if engine == "postgresql":
            self.env["DOWNLOADER_DATABASE_URL"] = postgres.create_database(f"sub_{uuid.uuid4().hex[:12]}")
        self.contents: dict[str, dict[str, bytes]] = {}  # event id -> path -> bytes
        self.logs: list[Path] = []

    def serve(self, **env: str) -> Any:
        log = self.tmp_path / f"service-{len(self.logs)}.log"
        self.logs.append(log)
        return served({**self.env, **env}, log, port=self.port)

    def cli(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPT), *args],
            input=stdin,
            env={**os.environ, **self.env, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def event(self) -> dict[str, Any]:
        """A valid event whose two files are stored in the real archive."""
        event_id = f"{self.case}-{len(self.contents):03d}"
        objs, contents = [], {}
        for number in range(2):
            data = os.urandom(512 + number)
            file_id = next(self.file_ids)
            self.cartd.put_file(file_id, data)
            objs.append(file_obj(file_id, f"f{number}.bin", f"e{len(self.contents)}", data))
            contents[f"e{len(self.contents)}/f{number}.bin"] = data
        event = make_event(objs, event_id=event_id)
        event["extensions"] = {"testCase": self.case}
        self.contents[event_id] = contents
        return event

    def subscriptions(self) -> list[dict[str, Any]]:
        return self.notifications.subscriptions(self.user)

    def ready(self) -> dict[str, Any]:
        return dict(requests.get(f"{self.url}/health/ready", timeout=10).json())

    def jobs(self) -> list[dict[str, Any]]:
        return list(requests.get(f"{self.url}/jobs?limit=500", timeout=10).json()["jobs"])

    def log_tail(self) -> str:
        return "\n".join(
            f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            for log in self.logs
        )


def wait(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def site(
    tmp_path: Path,
    postgres: PostgresServer,
    pacifica_stack: PacificaStack,
    notifications_stack: NotificationsStack,
    file_ids: Iterator[int],
) -> Callable[..., Site]:
    def make(engine: str = "sqlite", notifications_url: str | None = None) -> Site:
        return Site(
            tmp_path, engine, postgres, pacifica_stack, notifications_stack, file_ids, notifications_url
        )

    return make


def emit(row: dict[str, Any]) -> None:
    print("\nSUBSCRIPTION " + " ".join(f"{key}={value}" for key, value in row.items()))
    report = os.environ.get("DELIVERY_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- scenarios
@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_restart_while_events_arrive_reenables_records_the_gap_and_replay_downloads_the_rest(
    site: Callable[..., Site], engine: str, notifications_stack: NotificationsStack
) -> None:
    run = site(engine)
    before = [run.event() for _ in range(3)]
    missed = [run.event() for _ in range(5)]
    with run.serve() as (_url, _proc):
        sub = wait("the subscription created", lambda: run.subscriptions(), 20)
        assert len(sub) == 1 and sub[0]["target_url"] == run.url + "/", sub
        for event in before:
            notifications_stack.send(event)
        wait("the first events done", lambda: sum(j["state"] == "done" for j in run.jobs()) == 3, 60)
    # The service is down (killed): the first event disables the subscription, the rest are
    # never routed, and nothing re-enables it until the service is back.
    down_since = time.monotonic()
    for event in missed:
        notifications_stack.send(event)
        time.sleep(0.2)
    wait("the events logged", lambda: notifications_stack.logged_events(run.case) == 8, 30)
    disabled = wait("the subscription disabled", lambda: run.subscriptions()[0]["disabled"], 30)
    time.sleep(max(0.0, DOWN_SECONDS - (time.monotonic() - down_since)))
    assert run.subscriptions()[0]["disabled"], "something re-enabled it while the service was down"
    down = time.monotonic() - down_since

    with run.serve() as (_url, _proc):
        started = time.monotonic()
        wait("the subscription enabled again", lambda: not run.subscriptions()[0]["disabled"], 10, 0.05)
        reenabled_after = time.monotonic() - started
        # The guard records the gap, enables the subscription, then closes the gap's window:
        # seen in between, the gap has no end yet.
        ready = wait(
            "the gap reported",
            lambda: [g for g in run.ready()["subscription"]["gaps"] if g["enabled_at"] is not None],
            10,
        )
        [gap] = ready
        assert gap["kind"] == "disabled" and gap["disabled_at"] == disabled, gap
        assert gap["window"]["start"] <= disabled.replace("T", " ")[:19] <= gap["window"]["end"], gap
        assert gap["enabled_at"] is not None and gap["replay"].endswith(f"--gap {gap['id']} -"), gap
        metrics = requests.get(f"{run.url}/metrics", timeout=10).text
        assert (
            "downloader_subscription_gaps 1.0" in metrics and "downloader_subscription_enabled 1.0" in metrics
        )
        page = requests.get(f"{run.url}/", headers={"Accept": "text/html"}, timeout=10).text
        assert f"--gap {gap['id']} -" in page, page[:3000]
        assert {j["event_id"] for j in run.jobs()} == {e["eventID"] for e in before}, "routed while disabled?"

        # The runbook: eventget of the gap's window piped into jobs import.
        logged = notifications_stack.eventget(gap["window"]["start"], gap["window"]["end"])
        done = run.cli("jobs", "import", "--gap", gap["id"], "--json", "-", stdin=logged)
        assert done.returncode == 0, done.stderr
        counts = json.loads(done.stdout)
        assert counts["new"] == 5 and counts["known"] == 3 and counts["rejected"] == 0, counts
        assert counts["gaps_replayed"] == [gap["id"]], counts
        wait("every event done", lambda: sum(j["state"] == "done" for j in run.jobs()) == 8, 90)
        assert run.ready()["subscription"]["gaps"] == []
        metrics = requests.get(f"{run.url}/metrics", timeout=10).text
        assert "downloader_subscription_gaps 0.0" in metrics
        jobs = run.jobs()

    # Every event's files once, verified; no directory twice.
    assert sorted(j["event_id"] for j in jobs) == sorted(run.contents)
    dirs = sorted(entry.name for entry in run.root.iterdir())
    assert len(dirs) == 8, dirs
    for job in jobs:
        data = Path(job["download_path"]) / "data"
        for rel, content in run.contents[job["event_id"]].items():
            assert (data / rel).read_bytes() == content
    assert len(run.subscriptions()) == 1
    again = run.cli("jobs", "import", "-", stdin=logged)
    assert again.returncode == 0 and again.stdout.startswith("0 new, 8 already known"), again
    emit(
        {
            "engine": engine,
            "down_s": round(down, 1),
            "arrived_while_down": len(missed),
            "reenabled_after_s": round(reenabled_after, 2),
            "gap": f"{gap['window']['start']} .. {gap['window']['end']}",
            "replayed": counts["new"],
            "downloaded": len(jobs),
            "duplicated": len(dirs) - len(run.contents),
        }
    )


def test_two_replicas_and_three_subscribe_commands_make_one_subscription(
    site: Callable[..., Site], tmp_path: Path
) -> None:
    run = site("postgresql")
    second = {**run.env}
    log = tmp_path / "replica-2.log"
    with run.serve() as (_url, _proc), served(second, log, port=free_port()) as (url2, _proc2):
        results: list[subprocess.CompletedProcess[str]] = []
        threads = [threading.Thread(target=lambda: results.append(run.cli("subscribe"))) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.returncode for r in results] == [0, 0, 0], [r.stderr for r in results]
        time.sleep(3 * float(CHECK))
        subs = run.subscriptions()
        assert len(subs) == 1, subs
        assert {json.loads(r.stdout)["uuid"] for r in results} == {subs[0]["uuid"]}
        ready = requests.get(f"{url2}/health/ready", timeout=10).json()["subscription"]
        assert ready["state"] == "enabled" and ready["subscription"] == subs[0]["uuid"], ready


def test_a_subscription_deleted_by_hand_is_recreated_and_the_window_recorded(
    site: Callable[..., Site], notifications_stack: NotificationsStack
) -> None:
    run = site()
    with run.serve() as (_url, _proc):
        [first] = wait("the subscription created", lambda: run.subscriptions(), 20)
        notifications_stack.unsubscribe(first["uuid"], user=run.user)
        [second] = wait(
            "a new subscription", lambda: [s for s in run.subscriptions() if s["uuid"] != first["uuid"]], 10
        )
        assert second["target_url"] == run.url + "/" and not second["disabled"]
        [gap] = wait("the gap", lambda: run.ready()["subscription"]["gaps"], 10)
        assert gap["kind"] == "deleted" and gap["subscription"] == first["uuid"], gap
        dismissed = run.cli("subscription", "dismiss", gap["id"], "--note", "deleted on purpose")
        assert dismissed.returncode == 0, dismissed.stderr
        assert run.ready()["subscription"]["gaps"] == []


class FlakyProxy:
    """Our own front for Notifications: forwards requests, or is down, or wants basic auth."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.credentials: tuple[str, str] | None = None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                if proxy.credentials is not None:
                    given = requests.auth._basic_auth_str(*proxy.credentials)
                    if self.headers.get("Authorization") != given:
                        self._send(401, b'{"message": "wrong credentials"}')
                        return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")
                }
                resp = requests.request(
                    self.command, proxy.target + self.path, data=body, headers=headers, timeout=30
                )
                self._send(resp.status_code, resp.content, resp.headers.get("Date"))

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def _send(self, status: int, body: bytes, date: str | None = None) -> None:
                self.send_response_only(status)
                self.send_header("Date", date or self.date_time_string())
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def test_notifications_down_during_checks_is_no_gap_and_the_guard_carries_on(
    site: Callable[..., Site], notifications_stack: NotificationsStack
) -> None:
    proxy = FlakyProxy(notifications_stack.url)
    run = site(notifications_url=proxy.url)
    try:
        with run.serve() as (_url, proc):
            state = wait(
                "a check that failed",
                lambda: (s := run.ready()["subscription"]).get("checked") and s,
                10,
            )
            assert state["state"] == "unknown" and "cannot be reached" in state["reason"], state
            assert state["gaps"] == [], state
            time.sleep(3 * float(CHECK))
            assert proc.poll() is None
            proxy.up()
            wait("the subscription created", lambda: run.subscriptions(), 10)
            wait("the state enabled", lambda: run.ready()["subscription"]["state"] == "enabled", 10)
            proxy.down()
            time.sleep(3 * float(CHECK))
            proxy.up()
            wait("the state enabled again", lambda: run.ready()["subscription"]["state"] == "enabled", 10)
            assert run.ready()["subscription"]["gaps"] == []
            assert len(run.subscriptions()) == 1
            lines = [json.loads(x) for x in run.logs[0].read_text().splitlines() if x.startswith("{")]
            failures = [x for x in lines if x["message"].startswith("subscription check failed")]
            assert 1 <= len(failures) <= 3, failures  # once per new reason, not once per check
    finally:
        proxy.down()


def test_subscribe_refused_or_unreachable_is_one_line_and_its_exit_code(
    site: Callable[..., Site], notifications_stack: NotificationsStack
) -> None:
    proxy = FlakyProxy(notifications_stack.url)
    proxy.credentials = ("operator", "right-password")
    run = site()
    host = proxy.url.removeprefix("http://")
    try:
        unreachable = run.cli("subscribe", DOWNLOADER_NOTIFICATIONS_URL=proxy.url)
        assert unreachable.returncode == 5, unreachable
        assert unreachable.stderr.count("\n") == 1 and "cannot be reached" in unreachable.stderr
        proxy.up()
        refused = run.cli("subscribe", DOWNLOADER_NOTIFICATIONS_URL=f"http://operator:wrong@{host}")
        assert refused.returncode == 6, refused
        assert refused.stderr.count("\n") == 1 and "refused" in refused.stderr and "401" in refused.stderr
        assert "wrong" not in refused.stderr.replace("wrong credentials", "")  # the password is redacted
        assert run.subscriptions() == []
        right = run.cli("subscribe", DOWNLOADER_NOTIFICATIONS_URL=f"http://operator:right-password@{host}")
        assert right.returncode == 0, right.stderr
        created = json.loads(right.stdout)
        assert created["action"] == "created" and created["target_url"] == run.url + "/"
        no_user = run.cli("subscribe", DOWNLOADER_NOTIFICATIONS_USER="")
        assert no_user.returncode == 2 and "DOWNLOADER_NOTIFICATIONS_USER" in no_user.stderr
        assert no_user.stderr.count("\n") == 1
    finally:
        proxy.down()


def test_subscribe_re_enables_a_disabled_subscription_and_says_how_to_replay(
    site: Callable[..., Site], notifications_stack: NotificationsStack
) -> None:
    run = site()
    first = run.cli("subscribe", "--wait", "5")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["action"] == "created"
    again = run.cli("subscribe")
    assert json.loads(again.stdout)["action"] == "unchanged" and again.returncode == 0
    notifications_stack.send(run.event())  # nobody listens on the target: disabled
    wait("the subscription disabled", lambda: run.subscriptions()[0]["disabled"], 30)
    enabled = run.cli("subscribe")
    assert enabled.returncode == 0, enabled.stderr
    assert json.loads(enabled.stdout)["action"] == "enabled" and not run.subscriptions()[0]["disabled"]
    assert "pacifica-notifications-cmd eventget --start-date" in enabled.stderr
    status = json.loads(run.cli("subscription", "status").stdout)
    [gap] = status["gaps"]
    start = datetime.strptime(gap["window"]["start"], "%Y-%m-%d %H:%M:%S")
    end = datetime.strptime(gap["window"]["end"], "%Y-%m-%d %H:%M:%S")
    assert start < datetime.now() < end and "Connection refused" in (gap["error"] or ""), gap
