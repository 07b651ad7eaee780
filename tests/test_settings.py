from __future__ import annotations

import tempfile
from pathlib import Path

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
        ({"DOWNLOADER_ASYNC": "maybe"}, "not a boolean"),
        ({"DOWNLOADER_HTTP_THREADS": "0"}, "http_threads must be at least 1"),
        ({"DOWNLOADER_WORKERS": "-1"}, "workers must not be negative"),
        ({"DOWNLOADER_BASIC_AUTH": "nocolon"}, "user:password"),
        ({"DOWNLOADER_REQUEST_TIMEOUT": "0"}, "request_timeout and idle_timeout must be above 0"),
        ({"DOWNLOADER_EVENT_TYPES": " , "}, "at least one type"),
        ({"DOWNLOADER_FILENAME": "../up"}, "one directory name"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from_env(env)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_describe_lists_every_variable_once() -> None:
    names = [row[0] for row in describe()]
    assert len(names) == len(set(names)) == len(Settings.__dataclass_fields__)
    assert "CARTD_URL" in names
