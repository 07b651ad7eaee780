"""Nothing accepted is lost, with the real sender: Notifications → our served service → Cartd.

Every scenario subscribes the served ``downloader-service serve`` to the real
pacifica-notifications 0.5.2 (a rule of its own, so no other test's events reach it), has
Notifications post events whose files are stored in the real archive, waits (bounded) until
the service's ``/jobs`` say every valid event is done, and then checks what docs/design.md's "Nothing
accepted is lost" promises: every valid event's files on disk and verified, in exactly one
``event-*`` directory, nothing else under the download root (no ``.part-*`` staging, no
directory of a failed or killed attempt), and a subscription that is still enabled with a 2xx
answer on every delivery (Notifications disables a subscription on any non-2xx answer).

Each scenario runs on both job-store engines and leaves one row (events sent, downloaded,
lost, duplicated directories, subscription disabled?) on stdout, and as a JSON line in the
file named by ``$DELIVERY_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.notifications import NotificationsStack, ingest_jsonpath
from devstack.pacifica import PacificaStack, _tail
from devstack.postgres import PostgresServer
from tests.conftest import served
from tests.events import file_obj, make_event

pytestmark = pytest.mark.integration

ENGINES = ["sqlite", "postgresql"]
#: How long Cartd stays down in the Cartd-outage scenario.
CARTD_DOWN_SECONDS = float(os.environ.get("CARTD_DOWN_SECONDS", "30"))
#: The longest wait for every event to be done once nothing holds them back any more.
SETTLE_SECONDS = float(os.environ.get("DELIVERY_SETTLE_SECONDS", "120"))
FILENAME = "data"  # DOWNLOADER_FILENAME's default: the files are in <download_path>/data/
SERVICE_LOG_LINES = 40
#: What the service may write beside the files in a download directory (the event as received,
#: and the transaction's metadata: Pacifica Notifications' consumer convention).
SIDECARS = ("notification.json", "metadata.json")

ROWS: list[dict[str, Any]] = []
BASE_COLUMNS = (
    "scenario",
    "engine",
    "mode",
    "sent",
    "valid",
    "downloaded",
    "lost",
    "duplicated_dirs",
    "rejected",
    "subscription_disabled",
    "non_2xx_deliveries",
    "retried",
    "seconds",
)
#: The burst runs sync on SQLite and async on PostgreSQL; DELIVERY_FULL_MATRIX=1 runs both
#: modes on both engines (about 45 s more).
BURSTS = (
    [(engine, mode) for engine in ENGINES for mode in ("sync", "async")]
    if os.environ.get("DELIVERY_FULL_MATRIX", "") not in ("", "0")
    else [("sqlite", "sync"), ("postgresql", "async")]
)


# --------------------------------------------------------------------------- the events
@dataclass
class Sent:
    """One event as sent, and the bytes each of its files must have on disk."""

    event: dict[str, Any]
    contents: dict[str, bytes] = field(default_factory=dict)  # path under data/ -> bytes
    valid: bool = True

    @property
    def event_id(self) -> str:
        return str(self.event["eventID"])


class Delivery:
    """One scenario on one engine: its service's settings, subscription, events and checks."""

    def __init__(
        self,
        scenario: str,
        engine: str,
        mode: str,
        tmp_path: Path,
        postgres: PostgresServer,
        cartd: PacificaStack,
        notifications: NotificationsStack,
        file_ids: Iterator[int],
        **env: str,
    ) -> None:
        self.scenario, self.engine, self.mode = scenario, engine, mode
        self.cartd, self.notifications, self.file_ids = cartd, notifications, file_ids
        # Short ids of safe characters: directory names keep them whole (and one prefix per event).
        self.case = f"{scenario[:8]}-{engine[:2]}-{mode[:2]}-{uuid.uuid4().hex[:8]}"
        self.root = tmp_path / "downloads"
        self.state = tmp_path / "state"
        self.logs: list[Path] = []
        self.log_dir = tmp_path
        self.env = {
            "DOWNLOADER_ROOT": str(self.root),
            "DOWNLOADER_STATE_DIR": str(self.state),
            "CARTD_URL": cartd.cartd_url,
            "DOWNLOADER_HOST": "127.0.0.1",
            "DOWNLOADER_RETRY_BASE": "0.5",
            "DOWNLOADER_RETRY_MAX_DELAY": "3",
            "DOWNLOADER_LEASE_SECONDS": "5",
            # Cartd 0.7.0 on SQLite leaves a cart "staging" for ever now and then under a burst
            # ("database is locked" in its worker, shared/PACIFICA.md): the service retries such
            # a cart on a fresh one after this timeout (120 s by default, longer than our wait).
            "DOWNLOADER_CART_TIMEOUT": "8",
            "DOWNLOADER_LOG_LEVEL": "WARNING",
            "DOWNLOADER_ASYNC": "true" if mode == "async" else "false",
            **env,
        }
        if engine == "postgresql":
            name = f"delivery_{scenario[:10]}_{uuid.uuid4().hex[:10]}".replace("-", "_")
            self.env["DOWNLOADER_DATABASE_URL"] = postgres.create_database(name)
        else:
            self.env["DOWNLOADER_DATABASE_URL"] = ""  # never one from the caller's environment
        self.sent: list[Sent] = []
        self.subscription = ""
        self.started = time.monotonic()

    # ------------------------------------------------------------------ the service
    def serve(self, port: int | None = None) -> Any:
        log = self.log_dir / f"service-{len(self.logs)}.log"
        self.logs.append(log)
        return served(self.env, log, port=port)

    def subscribe(self, url: str) -> str:
        self.subscription = self.notifications.subscribe(
            f"downloader {self.case}", ingest_jsonpath(testCase=self.case), url + "/"
        )
        return self.subscription

    def log_tail(self) -> str:
        """The service's own log lines (not CherryPy's access lines), and Notifications' worker."""
        parts = []
        for log in self.logs:
            lines = [
                line
                for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
                if '"logger": "cherrypy.access' not in line
            ]
            parts.append(f"--- {log.name} ---\n" + "\n".join(lines[-SERVICE_LOG_LINES:]))
        worker = self.notifications.logs.get("worker")
        if worker is not None:
            parts.append(f"--- notifications worker ---\n{_tail(worker, 15)}")
        return "\n".join(parts)

    # -------------------------------------------------------------------- events
    def _event(self, files: list[dict[str, Any]]) -> dict[str, Any]:
        event = make_event(files, event_id=f"{self.case}-{len(self.sent):03d}")
        event["extensions"] = {"testCase": self.case}
        return event

    def _stored(self, name: str, subdir: str) -> tuple[dict[str, Any], bytes]:
        """A few KB of random bytes stored in the archive under a fresh id, and its Files object."""
        data = os.urandom(1024 + int.from_bytes(os.urandom(2), "big") % 3072)
        file_id = next(self.file_ids)
        self.cartd.put_file(file_id, data)
        return file_obj(file_id, name, subdir, data), data

    def good(self, files: int = 2) -> Sent:
        """A valid event with ``files`` files stored in the archive (sha1 hashsums)."""
        objs, contents = [], {}
        for number in range(files):
            subdir = f"run/{len(self.sent)}/{number}"
            obj, data = self._stored(f"f{number}.bin", subdir)
            objs.append(obj)
            contents[f"{subdir}/f{number}.bin"] = data
        sent = Sent(self._event(objs), contents)
        self.sent.append(sent)
        return sent

    def bad(self) -> Sent:
        """An event with a Files object without ``_id`` (beside a valid one): never downloadable."""
        obj, _data = self._stored("ok.bin", "bad")
        missing = file_obj(0, "no-id.bin", "bad", b"x")
        del missing["_id"]
        sent = Sent(self._event([obj, missing]), valid=False)
        self.sent.append(sent)
        return sent

    def send(self, events: list[Sent], parallel: int = 8) -> None:
        """Post the events to Notifications' ``/receive``, ``parallel`` at once."""
        with ThreadPoolExecutor(parallel) as pool:
            list(pool.map(lambda sent: self.notifications.send(sent.event), events))

    # ------------------------------------------------------------------ observing
    def jobs(self, url: str) -> list[dict[str, Any]]:
        """Every job of the service, all pages of ``GET /jobs``."""
        found: list[dict[str, Any]] = []
        page: str | None = f"{url}/jobs?limit=500"
        while page:
            resp = requests.get(page, timeout=10)
            assert resp.status_code == 200, f"GET {page}: {resp.status_code} {resp.text[:500]}"
            doc = resp.json()
            found += doc["jobs"]
            page = doc["next"]
        return found

    def jobs_by_event(self, url: str) -> dict[str, list[dict[str, Any]]]:
        by_event: dict[str, list[dict[str, Any]]] = {}
        for job in self.jobs(url):
            by_event.setdefault(job["event_id"], []).append(job)
        return by_event

    def deliveries(self) -> dict[str, list[int | None]]:
        """Target status of every delivery to our subscription, by event id."""
        statuses: dict[str, list[int | None]] = {}
        for event_id, status, subscription in self.notifications.delivery_rows():
            if subscription == self.subscription and event_id is not None:
                statuses.setdefault(event_id, []).append(status)
        return statuses

    def disabled(self) -> Any:
        return self.notifications.subscription(self.subscription)["disabled"]

    def wait(self, what: str, check: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
        """Poll ``check`` until true or ``timeout``; False (and a note on stdout) when it timed out."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                print(f"[{self.case}] gave up after {timeout:.0f} s waiting for {what}")
                return False
            time.sleep(interval)
        return True

    def settled(self, url: str) -> bool:
        """Every sent event answered and at an end, or stuck where waiting cannot help."""
        statuses = self.deliveries()
        if any(x is not None and not 200 <= x < 300 for s in statuses.values() for x in s) or self.disabled():
            return True  # a non-2xx answer or a connection error: the subscription is cut off
        if any(None in statuses.get(sent.event_id, [None]) for sent in self.sent):
            return False  # not delivered (or not answered) yet
        jobs = self.jobs_by_event(url)
        for sent in self.sent:
            states = {job["state"] for job in jobs.get(sent.event_id, [])}
            if sent.valid and not states & {"done", "failed"}:
                return False
            if not sent.valid and not states:
                return False
        return True

    def settle(self, url: str, timeout: float = SETTLE_SECONDS) -> bool:
        return self.wait("every event delivered and at an end", lambda: self.settled(url), timeout)

    # -------------------------------------------------------------------- verdict
    def verdict(self, url: str, **extra: Any) -> None:
        """Collect what happened, emit the row, then fail with every problem found."""
        problems: list[str] = []
        jobs = self.jobs_by_event(url)
        statuses = self.deliveries()
        disabled = self.disabled()
        root_entries = sorted(self.root.iterdir()) if self.root.exists() else []
        event_dirs = {os.path.realpath(p) for p in root_entries if p.name.startswith("event-")}
        done_jobs = [job for js in jobs.values() for job in js if job["state"] == "done"]
        done_paths = {os.path.realpath(job["download_path"]) for job in done_jobs}

        downloaded = duplicated = rejected = 0
        for sent in self.sent:
            eid = sent.event_id
            mine = jobs.get(eid, [])
            dirs = sorted(p.name for p in root_entries if p.name.startswith(f"event-{eid}-"))
            duplicated += max(0, len(dirs) - 1)
            if len(dirs) > 1:
                problems.append(f"{eid}: {len(dirs)} directories: {dirs}")
            if len(mine) != 1:
                problems.append(f"{eid}: {len(mine)} jobs: {[(j['job_id'], j['state']) for j in mine]}")
            if not sent.valid:
                if [j["state"] for j in mine] == ["rejected"]:
                    rejected += 1
                    if mine[0].get("error") != "invalid_event":
                        problems.append(f"{eid}: rejected as {mine[0].get('error')!r}, not invalid_event")
                else:
                    problems.append(f"{eid}: the bad event's jobs are {[j['state'] for j in mine]}")
                if dirs:
                    problems.append(f"{eid}: the rejected event has directories {dirs}")
                continue
            done = [j for j in mine if j["state"] == "done"]
            if not done:
                states = [(j["state"], j.get("error") or j.get("last_error")) for j in mine]
                problems.append(f"{eid}: not done: {states}")
                continue
            path = Path(done[0]["download_path"])
            data_dir = path / FILENAME
            on_disk = (
                {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if not p.is_dir()}
                if data_dir.is_dir()
                else set()
            )
            if on_disk != set(sent.contents):
                problems.append(f"{eid}: files on disk {sorted(on_disk)} != sent {sorted(sent.contents)}")
                continue
            wrong = [rel for rel, data in sent.contents.items() if (data_dir / rel).read_bytes() != data]
            if wrong:
                problems.append(f"{eid}: files differ from what was stored: {wrong}")
                continue
            unexpected = sorted({p.name for p in path.iterdir()} - {FILENAME, *SIDECARS})
            if unexpected:
                problems.append(f"{eid}: {path} holds more than the files and their sidecars: {unexpected}")
                continue
            downloaded += 1

        if event_dirs != done_paths:
            problems.append(
                f"event-* directories without a done job: {sorted(event_dirs - done_paths)}; "
                f"done jobs without their directory: {sorted(done_paths - event_dirs)}"
            )
        others = [p.name for p in root_entries if not p.name.startswith("event-")]
        if others:
            problems.append(f"other entries in the download root: {others}")
        staging = [str(p) for p in self.root.rglob("*") if ".part-" in p.name] if self.root.exists() else []
        if staging:
            problems.append(f"staging leftovers (.part-*): {staging}")
        ours = {sent.event_id for sent in self.sent}
        strangers = sorted(set(jobs) - ours)
        if strangers:
            problems.append(f"jobs for events nobody sent here: {strangers}")
        non_2xx = {eid: s for eid, s in statuses.items() if any(x is None or not 200 <= x < 300 for x in s)}
        if non_2xx:
            problems.append(f"deliveries without a 2xx answer: {non_2xx}")
        for sent in self.sent:
            count = len(statuses.get(sent.event_id, []))
            if count != 1:
                problems.append(f"{sent.event_id}: delivered {count} times by Notifications")
        if disabled:
            sub = self.notifications.subscription(self.subscription)
            problems.append(f"the subscription was disabled at {disabled}: {sub.get('error')!r}")

        valid = sum(sent.valid for sent in self.sent)
        row = {
            "scenario": self.scenario,
            "engine": self.engine,
            "mode": self.mode,
            "sent": len(self.sent),
            "valid": valid,
            "downloaded": downloaded,
            "lost": valid - downloaded,
            "duplicated_dirs": duplicated,
            "rejected": rejected,
            "subscription_disabled": bool(disabled),
            "non_2xx_deliveries": len(non_2xx),
            "retried": sum(job["attempts"] > 1 for js in jobs.values() for job in js),
            "seconds": round(time.monotonic() - self.started, 1),
            # What Notifications recorded as our answers: {"200": 38, "202": 2}.
            "answers": dict(sorted(Counter(str(x) for s in statuses.values() for x in s).items())),
            **extra,
        }
        emit(row)
        assert not problems, (
            f"[{self.case}] {len(problems)} problem(s):\n  "
            + "\n  ".join(problems[:30])
            + f"\n{self.log_tail()}"
        )


def emit(row: dict[str, Any]) -> None:
    ROWS.append(row)
    print(
        "\nDELIVERY {scenario:<12} {engine:<10} {mode:<5} sent={sent:<3} downloaded={downloaded:<3} "
        "lost={lost:<2} duplicated_dirs={duplicated_dirs:<2} rejected={rejected} retried={retried} "
        "subscription_disabled={subscription_disabled} ({seconds} s)".format(**row)
        + "".join(f" {key}={value}" for key, value in row.items() if key not in BASE_COLUMNS)
    )
    report = os.environ.get("DELIVERY_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as out:
            out.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module", autouse=True)
def _table() -> Iterator[None]:
    """The whole table once the module is done (run with ``-s`` to see it)."""
    yield
    if ROWS:
        print(
            "\n| scenario | engine | mode | sent | downloaded | lost | duplicated dirs "
            "| subscription disabled | retried | seconds |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in ROWS:
            print(
                "| {scenario} | {engine} | {mode} | {sent} | {downloaded} | {lost} | {duplicated_dirs} "
                "| {subscription_disabled} | {retried} | {seconds} |".format(**row)
            )


@pytest.fixture
def delivery(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    postgres: PostgresServer,
    pacifica_stack: PacificaStack,
    notifications_stack: NotificationsStack,
    file_ids: Iterator[int],
) -> Callable[..., Delivery]:
    def make(scenario: str, engine: str, mode: str, **env: str) -> Delivery:
        return Delivery(
            scenario, engine, mode, tmp_path, postgres, pacifica_stack, notifications_stack, file_ids, **env
        )

    return make


# ------------------------------------------------------------------------- scenarios
@pytest.mark.parametrize(("engine", "mode"), BURSTS)
def test_burst_of_40_events_is_downloaded_once_each(
    delivery: Callable[..., Delivery], engine: str, mode: str
) -> None:
    run = delivery("burst", engine, mode)
    events = [run.good(files=1 + n % 2) for n in range(40)]
    with run.serve() as (url, _proc):
        run.subscribe(url)
        run.send(events)  # Notifications' worker posts them at concurrency 8
        run.settle(url)
        run.verdict(url)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_event_is_rejected_and_the_good_ones_after_it_arrive(
    delivery: Callable[..., Delivery], engine: str
) -> None:
    run = delivery("bad-first", engine, "sync")
    bad = run.bad()
    good = [run.good() for _ in range(5)]
    with run.serve() as (url, _proc):
        run.subscribe(url)
        run.send([bad])
        # The bad event is answered (and recorded) before the good ones are routed.
        run.wait(
            "the bad event's delivery", lambda: None not in run.deliveries().get(bad.event_id, [None]), 30
        )
        run.send(good)
        run.settle(url)
        resp = requests.get(f"{url}/jobs?state=rejected", timeout=10)
        assert resp.status_code == 200, resp.text
        rejected = [job["event_id"] for job in resp.json()["jobs"]]
        assert rejected == [bad.event_id], f"GET /jobs?state=rejected: {resp.text[:2000]}\n{run.log_tail()}"
        run.verdict(url)


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_9_with_jobs_queued_and_running_then_restart_loses_nothing(
    delivery: Callable[..., Delivery], engine: str
) -> None:
    run = delivery("kill-9", engine, "async", DOWNLOADER_WORKERS="1")
    before = [run.good() for _ in range(20)]
    with run.serve() as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        run.subscribe(url)
        run.send(before)
        # Every event must be accepted (2xx) before the kill: a delivery to a dead service
        # would disable the subscription (that is the sender's rule, not ours to test here).
        assert run.wait(
            "20 deliveries answered",
            lambda: all(None not in run.deliveries().get(s.event_id, [None]) for s in before),
            60,
        ), f"Notifications did not deliver every event: {run.deliveries()}\n{run.log_tail()}"

        seen: list[dict[str, Any]] = []

        def busy() -> bool:
            seen[:] = run.jobs(url)
            states = [job["state"] for job in seen]
            return "running" in states and "queued" in states

        assert run.wait("a job running and others queued", busy, 30, interval=0.05), (
            f"never saw running and queued jobs at once: {[j['state'] for j in seen]}\n" + run.log_tail()
        )
        proc.kill()  # SIGKILL: no shutdown grace, leases and directories left as they were
        proc.wait(10)
    states = [job["state"] for job in seen]
    at_kill = {state: states.count(state) for state in sorted(set(states))}
    # What the killed attempt left under the root (its directory), for the restart to clean.
    done_then = {Path(job["download_path"]).name for job in seen if job["state"] == "done"}
    left = sorted(entry.name for entry in run.root.iterdir() if entry.name not in done_then)
    with run.serve(port=port) as (url, _proc):
        after = [run.good() for _ in range(3)]  # the subscription's target URL still works
        run.send(after)
        run.settle(url)
        run.verdict(url, at_kill=at_kill, left_at_kill=len(left))


@pytest.mark.parametrize("engine", ENGINES)
def test_cartd_down_while_events_arrive_loses_nothing(
    delivery: Callable[..., Delivery], engine: str, pacifica_stack: PacificaStack
) -> None:
    run = delivery("cartd-down", engine, "sync")
    events = [run.good() for _ in range(5)]  # stored while the archive is up
    with run.serve() as (url, _proc):
        run.subscribe(url)
        try:  # the stack is the session's: Cartd comes back whatever happens here
            pacifica_stack.stop_cartd()
            down_since = time.monotonic()
            run.send(events)
            run.wait(
                "every event accepted and retrying",
                lambda: (
                    sum(job["state"] == "queued" and job["attempts"] >= 1 for job in run.jobs(url))
                    == len(events)
                ),
                CARTD_DOWN_SECONDS,
            )
            time.sleep(max(0.0, CARTD_DOWN_SECONDS - (time.monotonic() - down_since)))
            during = {job["state"] for job in run.jobs(url)}
            disabled_while_down = run.disabled()
        finally:
            pacifica_stack.start_cartd()
        assert "done" not in during, f"a job was done while Cartd was down: {during}"
        assert not disabled_while_down, f"subscription disabled while Cartd was down\n{run.log_tail()}"
        run.settle(url)
        run.verdict(url, cartd_down_seconds=CARTD_DOWN_SECONDS)


def test_warning_log_level_keeps_info_records_out_of_the_log(
    delivery: Callable[..., Delivery], pacifica_stack: PacificaStack
) -> None:
    """``DOWNLOADER_LOG_LEVEL=WARNING`` must hold for CherryPy's records too.

    Found while reading the logs of the scenarios above: CherryPy's ``cherrypy.access.*`` and
    ``cherrypy.error`` loggers carry their own level (INFO), so the root logger's WARNING does
    not filter them and every request (and the engine's start) still writes an INFO line.
    """
    run = delivery("log-level", "sqlite", "async")
    with run.serve() as (url, proc):
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        assert requests.get(f"{url}/jobs", timeout=10).status_code == 200
        proc.terminate()
        proc.wait(30)
    records = [json.loads(line) for line in run.logs[0].read_text().splitlines() if line.strip()]
    below = [
        (r["level"], r["logger"], r["message"][:120]) for r in records if r["level"] in {"DEBUG", "INFO"}
    ]
    assert not below, f"{len(below)} records below WARNING with DOWNLOADER_LOG_LEVEL=WARNING: {below[:8]}"
