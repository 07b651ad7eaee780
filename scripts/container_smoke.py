"""Smoke-test the built container image against the real Pacifica Cartd stack.

Run by ``scripts/test-container`` (with ``.venv/bin/python``) once the image is built:

1. starts the real Archive Interface + Cartd + Celery worker on 127.0.0.1
   (``devstack/pacifica.py``) and stores one small file in the archive;
2. runs the image with podman on the host network, bound to 127.0.0.1 only, with a host
   directory as the ``/data`` volume;
3. checks the container user is not root, ``/health/live`` answers, the image's own
   ``HEALTHCHECK`` passes under ``podman healthcheck run``;
4. posts a Notifications-style event for the file, waits for the job, and checks the file
   landed in the ``/data`` volume with the right content, owned by the container's user;
5. stops the container with SIGTERM (``podman stop -t 15``) and checks its exit code is 0;
6. removes the container and stops the stack, whatever happened.

Exit status 0 when every check passed, 1 otherwise (with the container's and the stack's
logs on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.pacifica import PacificaStack, free_port  # noqa: E402
from tests.events import file_obj, make_event  # noqa: E402

HOST = "127.0.0.1"
IMAGE_PORT = 8080  # the port the image's HEALTHCHECK asks
STOP_TIMEOUT = 15
# podman 4.3 without systemd logs these on every run/stop of a container with a HEALTHCHECK:
# it cannot install the periodic timer. Harmless here: the check is run by hand.
_SYSTEMD_NOISE = "unable to get systemd connection"


class SmokeError(Exception):
    """A check failed."""


def log(message: str) -> None:
    """One progress line on stdout."""
    print(f"[container-smoke] {message}", flush=True)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run podman, dropping its systemd-timer noise from stderr; SmokeError if it fails."""
    proc = subprocess.run(
        ["podman", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    stderr = "\n".join(line for line in proc.stderr.splitlines() if _SYSTEMD_NOISE not in line)
    if check and proc.returncode != 0:
        raise SmokeError(f"podman {' '.join(args[:2])} failed ({proc.returncode}): {stderr.strip()}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, stderr)


def port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` (on 127.0.0.1 or on every address).

    SO_REUSEADDR as the service's server sets it: connections of an earlier run still in
    TIME-WAIT on the port do not stop it from listening there.
    """
    for address in (HOST, "0.0.0.0"):  # noqa: S104 - probing, not listening
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return False
    return True


def choose_port(requested: int) -> int:
    """The requested port, else the image's own port when free, else any free port."""
    if requested:
        return requested
    return IMAGE_PORT if port_is_free(IMAGE_PORT) else free_port(HOST)


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.2) -> Any:
    """Call ``check`` until it returns something truthy; SmokeError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (requests.RequestException, SmokeError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise SmokeError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class Smoke:
    """One smoke test run; ``run()`` returns normally only if every check passed."""

    def __init__(self, args: argparse.Namespace):
        self.image: str = args.image
        self.workdir = Path(args.workdir).resolve()
        self.venv = Path(args.pacifica_venv).resolve()
        self.port = choose_port(args.port)
        self.name = f"pacifica-downloader-smoke-{os.getpid()}-{secrets.token_hex(3)}"
        self.container_id = ""
        self.stack: PacificaStack | None = None
        self.session = requests.Session()
        self.session.trust_env = False  # 127.0.0.1 only: never through a proxy
        self.base_url = f"http://{HOST}:{self.port}"
        self.results: list[str] = []

    def ok(self, message: str) -> None:
        self.results.append(message)
        log(f"OK   {message}")

    # ------------------------------------------------------------------ steps
    def image_user(self) -> int:
        """The uid the image runs as (``id -u`` in a throw-away container)."""
        out = podman("run", "--rm", "--network", "none", "--entrypoint", "id", self.image, "-u").stdout
        uid = int(out.strip())
        if uid == 0:
            raise SmokeError("the image runs as root (id -u = 0)")
        return uid

    def start_stack(self) -> PacificaStack:
        self.stack = PacificaStack(self.workdir / "pacifica", self.venv)
        self.stack.start(timeout=90)
        self.ok(f"Pacifica stack up in {self.stack.startup_seconds:.1f} s (Cartd {self.stack.cartd_url})")
        return self.stack

    def start_container(self, data_dir: Path, state_dir: Path, cartd_url: str) -> None:
        argv = [
            "run",
            "--detach",
            "--name",
            self.name,
            "--label",
            "org.pacifica.downloader.smoke=1",
            # Cartd listens on 127.0.0.1 only, so the container shares the host's network
            # and the service binds 127.0.0.1 too (nothing is published on other addresses).
            "--network",
            "host",
            "--env",
            f"DOWNLOADER_HOST={HOST}",
            "--env",
            f"DOWNLOADER_PORT={self.port}",
            "--env",
            f"CARTD_URL={cartd_url}",
            "--env",
            "NO_PROXY=127.0.0.1,localhost",
            "--volume",
            f"{data_dir}:/data",
            "--volume",
            f"{state_dir}:/state",
        ]
        if self.port != IMAGE_PORT:
            # The image's HEALTHCHECK asks port 8080; on the host network the service had to
            # take another port, so the same command is given with that port instead.
            test = self.image_healthcheck()
            command = [arg.replace(f":{IMAGE_PORT}/", f":{self.port}/") for arg in test[1:]]
            argv += ["--health-cmd", json.dumps(command)]
            log(f"NOTE port {IMAGE_PORT} is busy: using {self.port}, HEALTHCHECK command re-pointed there")
        self.container_id = podman(*argv, self.image).stdout.strip()
        log(f"started container {self.name} ({self.container_id[:12]}) on {self.base_url}")

    def image_healthcheck(self) -> list[str]:
        """The image's HEALTHCHECK test (``["CMD", ...]``); SmokeError if it has none.

        Only docker-format images keep a HEALTHCHECK (buildah drops it from OCI images).
        """
        info = json.loads(podman("image", "inspect", self.image).stdout)[0]
        test = (info.get("Healthcheck") or {}).get("Test")
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            raise SmokeError(f"the image has no usable HEALTHCHECK (built as OCI, not docker?): {test!r}")
        return list(test)

    def container_state(self) -> dict[str, Any]:
        return dict(json.loads(podman("inspect", "--type", "container", self.name).stdout)[0]["State"])

    def check_live(self) -> None:
        def live() -> bool:
            if self.container_state().get("Status") != "running":
                raise SmokeError("the container is not running")
            return self.session.get(f"{self.base_url}/health/live", timeout=3).status_code == 200

        started = time.monotonic()
        try:
            wait_for("/health/live", live, 60)
        except SmokeError as exc:
            state = self.container_state()
            if state.get("Status") != "running":
                raise SmokeError(f"the container stopped (exit {state.get('ExitCode')})") from exc
            raise
        self.ok(f"GET /health/live answers 200 ({time.monotonic() - started:.1f} s after start)")

    def check_user(self, image_uid: int) -> None:
        uid = int(podman("exec", self.name, "id", "-u").stdout.strip())
        if uid == 0 or uid != image_uid:
            raise SmokeError(f"the service runs as uid {uid} (image user {image_uid})")
        self.ok(f"runs as non-root uid {uid}")

    def check_healthcheck(self) -> None:
        config = json.loads(podman("inspect", "--type", "container", self.name).stdout)[0]["Config"]
        test = (config.get("Healthcheck") or {}).get("Test")
        if not test:
            raise SmokeError("the container has no healthcheck: the image's HEALTHCHECK was not picked up")
        if self.port == IMAGE_PORT and test != self.image_healthcheck():
            raise SmokeError(f"container healthcheck {test!r} differs from the image's")
        run = podman("healthcheck", "run", self.name, check=False, timeout=30)
        state = self.container_state()
        status = (state.get("Health") or state.get("Healthcheck") or {}).get("Status")
        if run.returncode != 0 or status != "healthy":
            raise SmokeError(
                f"podman healthcheck run failed ({run.returncode}, status {status}): {run.stdout}{run.stderr}"
            )
        self.ok(f"podman healthcheck run passes (status {status}; test {' '.join(test[1:3])} ...)")

    def check_download(self, stack: PacificaStack, data_dir: Path, image_uid: int) -> None:
        data = b"Pacifica downloader container smoke test\n" + secrets.token_bytes(4096)
        file_id = 900_000 + secrets.randbelow(99_999)
        stack.put_file(file_id, data)
        event = make_event(
            [file_obj(file_id, "sample.bin", "smoke/sub", data)], event_id=f"smoke-{secrets.token_hex(8)}"
        )
        started = time.monotonic()
        answer = self.session.post(f"{self.base_url}/", json=event, timeout=60)
        if answer.status_code not in (200, 202):
            raise SmokeError(f"POST / answered {answer.status_code}: {answer.text[:500]}")
        job = answer.json()
        if job.get("state") != "done":
            status_url = f"{self.base_url}/jobs/{job['job_id']}"

            def finished() -> dict[str, Any] | None:
                doc: dict[str, Any] = self.session.get(status_url, timeout=5).json()
                if doc.get("state") in ("failed", "rejected"):
                    raise SmokeError(f"the job ended {doc.get('state')}: {doc}")
                return doc if doc.get("state") == "done" else None

            job = wait_for("the download job", finished, 120, interval=0.5)
        seconds = time.monotonic() - started
        container_path = Path(job["download_path"])
        if not container_path.is_relative_to("/data"):
            raise SmokeError(f"download_path {container_path} is not under /data")
        host_root = data_dir / container_path.relative_to("/data")
        target = host_root / "data" / "smoke" / "sub" / "sample.bin"
        if not target.is_file():
            found = sorted(str(path.relative_to(data_dir)) for path in data_dir.rglob("*") if path.is_file())
            raise SmokeError(f"{target} is missing; files in /data: {found[:20]} (job: {job})")
        if target.read_bytes() != data:
            raise SmokeError(f"{target} has the wrong content")
        owners = {path: path.stat().st_uid for path in (host_root, target)}
        wrong = {str(path): uid for path, uid in owners.items() if uid != image_uid}
        if wrong:
            raise SmokeError(f"owned by the wrong uid (want {image_uid}): {wrong}")
        self.ok(
            f"real download through Cartd: {len(data)} bytes in {seconds:.1f} s -> "
            f"{target.relative_to(data_dir)} in the /data volume, right content, uid {image_uid}"
        )

    def check_sigterm(self) -> None:
        started = time.monotonic()
        podman("stop", "--time", str(STOP_TIMEOUT), self.name, timeout=STOP_TIMEOUT + 30)
        seconds = time.monotonic() - started
        state = self.container_state()
        code = state.get("ExitCode")
        if state.get("Status") != "exited" or code != 0:
            raise SmokeError(f"after SIGTERM: status {state.get('Status')}, exit code {code} (want 0)")
        if seconds >= STOP_TIMEOUT:
            raise SmokeError(f"SIGTERM took {seconds:.1f} s: podman had to SIGKILL it")
        self.ok(f"SIGTERM (podman stop -t {STOP_TIMEOUT}) ends it cleanly in {seconds:.1f} s, exit code 0")

    # --------------------------------------------------------------- the run
    def dump_logs(self) -> None:
        if self.container_id:
            out = podman("logs", "--tail", "60", self.name, check=False)
            print(f"--- container {self.name} log (last 60 lines) ---", file=sys.stderr)
            print(out.stdout + out.stderr, file=sys.stderr)
        if self.stack is not None:
            for name, path in self.stack.logs.items():
                with contextlib.suppress(OSError):
                    tail = path.read_text(errors="replace").splitlines()[-20:]
                    print(f"--- Pacifica {name} log ({path}) ---", file=sys.stderr)
                    print("\n".join(tail), file=sys.stderr)

    def cleanup(self) -> None:
        if self.container_id:
            podman("rm", "--force", "--volumes", "--time", "5", self.container_id, check=False)
        if self.stack is not None:
            self.stack.stop()
        # Files the container wrote belong to its uid; the work dir is ours to remove.
        shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)
        data_dir = self.workdir / "data"
        state_dir = self.workdir / "state"
        image_uid = self.image_user()
        for folder in (data_dir, state_dir):
            folder.mkdir(parents=True)
            os.chown(folder, image_uid, -1)  # the volumes must be writable by the image's user
        stack = self.start_stack()
        self.start_container(data_dir, state_dir, stack.cartd_url)
        self.check_live()
        self.check_user(image_uid)
        self.check_healthcheck()
        self.check_download(stack, data_dir, image_uid)
        self.check_sigterm()


def main() -> int:
    """Parse the arguments, run the smoke test, clean up; 0 if every check passed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="localhost/pacifica-downloader:test")
    parser.add_argument("--workdir", required=True, help="scratch directory (removed and re-made)")
    parser.add_argument("--pacifica-venv", default=str(REPO / ".venv-pacifica"))
    parser.add_argument("--port", type=int, default=0, help="service port (default: 8080 if free)")
    args = parser.parse_args()
    if shutil.which("podman") is None:
        print("container_smoke: podman not found", file=sys.stderr)
        return 1
    smoke = Smoke(args)
    try:
        smoke.run()
    except Exception as exc:  # noqa: BLE001 - report any failure, then clean up
        print(f"[container-smoke] FAIL {exc}", file=sys.stderr, flush=True)
        smoke.dump_logs()
        return 1
    finally:
        smoke.cleanup()
    log(f"all {len(smoke.results)} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
