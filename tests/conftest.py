"""Shared fixtures: the fake Cartd, the WSGI client, served processes, and the real stacks.

The tests are in tiers: ``tests/unit`` needs no service (``pytest tests/unit``, under a
minute), ``tests/integration`` the real Cartd, Notifications, PostgreSQL, nginx or processes
the suite starts, ``tests/system`` the whole-system runs (chaos, soak, deployment files, the
browser). Tests in the last two are marked ``integration`` or ``system`` by directory, so
``-m "not integration and not system"`` selects the unit tier too. The real stacks are
imported (``devstack``) only when a test asks for one.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests
from werkzeug.test import Client

from downloader_service.service.app import create_app
from downloader_service.service.settings import settings_from_env
from tests.fakecartd import FakeCartd

if TYPE_CHECKING:
    from devstack.notifications import NotificationsStack
    from devstack.pacifica import PacificaStack
    from devstack.postgres import PostgresServer

TIERS = ("integration", "system")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test of ``tests/integration`` and ``tests/system`` with its tier."""
    for item in items:
        parts = item.path.parts
        for tier in TIERS:
            if tier in parts and parts[parts.index(tier) - 1] == "tests":
                item.add_marker(getattr(pytest.mark, tier))


LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures"


def load_fixture(name: str) -> Any:
    """A fixture document: our copy in tests/fixtures (shared/ is not always beside a clone)."""
    return json.loads((LOCAL_FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture
def notifications_event() -> dict[str, Any]:
    """The verbatim upstream Notifications event (0.1; one file lacks ``_id``)."""
    return load_fixture("notifications-event-0.1.json")


@pytest.fixture
def fake_cartd() -> Iterator[FakeCartd]:
    fake = FakeCartd().start()
    yield fake
    fake.stop()


REPO = Path(__file__).resolve().parent.parent

MakeClient = Callable[..., Client]


class LocalClient(Client):
    """The WSGI test client as a client on this host (``REMOTE_ADDR`` 127.0.0.1, as a real
    server sets it); a request may say otherwise with ``environ_base={"REMOTE_ADDR": ...}``."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        base = dict(kwargs.pop("environ_base", None) or {})
        base.setdefault("REMOTE_ADDR", "127.0.0.1")
        return super().open(*args, environ_base=base, **kwargs)


@pytest.fixture
def make_client(tmp_path: Path, fake_cartd: FakeCartd) -> Iterator[MakeClient]:
    """``make(**settings)``: the WSGI app over a fresh store in ``tmp_path``, closed after."""
    apps = []

    def make(**overrides: Any) -> Client:
        overrides.setdefault("cartd_url", fake_cartd.url)
        overrides.setdefault("download_root", str(tmp_path / "root"))
        overrides.setdefault("state_dir", str(tmp_path / "state"))
        (tmp_path / "root").mkdir(exist_ok=True)
        app = create_app(settings_from_env({}, **overrides))
        apps.append(app)
        return LocalClient(app)

    yield make
    for app in apps:
        app.service.close()


@pytest.fixture(scope="session")
def pacifica_stack(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[PacificaStack]:
    """The real Archive Interface + Cartd + its Celery worker, once for the whole session.

    Cartd's database is PostgreSQL, as Pacifica runs it (on SQLite bursts of carts leave some
    staging for ever). ``scripts/test`` installs them into ``.venv-pacifica`` (or
    ``$PACIFICA_VENV``); without that venv the integration tests fail, they do not skip: CI
    must exercise them.
    """
    from devstack.pacifica import PacificaStack

    venv = Path(os.environ.get("PACIFICA_VENV", REPO / ".venv-pacifica"))
    if not (venv / "bin" / "pacifica-cartd").exists():
        pytest.fail(f"no Pacifica stack in {venv}: run scripts/install-pacifica-stack.sh (scripts/test does)")
    stack = PacificaStack(
        tmp_path_factory.mktemp("pacifica"), venv, database_url=postgres.create_database("cartd")
    )
    stack.start(timeout=60)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def file_ids() -> Iterator[int]:
    """Fresh archive file ids: the archive keeps stored files read-only, so never reuse one."""
    return itertools.count(1000)


SCRIPT = Path(sys.executable).with_name("downloader-service")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def served(
    env: dict[str, str], log: Path, port: int | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``downloader-service serve`` with ``env``; stop it (by PID) after.

    ``port`` defaults to a free one; pass the port of an earlier run to restart on it.
    """
    if port is None:
        port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "serve", "--port", str(port)],
            # A state directory of the test's own: the job store must not outlive the test.
            env={**os.environ, "DOWNLOADER_STATE_DIR": str(log.parent / "state"), **env},
            stderr=out,
            stdout=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                requests.get(url + "/health", timeout=1)
                break
            except requests.ConnectionError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A real PostgreSQL server on 127.0.0.1 (scripts/install-postgres.sh installs it)."""
    from devstack.postgres import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    server.start(timeout=60)
    yield server
    server.close()


@pytest.fixture(scope="session")
def notifications_stack(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer
) -> Iterator[NotificationsStack]:
    """The real pacifica-notifications 0.5.2 (REST server + Celery worker) on a fresh database."""
    from devstack.notifications import NotificationsStack

    venv = Path(os.environ.get("PACIFICA_VENV", REPO / ".venv-pacifica"))
    if not (venv / "bin" / "pacifica-notifications").exists():
        pytest.fail(f"no pacifica-notifications in {venv}: run scripts/install-pacifica-stack.sh")
    stack = NotificationsStack(
        tmp_path_factory.mktemp("notifications"), venv, postgres.create_database("notifications")
    )
    stack.start(timeout=60)
    yield stack
    stack.stop()


def logged(log: Path, message: str) -> bool:
    """Whether the JSON log ``log`` holds a line whose ``message`` is ``message``."""
    try:
        lines = log.read_bytes().splitlines()
    except FileNotFoundError:
        return False
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("message") == message:
            return True
    return False


@contextmanager
def working(env: dict[str, str], log: Path, timeout: float = 20) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``downloader-service worker`` with ``env``; kill it (by PID) after.

    A worker has no HTTP port: it is ready when its JSON log says "working". That line is
    INFO, so ``DOWNLOADER_LOG_LEVEL`` is INFO unless ``env`` says otherwise (WARNING or ERROR
    would hide it, and are refused). Like :func:`served`, the state directory is the log's
    neighbour ``state`` unless ``env`` names one.
    """
    level = env.get("DOWNLOADER_LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO"):
        raise ValueError(f"DOWNLOADER_LOG_LEVEL={level} hides the worker's 'working' line")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "worker"],
            env={
                **os.environ,
                "DOWNLOADER_STATE_DIR": str(log.parent / "state"),
                "DOWNLOADER_LOG_LEVEL": "INFO",
                **env,
            },
            stdin=subprocess.DEVNULL,
            stderr=out,
            stdout=out,
        )
    try:
        deadline = time.monotonic() + timeout
        while not logged(log, "working"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
