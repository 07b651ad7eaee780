from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from downloader_service.service.settings import Settings, describe, settings_from_env


def test_settings_from_env_defaults_without_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its first answer
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    settings = settings_from_env({})
    assert settings == Settings()
    assert settings.cartd_url == "http://127.0.0.1:8081"
    assert settings.event_types == ("org.pacifica.metadata.ingest",)
    # State survives reboots: never the temp dir.
    assert settings.state() == str(tmp_path / "state" / "pacifica-downloader")
    assert settings.root() == str(tmp_path / "state" / "pacifica-downloader" / "downloads")
    assert settings.database() == "sqlite:///" + str(
        tmp_path / "state" / "pacifica-downloader" / "jobs.sqlite3"
    )
    assert not settings.root().startswith(tempfile.gettempdir() + "/pacifica")


def test_settings_from_env_reads_every_type() -> None:
    settings = settings_from_env(
        {
            "CARTD_URL": "http://cartd:8081",
            "DOWNLOADER_PORT": "9000",
            "DOWNLOADER_ASYNC": "yes",
            "DOWNLOADER_EVENT_TYPES": "a.b, c.d ,",
            "DOWNLOADER_CART_TIMEOUT": "2.5",
            "DOWNLOADER_ROOT": "/data",
        }
    )
    assert settings.cartd_url == "http://cartd:8081"
    assert settings.port == 9000
    assert settings.respond_async is True
    assert settings.event_types == ("a.b", "c.d")
    assert settings.cart_timeout == 2.5
    assert settings.root() == "/data"


def test_overrides_win_over_environment_and_none_is_ignored() -> None:
    settings = settings_from_env({"DOWNLOADER_PORT": "9000"}, port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DOWNLOADER_PORT": "eighty"}, "DOWNLOADER_PORT='eighty'"),
        ({"DOWNLOADER_PORT": "99999"}, "DOWNLOADER_PORT must be from 1 to 65535, not 99999"),
        ({"DOWNLOADER_PORT": "0"}, "DOWNLOADER_PORT must be from 1 to 65535"),
        ({"DOWNLOADER_HEALTH_PORT": "70000"}, "DOWNLOADER_HEALTH_PORT must be from 0 to 65535"),
        ({"DOWNLOADER_ASYNC": "maybe"}, "not a boolean"),
        ({"DOWNLOADER_HTTP_THREADS": "0"}, "DOWNLOADER_HTTP_THREADS must be from 1 to 1024, not 0"),
        ({"DOWNLOADER_WORKERS": "-1"}, "DOWNLOADER_WORKERS must be from 0 to 1024, not -1"),
        ({"DOWNLOADER_BASIC_AUTH": "nocolon"}, "user:password"),
        ({"DOWNLOADER_REQUEST_TIMEOUT": "0"}, "DOWNLOADER_REQUEST_TIMEOUT must be at least 0.001"),
        ({"DOWNLOADER_EVENT_TYPES": " , "}, "at least one type"),
        ({"DOWNLOADER_FILENAME": "../up"}, "DOWNLOADER_FILENAME must be one directory name"),
        ({"DOWNLOADER_SYNC_WAIT": "nan"}, "DOWNLOADER_SYNC_WAIT='nan': not a finite number"),
        ({"DOWNLOADER_LEASE_SECONDS": "inf"}, "DOWNLOADER_LEASE_SECONDS='inf': not a finite number"),
        ({"DOWNLOADER_RETRY_WINDOW": "-5"}, "DOWNLOADER_RETRY_WINDOW must be at least 0, not -5.0"),
        ({"DOWNLOADER_DATABASE_URL": "mysql://u:p@db/x"}, "sqlite:///PATH or postgresql://.*not a mysql URL"),
        ({"DOWNLOADER_LOG_LEVEL": "LOUD"}, "DOWNLOADER_LOG_LEVEL must be DEBUG or INFO or WARNING or ERROR"),
        ({"CARTD_URL": "cartd:8081"}, "CARTD_URL must be an http:// or https:// URL"),
        ({"DOWNLOADER_TOKN": "s3cret"}, "DOWNLOADER_TOKN is not a setting of this service"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        settings_from_env(env)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"port": 99999}, "DOWNLOADER_PORT must be from 1 to 65535"),
        ({"sync_wait": float("nan")}, "DOWNLOADER_SYNC_WAIT must be a finite number"),
        ({"lease_seconds": float("inf")}, "DOWNLOADER_LEASE_SECONDS must be a finite number"),
        ({"retry_window": -5.0}, "DOWNLOADER_RETRY_WINDOW must be at least 0"),
        ({"workers": "4"}, "DOWNLOADER_WORKERS must be a whole number"),
        ({"database_url": "mysql://x"}, "not a mysql URL"),
    ],
)
def test_settings_built_in_code_are_checked_too(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings(**values)


def test_secrets_come_from_files(tmp_path: Path) -> None:
    token, database = tmp_path / "token", tmp_path / "database"
    token.write_text("s3cret\n", encoding="utf-8")
    database.write_text("postgresql://u:pw@db/x", encoding="utf-8")
    settings = settings_from_env(
        {"DOWNLOADER_TOKEN_FILE": str(token), "DOWNLOADER_DATABASE_URL_FILE": str(database)}
    )
    assert (settings.token, settings.database_url) == ("s3cret", "postgresql://u:pw@db/x")
    with pytest.raises(ValueError, match="DOWNLOADER_BASIC_AUTH_FILE='/nowhere' cannot be read"):
        settings_from_env({"DOWNLOADER_BASIC_AUTH_FILE": "/nowhere"})
    with pytest.raises(ValueError, match="set DOWNLOADER_TOKEN or DOWNLOADER_TOKEN_FILE, not both"):
        settings_from_env({"DOWNLOADER_TOKEN_FILE": str(token), "DOWNLOADER_TOKEN": "x"})
    bad = tmp_path / "basic"
    bad.write_text("no-colon", encoding="utf-8")
    with pytest.raises(ValueError, match="user:password") as caught:
        settings_from_env({"DOWNLOADER_BASIC_AUTH_FILE": str(bad)})
    assert "no-colon" not in str(caught.value)  # a secret is never echoed


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_describe_lists_every_variable_once() -> None:
    names = [row[0] for row in describe()]
    assert len(names) == len(set(names)) == len(Settings.__dataclass_fields__)
    assert "CARTD_URL" in names


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.pki import make_pki

    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_settings_become_request_options(pki: Any) -> None:
    settings = settings_from_env(
        {
            "DOWNLOADER_CA_BUNDLE": str(pki.ca),
            "DOWNLOADER_CLIENT_CERT": str(pki.client_cert),
            "DOWNLOADER_CLIENT_KEY": str(pki.client_key),
        }
    )
    assert settings.request_options() == {
        "verify": str(pki.ca),
        "cert": (str(pki.client_cert), str(pki.client_key)),
    }
    combined = settings_from_env({"DOWNLOADER_CLIENT_CERT": str(pki.client_combined)})
    assert combined.request_options() == {"cert": str(pki.client_combined)}
    assert settings_from_env({}).request_options() == {}


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"DOWNLOADER_CLIENT_KEY": "{key}"}, "DOWNLOADER_CLIENT_KEY needs DOWNLOADER_CLIENT_CERT"),
        (
            {"DOWNLOADER_CA_BUNDLE": "{missing}"},
            "DOWNLOADER_CA_BUNDLE: the CA bundle {missing} does not exist",
        ),
        (
            {"DOWNLOADER_CA_BUNDLE": "{key}"},
            "DOWNLOADER_CA_BUNDLE: the CA bundle {key} holds no PEM certificate",
        ),
        (
            {"DOWNLOADER_CLIENT_CERT": "{cert}", "DOWNLOADER_CLIENT_KEY": "{stranger_key}"},
            "DOWNLOADER_CLIENT_CERT: the client certificate {cert} and {stranger_key} cannot be used: "
            "key values mismatch",
        ),
        (
            {"DOWNLOADER_CLIENT_CERT": "{cert}"},
            "DOWNLOADER_CLIENT_CERT: the client certificate {cert} cannot",
        ),
    ],
)
def test_tls_settings_are_checked_at_start(pki: Any, tmp_path: Path, env: dict[str, str], words: str) -> None:
    names = {
        "key": pki.client_key,
        "cert": pki.client_cert,
        "stranger_key": pki.stranger_key,
        "missing": tmp_path / "none.pem",
    }
    with pytest.raises(ValueError, match=re.escape(words.format(**names))):
        settings_from_env({name: value.format(**names) for name, value in env.items()})
