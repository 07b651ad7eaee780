"""The Dockerfile and docker-compose.yml agree with the settings the service reads.

No Docker engine runs here, so these check the files themselves.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from downloader_service.service.settings import describe, settings_from_env

ROOT = Path(__file__).resolve().parent.parent
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


def test_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
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
