"""Cartd and Policy behind a real TLS terminator that requires a client certificate.

Debian's nginx (``ssl_verify_client on``, certificates made by the test) stands in front of the
real Cartd and a Policy stand-in. The command line reaches it from a pacifica-cli INI, the
service from its settings; a missing or wrong certificate, or an untrusted server, is one
line on stderr with the documented exit code (or the job's error), never a traceback.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.nginx import MutualTLSProxy
from devstack.pacifica import PacificaStack
from devstack.policy import PolicyStandIn
from downloader_service.cli import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE
from tests.conftest import free_port, logged, served
from tests.events import file_obj, make_event
from tests.pki import PKI, make_pki

pytestmark = pytest.mark.integration

SCRIPT = Path(sys.executable).with_name("downloader-service")
DATA = {0: b"behind mutual TLS\n", 1: "caf\u00e9\n".encode()}


class Site:
    """The stack behind nginx: its URLs, the PKI, and a transaction of two archived files."""

    def __init__(self, proxy: MutualTLSProxy, pki: PKI, policy: PolicyStandIn, ids: list[int]) -> None:
        self.proxy = proxy
        self.pki = pki
        self.policy = policy
        self.ids = ids
        self.cartd = proxy.url("cartd")
        self.by_id = proxy.url("policy") + "/status/transactions/by_id"

    def event(self, event_id: str) -> dict[str, Any]:
        return make_event(
            [
                file_obj(self.ids[0], "one.txt", "a", DATA[0]),
                file_obj(self.ids[1], "two.txt", "a/b/", DATA[1]),
            ],
            event_id=event_id,
        )


@pytest.fixture(scope="module")
def site(
    pacifica_stack: PacificaStack, file_ids: Iterator[int], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Site]:
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    ids = list(itertools.islice(file_ids, 2))
    for file_id, key in zip(ids, DATA, strict=True):
        pacifica_stack.put_file(file_id, DATA[key])
    with PolicyStandIn() as policy:
        policy.transactions["67"] = {
            "files": {
                str(ids[0]): {"name": "one.txt", "subdir": "a", "hashtype": "sha1", "hashsum": sha1(DATA[0])},
                str(ids[1]): {
                    "name": "two.txt",
                    "subdir": "a/b/",
                    "hashtype": "sha1",
                    "hashsum": sha1(DATA[1]),
                },
            }
        }
        upstreams = {"cartd": pacifica_stack.cartd_url, "policy": policy.url}
        with MutualTLSProxy(tmp_path_factory.mktemp("nginx"), upstreams, pki) as proxy:
            yield Site(proxy, pki, policy, ids)


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def cli(
    tmp_path: Path, site: Site, auth: dict[str, str], ca_bundle: str, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``downloader-service download`` as pacifica-cli's users do: an INI, the same arguments."""
    config = tmp_path / "cli.ini"
    lines = [
        "[endpoints]",
        f"download_url = {site.cartd}",
        f"download_policy_url = {site.by_id}",
        f"ca_bundle = {ca_bundle}",
        "[authentication]",
        *(f"{key} = {value}" for key, value in auth.items()),
    ]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AUTHENTICATION_", "DOWNLOAD_"))}
    env.update(HOME=str(tmp_path), PACIFICA_CLI_INI=str(config))
    return subprocess.run(
        [str(SCRIPT), "download", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


def client(pki: PKI) -> dict[str, str]:
    return {"type": "clientssl", "cert": str(pki.client_cert), "key": str(pki.client_key)}


def test_cli_transaction_with_the_right_certificate(tmp_path: Path, site: Site) -> None:
    done = cli(
        tmp_path, site, client(site.pki), str(site.pki.ca), "--transaction-id", "67", "--destination", "dl"
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert (tmp_path / "dl/data/a/one.txt").read_bytes() == DATA[0]
    assert (tmp_path / "dl/data/a/b/two.txt").read_bytes() == DATA[1]


def test_cli_cloudevent_with_a_combined_certificate_and_no_verification(tmp_path: Path, site: Site) -> None:
    (tmp_path / "event.json").write_text(json.dumps(site.event("mtls-cli")), encoding="utf-8")
    auth = {"type": "clientssl", "cert": str(site.pki.client_combined), "key": ""}
    done = cli(tmp_path, site, auth, "False", "--cloudevent", "event.json", "--destination", "dl", "--quiet")
    assert done.returncode == EXIT_OK, done.stderr
    assert (tmp_path / "dl/data/a/b/two.txt").read_bytes() == DATA[1]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("no certificate", "400 No required SSL certificate was sent"),
        ("a certificate of another CA", "400 The SSL certificate error"),
        ("a server the CA bundle does not vouch for", "the server's TLS certificate is not trusted"),
        ("the system's CAs", "the server's TLS certificate is not trusted"),
    ],
)
@pytest.mark.parametrize("what", ["--transaction-id", "--cloudevent"])
def test_cli_refused_is_one_line_and_exit_4(
    tmp_path: Path, site: Site, case: str, words: str, what: str
) -> None:
    auth, ca = {
        "no certificate": ({"type": "None"}, str(site.pki.ca)),
        "a certificate of another CA": (
            {"type": "clientssl", "cert": str(site.pki.stranger_cert), "key": str(site.pki.stranger_key)},
            str(site.pki.ca),
        ),
        "a server the CA bundle does not vouch for": (client(site.pki), str(site.pki.other_ca)),
        "the system's CAs": (client(site.pki), "True"),
    }[case]
    (tmp_path / "event.json").write_text(json.dumps(site.event("mtls-refused")), encoding="utf-8")
    given = "67" if what == "--transaction-id" else "event.json"
    done = cli(tmp_path, site, auth, ca, what, given, "--destination", "dl")
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr
    line = one_line(done)
    assert words in line
    assert ("Policy" if what == "--transaction-id" else "Cartd") in line
    assert not (tmp_path / "dl/data").exists()


def test_cli_missing_certificate_file_is_one_line_and_exit_10(tmp_path: Path, site: Site) -> None:
    auth = {"type": "clientssl", "cert": str(tmp_path / "gone.pem"), "key": str(site.pki.client_key)}
    done = cli(tmp_path, site, auth, str(site.pki.ca), "--transaction-id", "67")
    assert done.returncode == EXIT_CONFIG
    assert f"the client certificate file {tmp_path / 'gone.pem'} does not exist" in one_line(done)


def service_env(site: Site, tmp_path: Path, cert: Path, key: Path) -> dict[str, str]:
    (tmp_path / "root").mkdir(exist_ok=True)
    return {
        "CARTD_URL": site.cartd,
        "DOWNLOADER_ROOT": str(tmp_path / "root"),
        "DOWNLOADER_CA_BUNDLE": str(site.pki.ca),
        "DOWNLOADER_CLIENT_CERT": str(cert),
        "DOWNLOADER_CLIENT_KEY": str(key),
        "DOWNLOADER_RETRY_BASE": "0.2",
    }


def test_service_downloads_through_mutual_tls(tmp_path: Path, site: Site) -> None:
    env = service_env(site, tmp_path, site.pki.client_cert, site.pki.client_key)
    log = tmp_path / "server.log"
    with served(env, log) as (url, _proc):
        assert requests.get(url + "/health/ready", timeout=10).status_code == 200
        resp = requests.post(url, json=site.event("mtls-service"), timeout=60)
        assert resp.status_code == 200, resp.text
        assert (Path(resp.json()["download_path"]) / "data/a/one.txt").read_bytes() == DATA[0]
        deadline = time.monotonic() + 30
        while not logged(log, "cart deleted"):  # the outbox's DELETE, through nginx too
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    access = (site.proxy.workdir / "access.log").read_text()
    assert re.search(r'"DELETE /[0-9a-f-]{36} HTTP/1.1" 200 ', access), access


def test_service_with_a_refused_certificate_says_so(tmp_path: Path, site: Site) -> None:
    env = service_env(site, tmp_path, site.pki.stranger_cert, site.pki.stranger_key)
    with served(env, tmp_path / "server.log") as (url, _proc):
        ready = requests.get(url + "/health/ready", timeout=10)
        assert ready.status_code == 503
        reason = ready.json()["checks"]["cartd"]["reason"]
        assert reason == "Cartd answered 400: 400 The SSL certificate error"
        job = requests.post(url, json=site.event("mtls-stranger"), timeout=60).json()
        deadline = time.monotonic() + 30
        while job["state"] not in ("failed", "done"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
            job = requests.get(job["status_url"], timeout=10).json()
        assert job["state"] == "failed"
        assert "400 The SSL certificate error" in job["detail"]


def test_service_refuses_to_start_with_a_missing_certificate(tmp_path: Path, site: Site) -> None:
    env = {
        **os.environ,
        **service_env(site, tmp_path, tmp_path / "gone.pem", site.pki.client_key),
        "DOWNLOADER_STATE_DIR": str(tmp_path / "state"),
    }
    done = subprocess.run(
        [str(SCRIPT), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert one_line(done) == (
        f"downloader-service: bad setting: DOWNLOADER_CLIENT_CERT: the client certificate file "
        f"{tmp_path / 'gone.pem'} does not exist"
    )
