"""Run the real pacifica-notifications 0.5.2 sender on 127.0.0.1 for tests.

It comes from the virtualenv made by ``scripts/install-pacifica-stack.sh`` and needs a
PostgreSQL database (``devstack/postgres.py``; on SQLite its ``dbsync`` fails). Started
here: ``pacifica-notifications-cmd dbsync``, the REST server, one Celery worker, and a Policy
stand-in (a thread in this process answering ``POST /events/<user>`` with 200, or with
``stack.policy.status``). The broker is kombu's ``filesystem://`` transport
with the same write-then-rename publishing fix as ``devstack/pacifica.py``; the result
backend is ``file://`` (``eventretry`` waits for task results).

Usage::

    with NotificationsStack(tmp_path, venv, pg.create_database("notif")) as stack:
        sub = stack.subscribe("mine", INGEST_JSONPATH, "http://127.0.0.1:PORT/")
        stack.send(event)                 # POST /receive
        stack.wait_for(lambda: stack.deliveries())

Facts this relies on (0.5.2, read from its source and observed): configuration only from
the environment (``NOTIFICATIONS_CONFIG`` ini, ``NOTIFICATIONS_CPCONFIG``, ``PEEWEE_URL``,
``BROKER_URL``, ``BACKEND_URL``, ``POLICY_URL``; ``-c`` has no effect; the ini's values win
over the variables, so both say the same here). ``/receive`` reads the raw body as JSON: any
Content-Type except a form type (CherryPy would consume a form body first), no schema; it
answers 200 with the Celery task id. The user is the ``Http-Remote-User`` header (default
``default_user``). ``GET /eventmatch`` answers **403** when the user has no subscriptions
and for another user's; a ``PUT /eventmatch/<uuid>`` resets ``extensions`` and ``auth`` to
``{}`` unless it sends them again. A 4xx/5xx target answer or a connection error sets the
subscription's ``disabled`` (ISO time) and ``error`` (the answer's text); nothing is retried.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import shutil
import threading
import time
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from devstack.pacifica import (
    HOST,
    _ini_value,
    _ProcessStack,
    free_port,
    write_celery_config,
    write_cherrypy_config,
)

T = TypeVar("T")

#: JSONPath matching every ingest event (the subscription rule upstream documents).
INGEST_JSONPATH = '$[?(@["eventType"] = "org.pacifica.metadata.ingest")]'
DEFAULT_USER = "dmlb2001"


def ingest_jsonpath(**extensions: str) -> str:
    """A subscription rule for ingest events whose ``extensions`` carry these exact values.

    A session-wide stack keeps every subscription: a rule of its own per test (say
    ``ingest_jsonpath(testCase=uuid)``, with that extension in the events the test sends) keeps
    tests from receiving (and being disabled by) each other's events.
    """
    terms = ['@["eventType"] = "org.pacifica.metadata.ingest"']
    terms += [
        f'@["extensions"][{json.dumps(key)}] = {json.dumps(value)}' for key, value in extensions.items()
    ]
    return f"$[?({' and '.join(terms)})]"


CELERY_CONFIG_MODULE = "notifications_stack_celeryconfig"
_EXECUTABLES = ("pacifica-notifications", "pacifica-notifications-cmd", "celery")
# Environment variables that would change what the services read instead of our files.
_SCRUBBED_ENV_PREFIXES = ("CELERY_", "NOTIFICATIONS_", "DATABASE_")
_SCRUBBED_ENV = {
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "BROKER_URL",
    "BACKEND_URL",
    "PEEWEE_URL",
    "POLICY_URL",
    "USER_HEADER",
    "DEFAULT_USER",
}


class PolicyStandIn:
    """Pacifica Policy's ``POST /events/<user>``: answers :attr:`status` and records the calls."""

    def __init__(self, host: str = HOST):
        self.status = 200
        self.requests: list[tuple[str, dict[str, Any]]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 2 or parts[0] != "events":
                    self._answer(404, {"status": "error", "message": "not found"})
                    return
                with contextlib.suppress(ValueError):
                    stand_in.requests.append((urllib.parse.unquote(parts[1]), json.loads(body)))
                status = stand_in.status
                self._answer(status, {"status": "OK" if status < 400 else "error"})

            def _answer(self, status: int, doc: dict[str, Any]) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://{host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="policy-stand-in", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


class NotificationsStack(_ProcessStack):
    """Notifications REST server + Celery worker (+ dbsync, + Policy stand-in) on 127.0.0.1."""

    _label = "Notifications"
    _stack_label = "Notifications"
    _scrubbed_env = _SCRUBBED_ENV
    _scrubbed_env_prefixes = _SCRUBBED_ENV_PREFIXES
    _celery_config_module = CELERY_CONFIG_MODULE

    def __init__(
        self,
        workdir: Path,
        venv: Path,
        postgres_url: str,
        concurrency: int = 8,
        host: str = HOST,
    ):
        super().__init__(workdir, venv, host)
        self.postgres_url = postgres_url
        self.concurrency = concurrency
        self.port = 0
        self.url = ""
        self.policy: PolicyStandIn | None = None
        self._owners: dict[str, str] = {}

    # ------------------------------------------------------------------ paths
    @property
    def results_dir(self) -> Path:
        return self.workdir / "results"

    @property
    def peewee_url(self) -> str:
        """The database URL in peewee's form (``postgres://user:pw@host:port/db``)."""
        parsed = urllib.parse.urlsplit(self.postgres_url)
        if parsed.scheme not in ("postgres", "postgresql"):
            raise ValueError(f"not a PostgreSQL URL: {self.postgres_url!r}")
        return urllib.parse.urlunsplit(parsed._replace(scheme="postgres"))

    # ----------------------------------------------------------------- config
    def _write_configs(self) -> None:
        shutil.rmtree(self.broker_dir, ignore_errors=True)
        shutil.rmtree(self.results_dir, ignore_errors=True)
        for folder in (
            self.config_dir,
            self.results_dir,
            self.broker_dir / "queue",
            self.broker_dir / "control",
            self.broker_dir / "processed",
            self.workdir / "tmp",
        ):
            folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config_dir
        assert self.policy is not None
        (cfg / "notifications.ini").write_text(
            "[notifications]\n"
            "user_header = Http-Remote-User\n"
            f"policy_url = {_ini_value(self.policy.url)}\n"
            "\n[database]\n"
            f"peewee_url = {_ini_value(self.peewee_url)}\n"
            "connect_attempts = 10\n"
            "connect_wait = 1\n"
            "\n[celery]\n"
            "broker_url = filesystem://\n"
            f"backend_url = file://{_ini_value(self.results_dir)}\n",
            encoding="utf-8",
        )
        write_cherrypy_config(cfg / "notifications-cherrypy.ini", threads=16)
        write_celery_config(cfg / f"{CELERY_CONFIG_MODULE}.py", self.broker_dir, "pacifica-notifications")

    def _service_env(self) -> dict[str, str]:
        cfg = self.config_dir
        assert self.policy is not None
        return {
            "NOTIFICATIONS_CONFIG": str(cfg / "notifications.ini"),
            "NOTIFICATIONS_CPCONFIG": str(cfg / "notifications-cherrypy.ini"),
            "PEEWEE_URL": self.peewee_url,
            "BROKER_URL": "filesystem://",
            "BACKEND_URL": f"file://{self.results_dir}",
            "POLICY_URL": self.policy.url,
            "DATABASE_CONNECT_ATTEMPTS": "10",
            "DATABASE_CONNECT_WAIT": "1",
        }

    # -------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> NotificationsStack:
        """Start everything and wait until each part answers; RuntimeError (with logs) if not."""
        if self._started:
            raise RuntimeError("NotificationsStack already started")
        self._require_installed(_EXECUTABLES, "pacifica-notifications")
        began = time.monotonic()
        deadline = began + timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._started = True
        atexit.register(self.stop)
        try:
            self.policy = PolicyStandIn(self.host)
            self.port = free_port(self.host)
            self.url = f"http://{self.host}:{self.port}"
            self._write_configs()
            env = self._env()
            dbsync = self._spawn("dbsync", [str(self._bin("pacifica-notifications-cmd")), "dbsync"], env)
            self._spawn(
                "worker",
                [
                    str(self._bin("celery")),
                    "-A",
                    "pacifica.notifications.tasks:CELERY_APP",
                    "worker",
                    "--concurrency",
                    str(self.concurrency),
                    "--pool",
                    "prefork",
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    "--hostname",
                    f"notifications-stack-{self.port}@{self.host}",
                ],
                env,
            )
            # The REST server refuses to start on a schema it does not know: dbsync first.
            self._wait_all({"dbsync": lambda: not dbsync.alive()}, deadline, may_exit=True)
            if dbsync.popen.returncode != 0:
                raise self._failure(
                    f"pacifica-notifications-cmd dbsync failed (exit {dbsync.popen.returncode})"
                )
            self._spawn(
                "notifications",
                [
                    str(self._bin("pacifica-notifications")),
                    "-a",
                    self.host,
                    "-p",
                    str(self.port),
                    "--cpconfig",
                    str(self.config_dir / "notifications-cherrypy.ini"),
                ],
                env,
            )
            self._wait_all({"worker": self._worker_ready, "notifications": self._answers}, deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _answers(self) -> bool:
        """Whether the REST server answers HTTP at all (``GET /`` is a 405 there)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/", headers={"Connection": "close"})
            conn.getresponse().read()
            return True
        except OSError:
            return False
        finally:
            conn.close()

    def _stop_helpers(self) -> None:
        """The Policy stand-in (:meth:`stop` stops it after the processes)."""
        if self.policy is not None:
            self.policy.stop()
            self.policy = None

    # -------------------------------------------------------------------- API
    def _request(
        self, method: str, path: str, body: Any = None, user: str | None = None, expect: int = 200
    ) -> bytes:
        headers = {"Connection": "close"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if user is not None:
            headers["Http-Remote-User"] = user
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read()
        finally:
            conn.close()
        if resp.status != expect:
            raise self._failure(f"Notifications {method} {path} answered {resp.status}: {text[:2000]!r}")
        return text

    def subscribe(
        self,
        name: str,
        jsonpath: str,
        target_url: str,
        user: str = DEFAULT_USER,
        auth: dict[str, Any] | None = None,
        extensions: dict[str, Any] | None = None,
    ) -> str:
        """Register a subscription (``POST /eventmatch``) and return its uuid.

        ``auth``: ``{"type": "basic", "basic": {"username", "password"}}`` or
        ``{"type": "header", "header": {"type": "Bearer", "credentials": "..."}}``.
        """
        doc: dict[str, Any] = {"name": name, "jsonpath": jsonpath, "target_url": target_url}
        if auth is not None:
            doc["auth"] = auth
        if extensions is not None:
            doc["extensions"] = extensions
        created = json.loads(self._request("POST", "/eventmatch", doc, user=user))
        self._owners[created["uuid"]] = user
        return str(created["uuid"])

    def subscription(self, subscription_id: str, user: str | None = None) -> dict[str, Any]:
        """The subscription as the REST API shows it (``GET /eventmatch/<uuid>``).

        Keys: uuid, name, jsonpath, user, target_url, version, extensions, auth, created,
        updated, deleted, and ``disabled`` (None, or the ISO time it was disabled) with
        ``error`` (None, or the failing answer's body / the connection error's text).
        """
        owner = user or self._owners.get(subscription_id, DEFAULT_USER)
        return dict(json.loads(self._request("GET", f"/eventmatch/{subscription_id}", user=owner)))

    def enable(self, subscription_id: str, user: str | None = None) -> dict[str, Any]:
        """Clear ``disabled``/``error`` (``PUT``, sending extensions and auth back so they stay)."""
        owner = user or self._owners.get(subscription_id, DEFAULT_USER)
        current = self.subscription(subscription_id, owner)
        doc = {"disabled": None, "error": None, "extensions": current["extensions"], "auth": current["auth"]}
        if not doc["auth"]:
            del doc["auth"]  # the schema wants a "type" in any auth object it is given
        return dict(json.loads(self._request("PUT", f"/eventmatch/{subscription_id}", doc, user=owner)))

    def unsubscribe(self, subscription_id: str, user: str | None = None) -> None:
        """Delete the subscription (``DELETE /eventmatch/<uuid>``; it only gets a ``deleted`` time)."""
        owner = user or self._owners.get(subscription_id, DEFAULT_USER)
        self._request("DELETE", f"/eventmatch/{subscription_id}", user=owner)

    def send(self, event: dict[str, Any]) -> str:
        """``POST /receive`` with the event as JSON; returns the Celery task id it answers."""
        return self._request("POST", "/receive", event).decode()

    def deliveries(self) -> list[tuple[str | None, int | None]]:
        """``(eventID, target status)`` of every recorded delivery attempt, oldest first.

        Read from the ``eventlogmatch`` table (joined with ``eventlog`` for the event). The
        status is None while the target has not answered yet, and stays None after a
        connection error (the worker then only disables the subscription) and after a Policy
        5xx (which disables it too). Events the Policy refused with 4xx are not recorded.
        """
        return [(event_id, status) for event_id, status, _sub in self.delivery_rows()]

    def delivery_rows(self) -> list[tuple[str | None, int | None, str]]:
        """Like :meth:`deliveries` with the subscription uuid as a third item."""
        import psycopg  # the project's test dependency; imported here so importing this module is cheap

        with psycopg.connect(self.postgres_url, connect_timeout=10) as conn:
            rows = conn.execute(
                "SELECT l.jsondata, m.target_status_code, m.event_match_id"
                " FROM eventlogmatch m JOIN eventlog l ON l.uuid = m.event_log_id"
                " ORDER BY m.created, m.uuid"
            ).fetchall()
        result = []
        for jsondata, status, subscription in rows:
            try:
                event_id = json.loads(jsondata).get("eventID")
            except (ValueError, AttributeError):
                event_id = None
            result.append((event_id, int(status) if status else None, str(subscription)))
        return result

    def eventget(self, start: str, end: str, limit: int = 1_000_000) -> str:
        """What ``pacifica-notifications-cmd eventget --start-date START --end-date END`` prints.

        Times as ``Y-m-d H:M:S`` in Notifications' local clock (this machine's).
        """
        import subprocess

        argv = [
            str(self._bin("pacifica-notifications-cmd")),
            "eventget",
            "--start-date",
            start,
            "--end-date",
            end,
            "--limit",
            str(limit),
        ]
        done = subprocess.run(argv, env=self._env(), capture_output=True, timeout=120, check=False)
        if done.returncode != 0:
            raise self._failure(f"eventget failed (exit {done.returncode}): {done.stderr[-2000:]!r}")
        return done.stdout.decode("utf-8")

    def logged_events(self, marker: str) -> int:
        """How many events in Notifications' event log (``eventlog``) contain ``marker``."""
        import psycopg

        with psycopg.connect(self.postgres_url, connect_timeout=10) as conn:
            row = conn.execute(
                "SELECT count(*) FROM eventlog WHERE jsondata LIKE %s", (f"%{marker}%",)
            ).fetchone()
        return int(row[0]) if row else 0

    def subscriptions(self, user: str) -> list[dict[str, Any]]:
        """The user's subscriptions that are not deleted (``GET /eventmatch``; none is a 403)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", "/eventmatch", headers={"Http-Remote-User": user, "Connection": "close"})
            resp = conn.getresponse()
            text = resp.read()
        finally:
            conn.close()
        if resp.status == 403:
            return []
        if resp.status != 200:
            raise self._failure(f"Notifications GET /eventmatch answered {resp.status}: {text[:2000]!r}")
        return list(json.loads(text))

    def wait_for(self, check: Callable[[], T], timeout: float = 20, interval: float = 0.05) -> T:
        """Poll ``check`` until it returns something truthy; RuntimeError (with logs) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                raise self._failure(f"Notifications: condition not met within {timeout} s")
            time.sleep(interval)
