from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread
from typing import Any

import pytest

from downloader_service import TransactionInfo
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd, closed_port, sha1

SCRIPT = Path(sys.executable).with_name("downloader-service")
FOO = b"foo\n" * 2000
BAR = b"bar\n"


def run(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], input=stdin, capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.fixture
def event_file(tmp_path: Path, fake_cartd: FakeCartd) -> Path:
    fake_cartd.add(34, FOO)
    fake_cartd.add(35, BAR)
    path = tmp_path / "event.json"
    path.write_text(
        json.dumps(make_event([file_obj(34, "foo.txt", "a/b", FOO), file_obj(35, "bar.txt", "", BAR)]))
    )
    return path


def test_download_event_file_prints_summary(tmp_path: Path, fake_cartd: FakeCartd, event_file: Path) -> None:
    result = run("download", "event", str(event_file), str(tmp_path / "out"), "--cart-url", fake_cartd.url)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/data/a/b/foo.txt").read_bytes() == FOO
    assert result.stdout.startswith("2 files, 8004 bytes in ")
    assert result.stderr == ""  # no terminal, no progress bar


def test_download_event_from_stdin_with_json(tmp_path: Path, fake_cartd: FakeCartd, event_file: Path) -> None:
    result = run(
        "download",
        "event",
        "-",
        str(tmp_path / "out"),
        "--json",
        "--filename",
        "run1",
        "--cart-url",
        fake_cartd.url,
        stdin=event_file.read_text(),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["destination"] == str(tmp_path / "out/run1")
    assert summary["files"] == 2
    assert summary["bytes"] == len(FOO) + len(BAR)
    assert (tmp_path / "out/run1/bar.txt").read_bytes() == BAR


def test_cart_url_comes_from_environment(tmp_path: Path, fake_cartd: FakeCartd, event_file: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "CARTD_URL": fake_cartd.url}
    result = run("download", "event", str(event_file), str(tmp_path / "out"), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


def test_corrupted_file_is_exit_7_and_leaves_nothing(
    tmp_path: Path, fake_cartd: FakeCartd, event_file: Path
) -> None:
    fake_cartd.contents["34"] = b"X" + FOO[1:]
    result = run("download", "event", str(event_file), str(tmp_path / "out"), "--cart-url", fake_cartd.url)
    assert result.returncode == 7
    assert result.stderr.count("\n") == 1
    assert "a/b/foo.txt" in result.stderr
    assert sha1(FOO) in result.stderr
    assert "Traceback" not in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"data": []}', "lists no files"),
        ('{"data": [{"destinationTable": "Files", "name": "x"}]}', "_id is missing"),
    ],
)
def test_bad_event_file_is_exit_3(tmp_path: Path, fake_cartd: FakeCartd, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    result = run("download", "event", str(bad), str(tmp_path / "out"), "--cart-url", fake_cartd.url)
    assert result.returncode == 3
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert fake_cartd.requests == []


def test_event_file_that_is_not_utf8_is_exit_3_and_a_byte_order_mark_is_fine(
    tmp_path: Path, fake_cartd: FakeCartd, event_file: Path
) -> None:
    bad = tmp_path / "latin1.json"
    bad.write_bytes(b'{"data": [{"destinationTable": "Files", "name": "caf\xe9"}]}')
    result = run("download", "event", str(bad), str(tmp_path / "out"), "--cart-url", fake_cartd.url)
    assert result.returncode == 3
    assert f"the event file {bad} is not UTF-8 text" in result.stderr
    assert fake_cartd.requests == []
    marked = tmp_path / "bom.json"
    marked.write_bytes(b"\xef\xbb\xbf" + event_file.read_bytes())
    result = run("download", "event", str(marked), str(tmp_path / "out"), "--cart-url", fake_cartd.url)
    assert result.returncode == 0, result.stderr


def test_missing_event_file_is_exit_3(tmp_path: Path) -> None:
    result = run("download", "event", str(tmp_path / "nope.json"), str(tmp_path / "out"))
    assert result.returncode == 3
    assert "No such file or directory" in result.stderr


@pytest.mark.parametrize(
    ("head", "code", "message"),
    [
        ((500, "error", "archive said no"), 4, "archive said no"),
        ((202, "staging", ""), 5, "not ready within"),
    ],
)
def test_cart_failures_have_their_exit_codes(
    tmp_path: Path,
    fake_cartd: FakeCartd,
    event_file: Path,
    head: tuple[int, str, str],
    code: int,
    message: str,
) -> None:
    fake_cartd.head = lambda cart: head
    result = run(
        "download",
        "event",
        str(event_file),
        str(tmp_path / "out"),
        "--cart-url",
        fake_cartd.url,
        "--timeout",
        "0.3",
    )
    assert result.returncode == code
    assert message in result.stderr


def test_cartd_down_is_exit_4(tmp_path: Path, event_file: Path) -> None:
    result = run(
        "download",
        "event",
        str(event_file),
        str(tmp_path / "out"),
        "--cart-url",
        f"http://127.0.0.1:{closed_port()}",
    )
    assert result.returncode == 4
    assert "cannot reach Cartd" in result.stderr


def test_transaction_from_file(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    fake_cartd.add(34, FOO)
    doc = tmp_path / "t.json"
    doc.write_text(
        json.dumps(
            {"files": {"34": {"name": "foo.txt", "subdir": "x", "hashtype": "sha1", "hashsum": sha1(FOO)}}}
        )
    )
    result = run(
        "download",
        "transaction",
        "67",
        str(tmp_path / "out"),
        "--from-file",
        str(doc),
        "--cart-url",
        fake_cartd.url,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/data/x/foo.txt").read_bytes() == FOO


def test_transaction_from_file_of_another_transaction_is_exit_3(
    tmp_path: Path, fake_cartd: FakeCartd
) -> None:
    doc = tmp_path / "t.json"
    files = {"34": {"name": "foo.txt", "subdir": "x", "hashtype": "sha1", "hashsum": sha1(FOO)}}
    doc.write_text(json.dumps({"_id": 68, "files": files}))
    result = run("download", "transaction", "67", str(tmp_path / "out"), "--from-file", str(doc))
    assert result.returncode == 3
    assert "transaction 68, not 67" in result.stderr
    assert fake_cartd.requests == []
    assert "transactions/by_id/ID" in run("download", "transaction", "--help").stdout


def test_json_summary_gives_an_absolute_destination(
    tmp_path: Path, fake_cartd: FakeCartd, event_file: Path
) -> None:
    result = subprocess.run(
        [str(SCRIPT), "download", "event", str(event_file), "out", "--json", "--cart-url", fake_cartd.url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["destination"] == str(tmp_path / "out" / "data")


def test_transaction_from_policy(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    fake_cartd.add(35, BAR)
    seen: list[str] = []

    class Policy(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(self.path)
            known = self.path == "/status/transactions/by_id/67"
            doc = {
                "files": {"35": {"name": "bar.txt", "subdir": "", "hashtype": "sha1", "hashsum": sha1(BAR)}}
            }
            payload = json.dumps(doc if known else {"message": "not found"}).encode()
            self.send_response(200 if known else 404)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Policy)
    Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    policy = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        ok = run(
            "download",
            "transaction",
            "67",
            str(tmp_path / "out"),
            "--policy-url",
            policy,
            "--cart-url",
            fake_cartd.url,
        )
        missing = run(
            "download",
            "transaction",
            "68",
            str(tmp_path / "out2"),
            "--policy-url",
            policy,
            "--cart-url",
            fake_cartd.url,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out/data/bar.txt").read_bytes() == BAR
    assert missing.returncode == 3
    assert "no transaction 68" in missing.stderr
    assert seen == ["/status/transactions/by_id/67", "/status/transactions/by_id/68"]


def test_help_on_every_level_lists_exit_codes_and_settings() -> None:
    top = run("--help")
    assert top.returncode == 0
    assert "serve" in top.stdout and "download" in top.stdout
    assert "exit codes:" in run("download", "event", "--help").stdout
    assert "--policy-url" in run("download", "transaction", "--help").stdout
    serve = run("serve", "--help").stdout
    for variable in ("CARTD_URL", "DOWNLOADER_ROOT", "DOWNLOADER_TOKEN", "DOWNLOADER_ASYNC"):
        assert variable in serve


def test_no_command_is_usage_error() -> None:
    assert run().returncode == 2
    assert run("download").returncode == 2


def test_progress_bar_is_drawn_on_a_terminal(tmp_path: Path, fake_cartd: FakeCartd, event_file: Path) -> None:
    import os
    import pty

    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [
            str(SCRIPT),
            "download",
            "event",
            str(event_file),
            str(tmp_path / "out"),
            "--cart-url",
            fake_cartd.url,
        ],
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    drawn = b""
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        drawn += data
    os.close(controller)
    assert proc.wait(30) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    screen = drawn.decode(errors="replace")
    assert "staging cart (2 files)" in screen
    assert "[2/2] bar.txt" in screen
    assert "7.82k/7.82k" in screen  # 8004 bytes of 8004 (the event's sizes), in KiB
    assert "100%" in screen


def test_ctrl_c_stops_cleanly_and_leaves_nothing(
    tmp_path: Path, fake_cartd: FakeCartd, event_file: Path
) -> None:
    import signal
    import time

    from tests.fakecartd import cart_tar, stall_after

    fake_cartd.body = lambda cart, name: stall_after(
        cart_tar(cart.fileids, fake_cartd.contents, name), 5000, 30
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [str(SCRIPT), "download", "event", str(event_file), str(out), "--cart-url", fake_cartd.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    # Wait until the tar is streaming (and stalled): the staging directory exists, GET was sent.
    while not (any(out.glob(".data.part-*")) and ("GET" in {m for m, _ in fake_cartd.requests})):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "interrupted" in stderr
    assert "Traceback" not in stderr
    assert list(out.iterdir()) == []
    assert len(fake_cartd.deleted) == 1


def test_jobs_commands_show_retry_and_delete_from_the_store(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    import os

    from downloader_service.service.app import create_app
    from downloader_service.service.settings import settings_from_env

    env = {**os.environ, "DOWNLOADER_STATE_DIR": str(tmp_path / "state")}
    assert run("jobs", "list", env=env).returncode == 1  # no store yet: says so, no traceback
    assert run("db", "check", env=env).returncode == 1
    upgraded = run("db", "upgrade", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    assert re.search(r"schema revision \d{4} \(newest\)", upgraded.stdout), upgraded.stdout

    fake_cartd.add(34, FOO)
    fake_cartd.head = lambda cart: (500, "error", "archive down")
    app = create_app(settings_from_env(env, cartd_url=fake_cartd.url, retry_window=0))
    service = app.service
    try:
        [(job, _)] = service.accept([_received("cli-1", [file_obj(34, "foo.txt", "a", FOO)])])
        deadline = time.monotonic() + 10
        while (current := service.store.get(job.id)) is None or current.state != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        service.close()

    listing = run("jobs", "list", "--state", "failed", env=env)
    assert listing.returncode == 0, listing.stderr
    assert job.id in listing.stdout and "cart_failed" in listing.stdout
    as_json = [json.loads(line) for line in run("jobs", "list", "--json", env=env).stdout.splitlines()]
    assert [(j["job_id"], j["state"], j["error"]) for j in as_json] == [(job.id, "failed", "cart_failed")]
    shown = json.loads(run("jobs", "show", job.id, env=env).stdout)
    assert shown["event"]["id"] == "cli-1"
    assert shown["detail"].startswith("Cartd failed the cart")
    retried = run("jobs", "retry", job.id, env=env)
    assert retried.returncode == 0 and "queued" in retried.stdout
    assert run("jobs", "retry", "nope", env=env).returncode == 3
    deleted = run("jobs", "delete", job.id, env=env)
    assert deleted.returncode == 0 and f"deleted {job.id}" in deleted.stdout
    assert run("jobs", "show", job.id, env=env).returncode == 3


def _received(event_id: str, files: list[dict[str, Any]]) -> Any:
    from downloader_service.service.webhook import ReceivedEvent

    event = make_event(files, event_id=event_id)
    return ReceivedEvent(event_id, event["source"], event["eventType"], "notifications-0.1", event["data"])


def test_a_rerun_fetches_only_what_is_missing_or_changed(
    tmp_path: Path, fake_cartd: FakeCartd, event_file: Path
) -> None:
    out = str(tmp_path / "out")
    args = ("download", "event", str(event_file), out, "--json", "--cart-url", fake_cartd.url)
    assert run(*args).returncode == 0
    (tmp_path / "out/data/bar.txt").unlink()
    again = run(*args)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout)
    assert (summary["files"], summary["already_there"]) == (2, 1)
    assert [obj["path"] for obj in list(fake_cartd.carts.values())[-1].fileids] == ["bar.txt"]
    assert (tmp_path / "out/data/bar.txt").read_bytes() == BAR


def test_the_progress_total_is_known_only_when_every_file_gives_a_size() -> None:
    from downloader_service.cartfile import CartFile
    from downloader_service.cli import _total_size

    sized = [CartFile(str(i), f"f{i}", "sha1", sha1(b""), size=i * 10) for i in range(4)]
    assert _total_size(sized) == 60
    assert _total_size([*sized, CartFile("9", "g", "sha1", sha1(b""))]) is None
    # the size a transaction document or an event gives, as CartFile keeps it
    doc = {"files": {"5": {"name": "a", "hashtype": "sha1", "hashsum": sha1(b""), "size": True}}}
    assert _total_size(TransactionInfo.files(doc)) is None
