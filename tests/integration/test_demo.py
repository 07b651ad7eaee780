"""The demo (README's run command) and the example requests of docs/service.md, as written."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def readme_examples() -> list[str]:
    """The shell commands of docs/service.md's "Examples" block, continuation lines joined."""
    doc = (REPO / "docs" / "service.md").read_text(encoding="utf-8")
    block = doc.split("## Examples", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.integration
def test_demo_downloads_the_sample_with_every_readme_example(tmp_path: Path) -> None:
    port = free_port()
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / "demo.py"),
            "--port",
            str(port),
            "--workdir",
            str(tmp_path / "demo"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        _run_examples(demo, port, tmp_path)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)  # Ctrl-C, as a person stops it
        code = demo.wait(60)
        log.close()
    assert code == 0, (tmp_path / "demo.log").read_text()[-3000:]


def _run_examples(demo: subprocess.Popen[bytes], port: int, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while "Its files land in" not in (tmp_path / "demo.log").read_text(errors="replace"):
        assert demo.poll() is None and time.monotonic() < deadline, (tmp_path / "demo.log").read_text()[
            -3000:
        ]
        time.sleep(0.2)
    printed = (tmp_path / "demo.log").read_text()
    assert f"--data @examples/notifications-event-0.1.json {url}/" in printed  # the command it prints

    commands = readme_examples()
    assert len(commands) == 5
    answers = []
    for command in commands:
        assert command.startswith("curl ")
        run = "curl -sS -w '\\n%{http_code}' " + command[5:].replace("http://127.0.0.1:8080", url)
        result = subprocess.run(
            ["bash", "-c", run], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
        )
        assert result.returncode == 0, (command, result.stderr)
        body, _, status = result.stdout.rpartition("\n")
        answers.append((int(status), json.loads(body)))
    assert [status for status, _ in answers] == [200, 200, 200, 202, 200]
    assert [answers[n][1]["state"] for n in range(3)] == ["done", "done", "done"]
    batch = answers[3][1]["events"]
    assert [event["event_id"] for event in batch] == ["sample-run-42-batch-1", "sample-run-42-batch-2"]

    def all_done() -> bool:
        jobs = requests.get(f"{url}/jobs", timeout=10).json()["jobs"]
        return len(jobs) == 5 and all(job["state"] == "done" for job in jobs)

    while not all_done():
        assert time.monotonic() < deadline, requests.get(f"{url}/jobs", timeout=10).text
        time.sleep(0.2)
    downloads = sorted((tmp_path / "demo" / "downloads").iterdir())
    assert len(downloads) == 5
    expected = {
        path.relative_to(EXAMPLES / "data"): path.read_bytes()
        for path in EXAMPLES.glob("data/**/*")
        if path.is_file()
    }
    for folder in downloads:
        assert re.fullmatch(r"event-sample-run-42[-\w]*-[0-9a-f]{12}", folder.name), folder.name
        got = {
            path.relative_to(folder / "data"): path.read_bytes()
            for path in (folder / "data").glob("**/*")
            if path.is_file()
        }
        assert got == expected
        assert json.loads((folder / "metadata.json").read_text())["transaction"] == 67
        assert (folder / "notification.json").is_file()
