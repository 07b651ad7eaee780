"""Peak RSS of ``serve`` (intake + one worker) for the largest event its body limit admits.

Run from the repository root, by hand (it is not a test)::

    .venv/bin/python benchmarks/serve_memory.py [--baseline DIR] [--out FILE]

A fake Cartd (``tests/fakecartd.py``, a thread of this script, ready at once) serves the
event's files: the most of the smallest valid file objects that fit in the 10 MiB body limit
(76,646, as ``benchmarks/run.py`` builds them: 0-16 bytes each). ``serve`` runs with one
worker on a SQLite store of its own; the event is POSTed as Notifications sends it
(CloudEvents 0.1, ``application/json``, answered 202), the job is read until it is ``done``,
and then ``VmHWM`` (the peak resident set of the process since its ``exec``) is read from
``/proc``, beside ``VmHWM`` at rest before the POST (what the imports and threads take).
Then the same with ``DOWNLOADER_WORKERS=0``, read after the 202: the intake's part alone.
With ``--baseline DIR`` the same runs from the code in ``DIR`` too. Binds 127.0.0.1; every
process is stopped by PID.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.latency import answers, spawn_service  # noqa: E402
from benchmarks.run import code_state, largest_event_files, many_files_event, tiny_file  # noqa: E402
from benchmarks.scale import HOST, Processes, log, machine, wait_for  # noqa: E402
from devstack.pacifica import free_port  # noqa: E402
from downloader_service.service.settings import DEFAULT_MAX_BODY_BYTES  # noqa: E402
from tests.fakecartd import FakeCartd  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "serve-memory-results.md"


def hwm_mb(pid: int) -> float:
    """The process's peak resident set (``VmHWM``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for {pid}")


def measure(
    procs: Processes, work: Path, fake: FakeCartd, body: bytes, code: Path | None, name: str, workers: int = 1
) -> str:
    """One ``serve``: its peak at rest and after the job (with ``workers=0``, after the 202)."""
    port = str(free_port(HOST))
    name = name if workers else f"{name}, intake only (workers 0)"
    env = {
        "CARTD_URL": fake.url,
        "DOWNLOADER_PORT": port,
        "DOWNLOADER_WORKERS": str(workers),
        "DOWNLOADER_ROOT": str(work / f"root-{name}"),
        "DOWNLOADER_STATE_DIR": str(work / f"state-{name}"),
        "DOWNLOADER_CART_TIMEOUT": "600",
    }
    proc = spawn_service(procs, work, f"serve-{name}", "serve", env, code)
    url = f"http://{HOST}:{port}"
    try:
        wait_for(functools.partial(answers, url), 60, f"serve {name}", proc, work / f"serve-{name}.log")
        time.sleep(1.0)
        rest = hwm_mb(proc.pid)
        began = time.monotonic()
        resp = requests.post(
            url + "/",
            data=body,
            headers={"Content-Type": "application/json", "Prefer": "respond-async"},
            timeout=300,
        )
        if resp.status_code != 202:
            raise RuntimeError(f"{name}: answered {resp.status_code}: {resp.text[:300]}")
        status_url = resp.json()["status_url"]
        state = "queued"
        while workers and state not in ("done", "failed"):
            time.sleep(0.2)
            state = requests.get(status_url, timeout=60).json()["state"]
        seconds = time.monotonic() - began
        peak = hwm_mb(proc.pid)
    finally:
        procs.stop(proc)
    log(f"[memory] {name}: {state} in {seconds:.1f} s, VmHWM at rest {rest:.1f} MiB, peak {peak:.1f} MiB")
    return f"| {name} | {state} | {seconds:.1f} | {rest:.1f} | {peak:.1f} |"


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", type=Path, help="also run serve from the code in this directory")
    parser.add_argument("--baseline-name", default="baseline", help="how the report names --baseline")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"markdown report ({DEFAULT_OUT})")
    args = parser.parse_args(argv)
    code = code_state()
    load = os.getloadavg()[0]
    count = largest_event_files(DEFAULT_MAX_BODY_BYTES)
    files = []
    fake = FakeCartd().start()
    for index in range(count):
        file, data = tiny_file(index)
        fake.contents[str(file.id)] = data
        files.append(file)
    body = many_files_event(files)
    work = Path(tempfile.mkdtemp(prefix="downloader-serve-memory-"))
    procs = Processes()
    rows = []
    try:
        codes = [(None, "this checkout")]
        if args.baseline is not None:
            codes.append((args.baseline.resolve(), args.baseline_name))
        for workers in (1, 0):
            rows += [measure(procs, work, fake, body, where, name, workers) for where, name in codes]
    finally:
        procs.stop_all()
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join(
        [
            f"An event of {count} files ({len(body)} bytes, the body limit is {DEFAULT_MAX_BODY_BYTES}), "
            "Notifications' 0.1 form, `serve` with one worker, SQLite store, fake Cartd.",
            "",
            "| code | job | POST to done (s) | VmHWM at rest (MiB) | VmHWM after the job, or the 202 (MiB) |",
            "|---|---|---:|---:|---:|",
            *rows,
        ]
    )
    print(table)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join([".venv/bin/python", "benchmarks/serve_memory.py", *argv])
    facts = [f"- code: {code}", machine()[0], f"- load average (1 min) at the start: {load:.2f}"]
    args.out.write_text(
        "\n".join(
            [
                f"# serve's peak RSS for the largest event, {when}",
                "",
                f"Command: `{command}`",
                "",
                *facts,
                "",
                table,
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
