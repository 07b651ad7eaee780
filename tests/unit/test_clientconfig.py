"""pacifica-cli's INI and argument shape in ``downloader-service download`` (cli/clientconfig.py)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.policy import PolicyStandIn
from downloader_service.cli import EXIT_CONFIG, EXIT_INVALID, EXIT_OK, EXIT_USAGE, main
from downloader_service.cli.clientconfig import load_client_config, system_config_path, user_config_path
from downloader_service.errors import InvalidConfigError
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd, sha1
from tests.pki import PKI, make_pki

DATA = b"transaction file\n"
ENV = (
    "PACIFICA_CLI_INI",
    "DOWNLOAD_URL",
    "DOWNLOAD_POLICY_URL",
    "AUTHENTICATION_TYPE",
    "AUTHENTICATION_USERNAME",
    "AUTHENTICATION_PASSWORD",
    "AUTHENTICATION_CERT",
    "AUTHENTICATION_KEY",
    "CARTD_URL",
    "POLICY_URL",
)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home and a working directory of the test's own, and none of the variables set."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    (home / ".pacifica_cli").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def policy() -> Iterator[PolicyStandIn]:
    with PolicyStandIn() as server:
        server.transactions["67"] = {
            "files": {"7": {"name": "foo.txt", "subdir": "a/b", "hashtype": "sha1", "hashsum": sha1(DATA)}}
        }
        yield server


def ini(path: Path, endpoints: dict[str, str], authentication: dict[str, str] | None = None) -> Path:
    lines = ["[endpoints]", *(f"{k} = {v}" for k, v in endpoints.items())]
    if authentication is not None:
        lines += ["[authentication]", *(f"{k} = {v}" for k, v in authentication.items())]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_search_order_env_then_system_then_user(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = ini(home.parent / "system.ini", {"download_url": "http://system:1"})
    monkeypatch.setenv("DOWNLOAD_URL", "http://env:1")
    monkeypatch.setenv("DOWNLOAD_POLICY_URL", "http://env-policy:2/by_id")
    config = load_client_config(system_path=str(system))
    assert (config.download_url, config.download_policy_url) == (
        "http://system:1",
        "http://env-policy:2/by_id",
    )
    user = ini(home / ".pacifica_cli/config.ini", {"download_url": "http://user:1"})
    config = load_client_config(system_path=str(system))
    assert config.download_url == "http://user:1"
    assert config.files == (str(system), str(user))


def test_config_ini_names_a_file_under_pacifica_cli_or_an_absolute_path(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini(home / ".pacifica_cli/site.ini", {"download_url": "http://named:1"})
    assert load_client_config("site.ini").download_url == "http://named:1"
    monkeypatch.setenv("PACIFICA_CLI_INI", "site.ini")
    assert load_client_config().download_url == "http://named:1"
    absolute = ini(home.parent / "abs.ini", {"download_url": "http://absolute:1"})
    assert load_client_config(str(absolute)).download_url == "http://absolute:1"  # --config-ini wins


def test_without_a_system_file_config_ini_here_is_read_as_pacifica_cli_does(home: Path) -> None:
    assert system_config_path(prefix=str(home)) == "config.ini"  # no /etc/pacifica-cli here
    ini(Path("config.ini"), {"download_url": "http://here:1"})
    assert load_client_config().download_url == "http://here:1"
    assert user_config_path("/x/y.ini") == "/x/y.ini"
    assert user_config_path("y.ini", str(home)) == str(home / ".pacifica_cli/y.ini")


def test_defaults_when_nothing_is_configured(home: Path) -> None:
    config = load_client_config()
    assert config.download_url == "https://cartd.example.com"
    assert config.download_policy_url == "https://policy.example.com/status/transactions/by_id"
    assert (config.auth_type, config.request_options, config.files) == ("None", {}, ())


def test_basic_auth_variables_win_over_the_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ini(
        home / ".pacifica_cli/config.ini",
        {"download_url": "http://c:1"},
        {"type": "basic", "username": "filed", "password": "pw%%1"},
    )
    assert load_client_config().request_options == {"auth": ("filed", "pw%1")}  # %% as configparser reads it
    monkeypatch.setenv("AUTHENTICATION_USERNAME", "envuser")
    monkeypatch.setenv("AUTHENTICATION_PASSWORD", "envpw")
    assert load_client_config().request_options == {"auth": ("envuser", "envpw")}
    monkeypatch.setenv("AUTHENTICATION_TYPE", "clientssl")  # a default only: the file's type wins
    assert load_client_config().auth_type == "basic"


def test_clientssl_and_ca_bundle_become_cert_and_verify(home: Path, pki: PKI) -> None:
    path = ini(
        home / ".pacifica_cli/config.ini",
        {"download_url": "https://c:1", "ca_bundle": str(pki.ca)},
        {"type": "clientssl", "cert": str(pki.client_cert), "key": str(pki.client_key)},
    )
    options = load_client_config().request_options
    assert options == {"verify": str(pki.ca), "cert": (str(pki.client_cert), str(pki.client_key))}
    ini(path, {"ca_bundle": "False"}, {"type": "clientssl", "cert": str(pki.client_combined), "key": ""})
    assert load_client_config().request_options == {"verify": False, "cert": str(pki.client_combined)}


@pytest.mark.parametrize(
    ("endpoints", "authentication", "words"),
    [
        ({"ca_bundle": "maybe"}, {}, "ca_bundle must be True, False or a CA file, not 'maybe'"),
        ({}, {"type": "kerberos"}, "type must be one of clientssl, basic, gssapi, None, not 'kerberos'"),
        ({}, {"type": "clientssl", "cert": "/nowhere/c.pem", "key": ""}, "/nowhere/c.pem does not exist"),
        ({}, {"type": "clientssl"}, "type clientssl needs a cert"),
        ({}, {"type": "gssapi"}, "needs requests-gssapi: pip install 'pacifica-downloader-service[gssapi]'"),
        ({"download_url": "cartd:8081"}, {}, "download_url must be an http:// or https:// URL"),
        ({}, {"type": "basic", "password": "100%"}, "'%' must be followed by '%' or '('"),
    ],
)
def test_configuration_problems_are_one_line_naming_the_file(
    home: Path, endpoints: dict[str, str], authentication: dict[str, str], words: str
) -> None:
    path = ini(home / ".pacifica_cli/config.ini", endpoints, authentication)
    with pytest.raises(InvalidConfigError) as caught:
        load_client_config()
    assert words in str(caught.value)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_key_that_is_not_the_certificates_is_refused(home: Path, pki: PKI) -> None:
    ini(
        home / ".pacifica_cli/config.ini",
        {},
        {"type": "clientssl", "cert": str(pki.client_cert), "key": str(pki.stranger_key)},
    )
    with pytest.raises(InvalidConfigError, match="cannot be used: key values mismatch"):
        load_client_config()


def test_download_transaction_id_as_pacifica_cli(
    home: Path, fake_cartd: FakeCartd, policy: PolicyStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cartd.add(7, DATA)
    ini(
        home / ".pacifica_cli/config.ini",
        {"download_url": fake_cartd.url, "download_policy_url": f"{policy.url}/status/transactions/by_id"},
        {"type": "basic", "username": "dmlb2001", "password": "secret"},
    )
    code = main(["download", "--transaction-id", "67", "--destination", "out", "--json"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert Path("out/data/a/b/foo.txt").read_bytes() == DATA
    expected = "Basic " + base64.b64encode(b"dmlb2001:secret").decode()
    assert policy.requests[0][2]["Authorization"] == expected
    assert set(fake_cartd.authorizations) == {expected}  # every Cartd call, the DELETE included
    assert json.loads(capsys.readouterr().out)["files"] == 1


def test_download_cloudevent_with_global_config_ini(
    home: Path, fake_cartd: FakeCartd, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cartd.add(8, DATA)
    config = ini(home.parent / "site.ini", {"download_url": fake_cartd.url})
    Path("event.json").write_text(json.dumps(make_event([file_obj(8, "x.txt", "", DATA)])), encoding="utf-8")
    code = main(["--config-ini", str(config), "download", "--cloudevent", "event.json", "--destination", "d"])
    assert code == EXIT_OK, capsys.readouterr().err
    assert Path("d/data/x.txt").read_bytes() == DATA
    assert fake_cartd.authorizations and set(fake_cartd.authorizations) == {""}


def test_download_without_what_or_with_both_is_usage(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", "--destination", "d"]) == EXIT_USAGE
    assert "give --transaction-id ID or --cloudevent FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["download", "--transaction-id", "1", "--cloudevent", "e.json"])
    assert caught.value.code == EXIT_USAGE


def test_download_with_a_bad_config_is_exit_10_and_one_line(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ini(home / ".pacifica_cli/config.ini", {}, {"type": "gssapi"})
    assert main(["download", "--transaction-id", "67"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "requests-gssapi" in err and "Traceback" not in err


def test_unknown_transaction_is_invalid_input(
    home: Path, fake_cartd: FakeCartd, policy: PolicyStandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    by_id = f"{policy.url}/status/transactions/by_id"
    ini(home / ".pacifica_cli/config.ini", {"download_url": fake_cartd.url, "download_policy_url": by_id})
    assert main(["download", "--transaction-id", "68", "--destination", "d"]) == EXIT_INVALID
    assert "Policy knows no transaction 68" in capsys.readouterr().err
