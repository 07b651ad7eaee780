"""Run docker-compose.yml's whole loop over podman and check that an ingest ends as files.

Run by ``scripts/test-compose`` (with ``.venv/bin/python``) once ``scripts/compose-images``
has built the images and written the override that swaps only ``image:``. It drives a real
Compose implementation (``podman-compose``) with the repository's ``docker-compose.yml``:

1. brings the loop up in the compose file's ``depends_on`` order, waiting for each
   ``service_healthy`` dependency with ``podman healthcheck run`` (podman-compose on podman
   4.3 ignores the condition, and health timers need systemd), with ``--scale worker=3``;
2. stores sample files in the archive (``PUT`` inside the archive interface's container)
   and posts ingest events to **Notifications' ``/receive``** as Pacifica's metadata service
   does; Notifications routes them to the downloader through the subscription it owns;
3. checks, one line each (``check: <name>: ok|FAILED — <detail>``):
   - ``docs example``: the docs' "Post a test event" commands, run as written;
   - ``verified``: the files are in the ``downloads`` volume with their checksums, owned by
     uid 10001, with ``notification.json`` and ``metadata.json``;
   - ``scale``: three workers each did some of the jobs, none twice;
   - ``worker killed``: a worker container SIGKILLed mid-download, the job is finished by
     another worker (process), once;
   - ``restart``: the downloader stopped while events arrive and started again: the
     subscription is enabled again, and after the documented replay nothing is undownloaded;
   - ``down/up``: ``down`` (volumes kept) then ``up``: the job store and downloads are
     still there, and jobs queued before ``down`` finish;
   - ``stop grace``: ``stop`` ends every container by its stop signal within its grace
     period (none is SIGKILLed);
   - ``down -v``: leaves no container, volume, network or pod of the project behind;
4. prints ``compose: N/M checks hold, up in S s`` last; exit status 0 when all hold.

Whatever happens, the project is taken down with its volumes at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")

HOST = "127.0.0.1"
DOWNLOADER = f"http://{HOST}:8080"  # published by docker-compose.yml
NOTIFICATIONS = f"http://{HOST}:8070"
CARTD = f"http://{HOST}:8081"
USER = "dmlb2001"  # DOWNLOADER_NOTIFICATIONS_USER in docker-compose.yml
SERVICE_UID = 10001  # the Dockerfile's `downloader` user
WORKERS = 3
# Compose's default stop timeout, used where a service sets no stop_grace_period.
DEFAULT_GRACE = 10.0
# podman 4.3 without systemd says this on every start/stop of a container with a health check.
_NOISE = re.compile(r"unable to get systemd connection|Removing timer for container")


class CheckFailed(Exception):
    """A check does not hold; the message says what was seen."""


def log(message: str) -> None:
    """One progress line on stdout."""
    print(f"[compose] {message}", flush=True)


def wait(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.5) -> T:
    """Poll ``probe`` until it returns something truthy; CheckFailed after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = probe()
        except (requests.RequestException, subprocess.SubprocessError, OSError, ValueError) as exc:
            last = exc
        if last and not isinstance(last, Exception):
            return last
        if time.monotonic() > deadline:
            raise CheckFailed(f"{what}: not within {timeout:.0f} s (last: {str(last)[:300]})")
        time.sleep(interval)


def seconds(text: str | None) -> float:
    """A Compose duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    if not text:
        return DEFAULT_GRACE
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", str(text)):
        total += float(number) * units[unit]
    return total


@dataclass
class Sample:
    """An event posted to Notifications and the bytes its files must have on disk."""

    event: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)  # path under data/ -> sha1

    @property
    def event_id(self) -> str:
        return str(self.event["eventID"])


class Loop:
    """One Compose project of docker-compose.yml + the image override, driven by podman-compose."""

    def __init__(self, compose: list[str], project: str, files: list[Path], logfile: Path) -> None:
        self.project = project
        self.command = [*compose, "-p", project, *(arg for f in files for arg in ("-f", str(f)))]
        self.spec = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
        self.logfile = logfile
        # Above the ids the docs' sample uses (1001-1003): both are stored in one archive.
        self.next_file_id = 100_000
        self.run_tag = time.strftime("%H%M%S")
        self.samples: dict[str, Sample] = {}

    # ------------------------------------------------------------------ commands
    def _run(
        self, argv: list[str], timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        with self.logfile.open("a", encoding="utf-8") as out:
            out.write(f"$ {shlex.join(argv)}  -> {done.returncode}\n")
            for line in (done.stdout + done.stderr).splitlines():
                if not _NOISE.search(line):
                    out.write(f"  {line}\n")
        return done

    def compose(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = self._run([*self.command, *args], timeout)
        if check and done.returncode != 0:
            tail = "\n".join(line for line in done.stderr.splitlines() if not _NOISE.search(line))[-800:]
            raise CheckFailed(f"podman-compose {' '.join(args)} exited {done.returncode}: {tail}")
        return done

    def podman(
        self, *args: str, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self._run(["podman", *args], timeout, input=input)

    def containers(self, service: str | None = None, running: bool = False) -> list[dict[str, Any]]:
        """The project's containers (podman ps JSON), optionally one service's."""
        args = ["ps", "--format", "json", "--filter", f"label=io.podman.compose.project={self.project}"]
        if not running:
            args.insert(1, "-a")
        if service:
            args += ["--filter", f"label=com.docker.compose.service={service}"]
        done = self.podman(*args)
        return list(json.loads(done.stdout or "[]"))

    def container(self, service: str) -> str:
        found = self.containers(service, running=True)
        if not found:
            raise CheckFailed(f"no running container for {service}")
        return str(sorted(c["Names"][0] for c in found)[0])

    def exec(self, service: str, *argv: str, input: str | None = None, timeout: float = 120) -> str:
        args = ["exec", *(["-i"] if input is not None else []), self.container(service), *argv]
        done = self.podman(*args, input=input, timeout=timeout)
        if done.returncode != 0:
            raise CheckFailed(f"{service}: {shlex.join(argv)} exited {done.returncode}: {done.stderr[-500:]}")
        return done.stdout

    def sql(self, query: str) -> list[list[str]]:
        out = self.exec(
            "downloaderdb", "psql", "-U", "downloader", "-d", "downloader", "-tAF", "\t", "-c", query
        )
        return [line.split("\t") for line in out.splitlines() if line]

    def volume(self, name: str) -> Path:
        done = self.podman("volume", "inspect", "--format", "{{.Mountpoint}}", f"{self.project}_{name}")
        if done.returncode != 0:
            raise CheckFailed(f"volume {name}: {done.stderr.strip()}")
        return Path(done.stdout.strip())

    def stop(self, *services: str) -> dict[str, Any]:
        """`compose stop` (all or some services); each container's exit code and grace.

        podman-compose 1.6 stops only the first replica of a scaled service (it counts
        replicas from the file, not from what runs): the others are stopped as it would
        stop them, `podman stop -t <stop_grace_period>`.
        """
        running = [c for s in (services or (None,)) for c in self.containers(s, running=True)]
        names = {c["Names"][0]: c["Labels"]["com.docker.compose.service"] for c in running}
        started = time.monotonic()
        self.compose("stop", *services, timeout=900)
        grace = {n: seconds(self.spec["services"][svc].get("stop_grace_period")) for n, svc in names.items()}
        for entry in self.containers(running=True):
            name = entry["Names"][0]
            if name in names:
                self.podman("stop", "-t", f"{grace[name]:.0f}", name, timeout=grace[name] + 60)
        result: dict[str, Any] = {"took": time.monotonic() - started, "containers": {}}
        for name, service in names.items():
            state = json.loads(self.podman("inspect", name).stdout)[0]["State"]
            result["containers"][name] = {"service": service, "exit": state["ExitCode"], "grace": grace[name]}
        return result

    def down(self, *args: str) -> None:
        """`compose down`, after removing the replicas of scaled services (docs/operations.md says why).

        podman-compose 1.6 removes only the first replica of a scaled service; the others
        keep the containers they depend on, and so the network, the pod and the volumes,
        from being removed. The workaround docs/operations.md gives podman-compose users: remove the
        service's containers first (`podman rm -f -t <grace>`), then `down`.
        """
        for entry in self.containers():
            service = entry["Labels"]["com.docker.compose.service"]
            if service == "worker":
                grace = seconds(self.spec["services"][service].get("stop_grace_period"))
                self.podman("rm", "-f", "-t", f"{grace:.0f}", entry["Names"][0], timeout=grace + 60)
        self.compose("down", *args, timeout=900)

    # ------------------------------------------------------------------ bring-up
    def healthy(self, service: str) -> bool:
        """Every running container of ``service`` passes its health check (or has none)."""
        found = self.containers(service, running=True)
        if not found:
            return False
        for entry in found:
            done = self.podman("healthcheck", "run", entry["Names"][0], timeout=60)
            if done.returncode != 0 and "has no defined healthcheck" not in done.stderr:
                return False
        return True

    def up(self, scale: int = WORKERS) -> float:
        """Start every service in depends_on order, as Compose would; the seconds it took."""
        started = time.monotonic()
        services: dict[str, Any] = self.spec["services"]
        pending = {name for name, spec in services.items() if spec.get("restart") != "no"}
        ready: set[str] = set()
        while pending:
            wave = sorted(name for name in pending if set(services[name].get("depends_on") or {}) <= ready)
            if not wave:
                raise CheckFailed(f"depends_on cannot be satisfied for {sorted(pending)}")
            scaled = ["--scale", f"worker={scale}"] if "worker" in wave else []
            self.compose("up", "-d", "--no-build", *scaled, *wave, timeout=600)
            for name in wave:
                wait(f"{name} healthy", lambda name=name: self.healthy(name), 240, 1.0)
                ready.add(name)
            pending -= set(wave)
            log(f"up: {', '.join(wave)} ({time.monotonic() - started:.0f} s)")
        # The one-shot `subscribe` (restart: "no") runs to its end, as `docker compose up` does.
        self.compose("up", "-d", "--no-build", "subscribe")
        name = self.containers("subscribe")[0]["Names"][0]
        code = self.podman("wait", name, timeout=330).stdout.strip()
        if code != "0":
            raise CheckFailed(f"subscribe exited {code}: {self.podman('logs', name).stderr[-500:]}")
        return time.monotonic() - started

    # ------------------------------------------------------------------ the archive and events
    def store(self, data_spec: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
        """Store files of pseudo-random bytes in the archive; their Files metadata objects.

        Each spec is (subdir, name, size). The bytes are made and hashed inside the archive
        interface's container (a large file never crosses this process).
        """
        objs = []
        for subdir, name, size in data_spec:
            self.next_file_id += 1
            file_id = self.next_file_id
            script = (
                "import hashlib, http.client, sys, random\n"
                "fid, size = int(sys.argv[1]), int(sys.argv[2])\n"
                "rng = random.Random(fid)\n"
                "h = hashlib.sha1()\n"
                "def chunks():\n"
                "    left = size\n"
                "    while left:\n"
                "        block = rng.randbytes(min(left, 1 << 20))\n"
                "        h.update(block); left -= len(block)\n"
                "        yield block\n"
                "c = http.client.HTTPConnection('127.0.0.1', 8080, timeout=600)\n"
                "c.request('PUT', f'/{fid}', body=chunks(), headers={'Content-Length': str(size),\n"
                "          'Last-Modified': 'Sun, 06 Nov 1994 08:49:37 GMT'})\n"
                "r = c.getresponse(); r.read()\n"
                "assert r.status in (200, 201), r.status\n"
                "print(h.hexdigest())\n"
            )
            digest = self.exec(
                "archiveinterface", "python3", "-c", script, str(file_id), str(size), timeout=900
            )
            objs.append(
                {
                    "_id": file_id,
                    "destinationTable": "Files",
                    "name": name,
                    "subdir": subdir,
                    "hashtype": "sha1",
                    "hashsum": digest.strip(),
                    "size": size,
                    "mimetype": "application/octet-stream",
                }
            )
        return objs

    def sample(self, label: str, data_spec: list[tuple[str, str, int]]) -> Sample:
        objs = self.store(data_spec)
        event_id = f"loop-{self.run_tag}-{label}"
        event = {
            "cloudEventsVersion": "0.1",
            "eventID": event_id,
            "eventType": "org.pacifica.metadata.ingest",
            "source": "/pacifica/metadata/ingest",
            "eventTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "contentType": "application/json",
            "extensions": {},
            "data": [
                {"destinationTable": "Transactions._id", "value": 1234},
                {"destinationTable": "Transactions.submitter", "value": 10},
                {"destinationTable": "TransactionKeyValue", "key": "loop", "value": label},
                *objs,
            ],
        }
        sample = Sample(event, {f"{o['subdir']}/{o['name']}".lstrip("/"): o["hashsum"] for o in objs})
        self.samples[event_id] = sample
        return sample

    def send(self, sample: Sample) -> None:
        """POST /receive, as Pacifica's metadata service announces an ingest."""
        answer = requests.post(f"{NOTIFICATIONS}/receive", json=sample.event, timeout=30)
        if answer.status_code != 200:
            raise CheckFailed(f"Notifications /receive answered {answer.status_code}: {answer.text[:300]}")

    # ------------------------------------------------------------------ the job store
    def jobs(self) -> dict[str, list[dict[str, Any]]]:
        """The job store's jobs by event id (through the CLI inside the intake's container)."""
        out = self.exec("downloader", "downloader-service", "jobs", "list", "--json", "--limit", "100000")
        by_event: dict[str, list[dict[str, Any]]] = {}
        for line in out.splitlines():
            job = json.loads(line)
            by_event.setdefault(job["event_id"], []).append(job)
        return by_event

    def done(self, samples: list[Sample]) -> dict[str, dict[str, Any]] | None:
        jobs = self.jobs()
        found = {s.event_id: jobs.get(s.event_id, []) for s in samples}
        failed = [j for js in found.values() for j in js if j["state"] in ("failed", "rejected")]
        if failed:
            raise CheckFailed(f"jobs ended {failed[0]['state']}: {json.dumps(failed[0])[:400]}")
        if all(len(js) == 1 and js[0]["state"] == "done" for js in found.values()):
            return {eid: js[0] for eid, js in found.items()}
        return None

    def subscription(self) -> dict[str, Any]:
        answer = requests.get(f"{NOTIFICATIONS}/eventmatch", headers={"Http-Remote-User": USER}, timeout=10)
        subs = [s for s in answer.json() if s["target_url"] == "http://downloader:8080/"]
        if len(subs) != 1:
            raise CheckFailed(f"expected one subscription for the downloader, found {len(subs)}")
        return dict(subs[0])

    def verify_on_disk(self, jobs: dict[str, dict[str, Any]]) -> str:
        """Every sample's files in the downloads volume with the right sha1, owned by 10001."""
        root = self.volume("downloads")
        count = 0
        for event_id, job in jobs.items():
            # download_path is the container's (/data/...); the volume is /data.
            where = root / Path(job["download_path"]).relative_to("/data")
            for name in ("notification.json", "metadata.json"):
                if not (where / name).is_file():
                    raise CheckFailed(f"{event_id}: no {name} in {where}")
            # The event as the service validated it: CloudEvents 1.0 attribute names.
            if json.loads((where / "notification.json").read_text()).get("id") != event_id:
                raise CheckFailed(f"{event_id}: notification.json is another event")
            for rel, digest in self.samples[event_id].files.items():
                path = where / "data" / rel
                with path.open("rb") as handle:
                    got = hashlib.file_digest(handle, "sha1").hexdigest()
                if got != digest:
                    raise CheckFailed(f"{event_id}: {rel} has sha1 {got}, want {digest}")
                for part in (path, where, where / "notification.json"):
                    if part.stat().st_uid != SERVICE_UID:
                        raise CheckFailed(f"{part} is owned by uid {part.stat().st_uid}, want {SERVICE_UID}")
                count += 1
        return f"{count} files in {len(jobs)} events, sha1 checked, uid {SERVICE_UID}"


# ---------------------------------------------------------------------- the checks
def shell(what: str, script: str) -> subprocess.CompletedProcess[str]:
    """Run documented shell commands as a user would paste them (bash, errexit, pipefail)."""
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode != 0:
        raise CheckFailed(f"{what} exited {done.returncode}: {done.stderr[-600:]}")
    return done


def doc_blocks(after: str, count: int) -> list[str]:
    """The first ``count`` ```sh blocks of docs/operations.md after the line containing ``after``."""
    text = (REPO / "docs" / "operations.md").read_text(encoding="utf-8")
    start = text.index(after)
    return re.findall(r"```sh\n(.*?)```", text[start:], re.S)[:count]


def check_docs_example(loop: Loop) -> str:
    """The docs' "Post a test event" commands (docs/operations.md), as written, with this compose command."""
    store, send = doc_blocks("**Post a test event.**", 2)
    script = (store + send).replace("docker compose", shlex.join(loop.command))
    shell("the docs' commands", script)
    event = json.loads((REPO / "examples" / "notifications-event-0.1.json").read_text(encoding="utf-8"))
    files = [o for o in event["data"] if o.get("destinationTable") == "Files"]
    sample = Sample(event, {f"{o['subdir']}/{o['name']}".lstrip("/"): o["hashsum"] for o in files})
    loop.samples[sample.event_id] = sample
    jobs = wait("the docs' sample event downloaded", lambda: loop.done([sample]), 180, 1.0)
    return "the docs' commands ran as written; " + loop.verify_on_disk(jobs)


def check_verified(loop: Loop) -> str:
    """4 events of 3 files (nested, spaces, non-ASCII) land verified, with their JSON."""
    samples = [
        loop.sample(
            f"verified-{n}",
            [
                ("raw/run 1", "a.bin", 1024 * (n + 1)),
                (f"raw/run 1/deep/{n}", "b.dat", 65536 + n),
                ("", f"résumé-{n}.txt", 10 + n),
            ],
        )
        for n in range(4)
    ]
    for sample in samples:
        loop.send(sample)
    jobs = wait("4 events downloaded", lambda: loop.done(samples), 180, 1.0)
    return loop.verify_on_disk(jobs)


def check_scale(loop: Loop) -> str:
    """18 events over 3 worker containers: each does some, no event twice."""
    samples = [
        loop.sample(f"scale-{n:02d}", [(f"s{n}", "x.bin", 200_000), (f"s{n}", "y.bin", 1000)])
        for n in range(18)
    ]
    for sample in samples:
        loop.send(sample)
    jobs = wait("18 events downloaded", lambda: loop.done(samples), 300, 1.0)
    loop.verify_on_disk(jobs)
    hosts: dict[str, int] = {}
    for job in jobs.values():
        hosts[job["host"]] = hosts.get(job["host"], 0) + 1
    workers = {c["Id"][:12]: c["Names"][0] for c in loop.containers("worker", running=True)}
    shares = {workers.get(host, host): count for host, count in sorted(hosts.items())}
    if len(hosts) < WORKERS or not set(hosts) <= set(workers):
        raise CheckFailed(f"jobs by host {shares}; workers {sorted(workers.values())}")
    dirs = [d for d in loop.volume("downloads").iterdir() if "scale-" in d.name]
    if len(dirs) != len(samples):
        raise CheckFailed(f"{len(dirs)} download directories for {len(samples)} events")
    return "18 events: " + ", ".join(f"{name} {count}" for name, count in shares.items()) + "; none twice"


def check_worker_killed(loop: Loop) -> str:
    """SIGKILL the worker transferring a 768 MiB file; the job still ends done, once."""
    size = 768 * 1024 * 1024
    sample = loop.sample("killed", [("big", "large.bin", size)])
    root = loop.volume("downloads")
    loop.send(sample)

    def transferring() -> tuple[str, int] | None:
        rows = loop.sql(
            # Our own event id (letters, digits, dashes), not input from anywhere else.
            f"SELECT lease_owner FROM jobs WHERE event_id = '{sample.event_id}' AND state = 'running'"  # noqa: S608
        )
        owner = rows[0][0] if rows and rows[0][0] else None
        if not owner:
            return None
        written = sum(p.stat().st_size for p in root.glob(".attempt-*/**/*") if p.is_file())
        return (owner, written) if written > 0 else None

    owner, written = wait("the big file transferring", transferring, 300, 0.02)
    host = owner.split(":")[0]
    victims = [c for c in loop.containers("worker", running=True) if c["Id"].startswith(host)]
    if not victims:
        raise CheckFailed(f"the lease owner {owner} is no running worker container")
    victim = victims[0]["Names"][0]
    killed_at = time.monotonic()
    loop.podman("kill", "--signal", "KILL", victim)
    jobs = wait("the job finished by another worker", lambda: loop.done([sample]), 400, 1.0)
    took = time.monotonic() - killed_at
    job = jobs[sample.event_id]
    loop.verify_on_disk(jobs)
    finisher = job["host"]
    rows = loop.sql(f"SELECT attempts FROM jobs WHERE event_id = '{sample.event_id}'")  # noqa: S608
    dirs = [d for d in root.iterdir() if "killed" in d.name]
    leftovers = [d.name for d in root.iterdir() if d.name.startswith(".attempt-")]
    if len(dirs) != 1 or leftovers:
        raise CheckFailed(f"download directories {dirs}, attempt leftovers {leftovers}")
    who = "the killed container's next life" if finisher == host else f"another container ({finisher})"
    return (
        f"{victim} SIGKILLed with {written / 2**20:.0f} of {size / 2**20:.0f} MiB written; "
        f"finished by {who} {took:.0f} s later, attempts {rows[0][0]}, one directory, no leftovers"
    )


def check_restart(loop: Loop) -> str:
    """Stop the intake while events arrive; the guard re-enables, the runbook replays."""
    before = [loop.sample(f"restart-before-{n}", [("r", f"b{n}.bin", 4096)]) for n in range(3)]
    missed = [loop.sample(f"restart-missed-{n}", [("r", f"m{n}.bin", 4096)]) for n in range(5)]
    for sample in before:
        loop.send(sample)
    wait("the first events done", lambda: loop.done(before), 120, 1.0)
    stopped = time.monotonic()
    loop.compose("stop", "downloader")
    for sample in missed:
        loop.send(sample)
        time.sleep(0.2)
    disabled = wait("the subscription disabled", lambda: loop.subscription()["disabled"], 60, 0.5)
    loop.compose("start", "downloader")
    wait("downloader healthy", lambda: loop.healthy("downloader"), 120, 0.5)
    wait("the subscription enabled again", lambda: not loop.subscription()["disabled"], 120, 0.5)
    down_for = time.monotonic() - stopped

    def closed_gaps() -> list[dict[str, Any]]:
        status = json.loads(loop.exec("downloader", "downloader-service", "subscription", "status"))
        return [g for g in status["gaps"] if g.get("window", {}).get("end") and g.get("replay")]

    gap = wait("the gap recorded, with its replay command", closed_gaps, 60, 0.5)[0]
    command = str(gap["replay"])
    # The documented runbook (docs/operations.md: "The replay runbook"), this compose command for
    # `docker compose`.
    compose = shlex.join(loop.command)
    if command.startswith("docker compose "):
        runbook = command.replace("docker compose", compose)
    else:
        eventget, importer = command.split(" | ")
        runbook = f"{compose} exec -T notifications {eventget} | {compose} exec -T downloader {importer}"
    done = shell("the replay", runbook)
    jobs = wait("every event done after the replay", lambda: loop.done(before + missed), 240, 1.0)
    loop.verify_on_disk(jobs)
    return (
        f"down {down_for:.0f} s, {len(missed)} events meanwhile, subscription disabled at {disabled} and "
        f"enabled again; replay: {done.stdout.strip()}; all {len(jobs)} done once"
    )


def check_down_up(loop: Loop, up_seconds: list[float], stops: dict[str, Any]) -> str:
    """`down` keeping volumes, then `up`: done jobs and files kept, queued jobs finish."""
    root = loop.volume("downloads")
    earlier = loop.jobs()
    stops["workers"] = loop.stop("worker")["containers"]
    queued = [loop.sample(f"queued-{n}", [("q", f"q{n}.bin", 8192)]) for n in range(4)]
    for sample in queued:
        loop.send(sample)
    wait(
        "4 events queued",
        lambda: all(loop.jobs().get(s.event_id, [{}])[0].get("state") == "queued" for s in queued),
        120,
        1.0,
    )
    workers_stopped = stops.pop("workers", {})
    stops.update(stop_all(loop))
    stops["containers"].update(workers_stopped)
    loop.down()
    if loop.containers():
        raise CheckFailed("containers left after down")
    up_seconds.append(loop.up())
    after = loop.jobs()
    lost = [
        eid for eid, js in earlier.items() if eid not in after or after[eid][0]["state"] != js[0]["state"]
    ]
    if lost:
        raise CheckFailed(f"jobs changed or lost across down/up: {lost[:5]}")
    jobs = wait("the queued jobs done after up", lambda: loop.done(queued), 180, 1.0)
    loop.verify_on_disk(jobs)
    kept = {eid: js[0] for eid, js in earlier.items() if js[0]["state"] == "done"}
    loop.verify_on_disk(kept)
    if not root.exists():
        raise CheckFailed("the downloads volume is gone")
    return (
        f"{len(kept)} done jobs and their files kept (sha1 checked again), "
        f"{len(queued)} queued before down finished after up"
    )


def stop_all(loop: Loop) -> dict[str, Any]:
    """Stop every service; each container's exit code and the grace it had."""
    return loop.stop()


def check_stop_grace(stops: dict[str, Any]) -> str:
    """No container was SIGKILLed at the end of its stop grace period."""
    if not stops:
        raise CheckFailed("nothing was stopped (the down/up check did not get that far)")
    killed = {n: c for n, c in stops["containers"].items() if c["exit"] in (137, -9)}
    if killed:
        raise CheckFailed(
            "SIGKILLed at the end of their grace period: "
            + ", ".join(f"{n} ({c['grace']:.0f} s)" for n, c in sorted(killed.items()))
        )
    codes = sorted({c["exit"] for c in stops["containers"].values()})
    count, took = len(stops["containers"]), stops["took"]
    return f"{count} containers stopped in {took:.0f} s, exit codes {codes}, none killed"


def leftovers(loop: Loop, volumes_before: set[str]) -> list[str]:
    """The project's containers, networks and pods, and volumes made since the start."""
    label = f"label=io.podman.compose.project={loop.project}"
    found = [f"container {c['Names'][0]}" for c in loop.containers()]
    vols = set(loop.podman("volume", "ls", "-q").stdout.split())
    found += [f"volume {v}" for v in sorted(vols - volumes_before)]
    nets = loop.podman("network", "ls", "--format", "{{.Name}}", "--filter", label).stdout.split()
    found += [f"network {n}" for n in nets]
    pods = loop.podman(
        "pod", "ls", "--format", "{{.Name}}", "--filter", f"name={loop.project}"
    ).stdout.split()
    found += [f"pod {p}" for p in pods]
    return found


def check_down_v(loop: Loop, volumes_before: set[str]) -> str:
    """`down -v` leaves nothing of the project behind."""
    started = time.monotonic()
    loop.down("-v")
    left = leftovers(loop, volumes_before)
    if left:
        raise CheckFailed("left behind: " + ", ".join(left))
    return f"nothing left ({time.monotonic() - started:.0f} s)"


def clean(loop: Loop, volumes_before: set[str]) -> None:
    """Take everything of the project away, whatever state it is in."""
    loop.compose("down", "--remove-orphans", "-v", "-t", "5", timeout=900, check=False)
    for name in [c["Names"][0] for c in loop.containers()]:
        loop.podman("rm", "-f", "-v", name)
    vols = set(loop.podman("volume", "ls", "-q").stdout.split())
    for volume in vols - volumes_before:
        if volume.startswith(loop.project) or len(volume) == 64:
            loop.podman("volume", "rm", "-f", volume)
    loop.podman("network", "rm", "-f", f"{loop.project}_default")


def main() -> int:
    """Bring the loop up, run the checks, print the table; 0 when every check holds."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--override", type=Path, required=True, help="the file scripts/compose-images wrote")
    parser.add_argument("--compose", default=str(REPO / ".venv" / "bin" / "podman-compose"))
    parser.add_argument("--project", default="dlloop")
    parser.add_argument("--log", type=Path, required=True, help="every podman/compose command and its output")
    args = parser.parse_args()
    args.log.write_text("")
    loop = Loop([args.compose], args.project, [REPO / "docker-compose.yml", args.override], args.log)
    clean(loop, set())  # an earlier run's leftovers
    volumes_before = set(loop.podman("volume", "ls", "-q").stdout.split())
    results: list[tuple[str, bool, str]] = []
    up_seconds: list[float] = []
    stops: dict[str, Any] = {}

    def check(name: str, run: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail, ok = run(), True
        except CheckFailed as exc:
            detail, ok = str(exc), False
        except Exception as exc:  # noqa: BLE001  # a check that breaks does not hold; the log says why
            detail, ok = f"{type(exc).__name__}: {exc}", False
            with args.log.open("a", encoding="utf-8") as out:
                out.write(traceback.format_exc())
        results.append((name, ok, detail))
        print(
            f"check: {name}: {'ok' if ok else 'FAILED'} ({time.monotonic() - started:.0f} s) — {detail}",
            flush=True,
        )

    try:
        try:
            up_seconds.append(loop.up())
            log(f"the loop is up in {up_seconds[0]:.0f} s with {WORKERS} workers")
            up_ok = True
        except CheckFailed as exc:
            print(f"check: up: FAILED — {exc}", flush=True)
            results.append(("up", False, str(exc)))
            up_ok = False
        if up_ok:
            check("docs example", lambda: check_docs_example(loop))
            check("verified", lambda: check_verified(loop))
            check("scale", lambda: check_scale(loop))
            check("worker killed", lambda: check_worker_killed(loop))
            check("restart", lambda: check_restart(loop))
            check("down/up", lambda: check_down_up(loop, up_seconds, stops))
            check("stop grace", lambda: check_stop_grace(stops))
        check("down -v", lambda: check_down_v(loop, volumes_before))
    finally:
        if any(not ok for _, ok, _ in results):
            for line in Path(args.log).read_text(errors="replace").splitlines()[-60:]:
                print(f"  | {line}", file=sys.stderr)
        clean(loop, volumes_before)
    held = sum(ok for _, ok, _ in results)
    up = f"{up_seconds[0]:.0f}" if up_seconds else "-"
    print(f"compose: {held}/{len(results)} checks hold, up in {up} s", flush=True)
    return 0 if held == len(results) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
