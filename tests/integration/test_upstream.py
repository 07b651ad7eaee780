"""Upstream's own tests, unmodified, against the drop-in ``pacifica.downloader`` and the real stack.

pacifica-downloader 0.4.1's ``tests/downloader_test.py`` and pacifica-dispatcher 0.2.5's
``downloader_runners_test.py`` and ``runners_test.py`` (from their sdists) run in
``.venv-upstream`` (scripts/install-upstream.sh), where the drop-in is installed instead of
upstream's distribution, against the real Archive Interface and Cartd and a Policy stand-in
(devstack/upstream.py). They hard-code their ports (8080, 8081, 8181), so they run in a
network namespace of their own: nothing on the host can collide with them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration

CACHE = Path(
    os.environ.get(
        "PACIFICA_UPSTREAM_CACHE",
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pacifica-downloader/upstream",
    )
)
UPSTREAM_VENV = Path(os.environ.get("UPSTREAM_VENV", REPO / ".venv-upstream"))
PACIFICA_VENV = Path(os.environ.get("PACIFICA_VENV", REPO / ".venv-pacifica"))

# Every upstream test that touches the downloader, and what it must do against the drop-in.
EXPECTED = {
    "downloader_test::test_cart_api_url": "passed",
    "downloader_test::test_download_cloudevent": "passed",
    "downloader_test::test_download_policy": "passed",
    "downloader_runners_test::test_local_downloader_runner": "passed",
    "downloader_runners_test::test_local_downloader_runner_nofiles": "passed",
    "downloader_runners_test::test_remote_downloader_runner": "passed",
    "downloader_runners_test::test_remote_downloader_runner_nofiles": "passed",
    "runners_test::test_local_runners": "passed",
    "runners_test::test_remote_runners": "passed",
}


def namespace_problem() -> str | None:
    """Why a private network namespace cannot be had here, or None."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    probe = subprocess.run(
        ["unshare", "--net", "sh", "-c", "ip link set lo up"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace (`unshare --net` needs root): {probe.stderr.strip()}"
    return None


def outcomes(junit: Path) -> dict[str, str]:
    """``{"module::test": "passed" | "failed" | "error" | "skipped: why"}`` from a JUnit file."""
    found = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        module = str(case.get("classname")).split(".")[-2]  # tests.<module>.<TestCase class>
        name = f"{module}::{case.get('name')}"
        state = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                state = child.tag if child.tag == "error" else "failed"
            elif child.tag == "skipped":
                state = f"skipped: {child.get('message')}"
        found[name] = state
    return found


@pytest.fixture(scope="module")
def upstream_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    problem = namespace_problem()
    if problem is not None:
        print(f"SKIPPED upstream tests: {problem}", file=sys.stderr)
        pytest.skip(f"upstream tests need a private loopback: {problem}")
    if not (PACIFICA_VENV / "bin" / "pacifica-cartd").exists():
        pytest.fail(f"no Pacifica stack in {PACIFICA_VENV}: run scripts/install-pacifica-stack.sh")
    # Idempotent: brings the drop-in in .venv-upstream up to date with these sources.
    subprocess.run(["bash", str(REPO / "scripts/install-upstream.sh")], check=True, timeout=900)
    work = tmp_path_factory.mktemp("upstream")
    runner = [
        sys.executable,
        "-m",
        "devstack.upstream",
        f"--workdir={work}",
        f"--pacifica-venv={PACIFICA_VENV}",
        f"--upstream-venv={UPSTREAM_VENV}",
        f"--downloader-sdist={CACHE / 'pacifica-downloader-0.4.1.tar.gz'}",
        f"--dispatcher-sdist={CACHE / 'pacifica-dispatcher-0.2.5.tar.gz'}",
        f"--results={work / 'results'}",
    ]
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *runner],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    results = {**outcomes(work / "results/downloader.xml"), **outcomes(work / "results/dispatcher.xml")}
    print("\n".join(f"{name}: {state}" for name, state in results.items()), file=sys.stderr)
    return results


def test_upstream_suites_pass_against_the_dropin(upstream_results: dict[str, str]) -> None:
    assert upstream_results == EXPECTED


def test_the_upstream_venv_holds_the_dropin_not_upstream(upstream_results: dict[str, str]) -> None:
    code = (
        "import importlib.metadata as md, pacifica.downloader as d;"
        "print(md.version('pacifica-downloader'), md.version('pacifica-dispatcher'),"
        " md.version('cloudevents-python'), type(d.Downloader().cart_api).__mro__[1].__module__)"
    )
    out = subprocess.run(
        [str(UPSTREAM_VENV / "bin/python"), "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.split() == ["0.5.0", "0.2.5", "0.2.1", "downloader_service.cartapi"]
