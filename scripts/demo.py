"""A first download in one command: the real Pacifica stack, a sample dataset and the service.

Started by ``bash scripts/serve`` when no ``CARTD_URL`` is set. It starts the real Archive
Interface and Cartd (as the tests do, from ``.venv-pacifica``; Cartd's database on a
PostgreSQL server of its own, ``devstack/postgres.py``, as Pacifica runs it) on free local ports, stores
the sample dataset in ``examples/data`` under the file ids its example events name, starts
``downloader-service serve`` against it, prints the command that posts the sample's
Notifications event and where the files will land, and runs until Ctrl-C (or SIGTERM),
then stops everything it started.

Usage: .venv/bin/python scripts/demo.py [--port 8080] [--workdir .demo] [--ready-file F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.pacifica import PacificaStack  # noqa: E402
from devstack.postgres import PostgresServer  # noqa: E402

EXAMPLES = REPO / "examples"
SAMPLE_EVENT = EXAMPLES / "notifications-event-0.1.json"


def store_sample(stack: PacificaStack) -> list[str]:
    """Put every file the sample event names into the archive; returns their paths."""
    event = json.loads(SAMPLE_EVENT.read_text(encoding="utf-8"))
    stored = []
    for obj in event["data"]:
        if obj.get("destinationTable") == "Files":
            path = f"{obj['subdir']}/{obj['name']}"
            stack.put_file_from_path(obj["_id"], EXAMPLES / "data" / path)
            stored.append(path)
    return stored


def main(argv: list[str] | None = None) -> int:
    """Run the demo until interrupted."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("DOWNLOADER_PORT", "8080")))
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo")
    parser.add_argument("--ready-file", type=Path, help="write the service's URL here once it is ready")
    args = parser.parse_args(argv)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    workdir = args.workdir.resolve()
    # A fresh archive every time: it keeps stored files read-only, so ids cannot be reused.
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    began = time.monotonic()
    postgres = PostgresServer(workdir / "postgres")
    stack: PacificaStack | None = None
    service: subprocess.Popen[bytes] | None = None
    try:
        postgres.start(timeout=60)
        stack = PacificaStack(
            workdir / "stack", REPO / ".venv-pacifica", database_url=postgres.create_database("cartd")
        )
        stack.start(timeout=120)
        stored = store_sample(stack)
        url = f"http://127.0.0.1:{args.port}"
        env = {
            **os.environ,
            "CARTD_URL": stack.cartd_url,
            "DOWNLOADER_PORT": str(args.port),
            "DOWNLOADER_STATE_DIR": str(workdir / "state"),
            "DOWNLOADER_ROOT": str(workdir / "downloads"),
        }
        log = open(workdir / "service.log", "wb")  # noqa: SIM115 - the service writes it until the end
        service = subprocess.Popen(
            [str(Path(sys.executable).with_name("downloader-service")), "serve"],
            env=env,
            stdout=log,
            stderr=log,
        )
        deadline = time.monotonic() + 60
        while not _ready(url):
            if service.poll() is not None or time.monotonic() > deadline:
                print((workdir / "service.log").read_text()[-3000:], file=sys.stderr)
                print("demo: the service did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
        print(
            f"""
Pacifica Cartd {stack.cartd_url} and the archive interface are running, with the sample dataset
({", ".join(stored)}) stored. The downloader serves {url} ({time.monotonic() - began:.1f} s to here).

Post the sample's Notifications event (what Pacifica Notifications sends):

    curl -H 'Content-Type: application/json' --data @examples/notifications-event-0.1.json {url}/

Its files land in {workdir / "downloads"}/event-sample-run-42-<job>/data/, beside notification.json
and metadata.json. See every job at {url}/jobs (or open {url}/ in a browser).
Logs: {workdir / "service.log"}. Ctrl-C stops everything.
""",
            flush=True,
        )
        if args.ready_file is not None:
            args.ready_file.write_text(url, encoding="utf-8")
        while not stop.wait(0.5):
            if service.poll() is not None:
                print("demo: the service exited; see the log", file=sys.stderr)
                return 1
        return 0
    finally:
        if service is not None and service.poll() is None:
            service.send_signal(signal.SIGTERM)
            try:
                service.wait(20)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait(5)
        if stack is not None:
            stack.stop()
        postgres.close()


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/health/ready", timeout=2).status_code == 200
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.exit(main())
