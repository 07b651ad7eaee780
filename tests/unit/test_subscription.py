"""The subscription guard's parts without Notifications: the store's lease and gaps, the clock,
the replay input formats and filters, the settings, the page's banner.

(``test_subscription_guard.py`` runs the whole thing against the real Notifications.)
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from devstack.notifications import PolicyStandIn
from downloader_service.service.intake import Intake
from downloader_service.service.jsonpath import compile_jsonpath, matches
from downloader_service.service.metrics import ServiceMetrics
from downloader_service.service.replay import Replayer, read_events
from downloader_service.service.settings import Settings, settings_from_env
from downloader_service.service.store import Gap, GapState, JobStore, default_owner, open_store, owner_is_dead
from downloader_service.service.subscription import (
    GUARD_NAME,
    _tz_offset,
    _window_start,
    desired,
    replay_command,
)
from tests.conftest import MakeClient
from tests.events import file_obj, make_event

INGEST = '$[?(@["eventType"] = "org.pacifica.metadata.ingest")]'


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    opened = open_store(f"sqlite:///{tmp_path / 'jobs.sqlite3'}", clock=clock)
    yield opened
    opened.close()


def _gap(**values: Any) -> Gap:
    base = {
        "id": "g1",
        "subscription": "sub-1",
        "kind": "disabled",
        "target_url": "http://downloader:8080/",
        "disabled_at": "2026-12-07T10:00:05.123456",
        "window_start": "2026-12-07 09:55:00",
    }
    return Gap(**{**base, **values})


# ------------------------------------------------------------------------------ the store
def test_take_guard_one_owner_at_a_time_until_its_lease_runs_out(store: JobStore, clock: Clock) -> None:
    assert store.take_guard(GUARD_NAME, "a", 10)
    assert not store.take_guard(GUARD_NAME, "b", 10)
    assert store.take_guard(GUARD_NAME, "a", 10)  # renewed
    clock.now += 9
    assert not store.take_guard(GUARD_NAME, "b", 10)
    clock.now += 2
    assert store.take_guard(GUARD_NAME, "b", 10)
    assert store.guard_holder(GUARD_NAME) == ("b", clock.now + 10)
    store.release_guard(GUARD_NAME, "b")
    assert store.take_guard(GUARD_NAME, "c", 10)


def test_take_guard_from_a_holder_known_dead_needs_no_wait(store: JobStore) -> None:
    assert store.take_guard(GUARD_NAME, "host:1:old", 60)
    assert not store.take_guard(GUARD_NAME, "host:1:new", 60, dead="host:1:other")
    assert store.take_guard(GUARD_NAME, "host:1:new", 60, dead="host:1:old")


def test_owner_is_dead_only_for_ended_processes_of_this_host() -> None:
    me = default_owner()
    host, pid, _ = me.split(":")
    assert owner_is_dead(f"{host}:{pid}:00000000", me)  # an earlier life of this pid (a container restart)
    assert not owner_is_dead(me, me)
    assert not owner_is_dead(f"{host}:{os.getppid()}:abc", me)  # alive
    assert not owner_is_dead(f"elsewhere:{pid}:abc", me)  # another host: its lease decides
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    assert owner_is_dead(f"{host}:{dead}:abc", me)


def test_guard_state_round_trips(store: JobStore) -> None:
    assert store.guard_state(GUARD_NAME) == {}
    store.save_guard_state(GUARD_NAME, {"state": "enabled", "uuid": "u"})
    assert store.take_guard(GUARD_NAME, "a", 10)  # the lease leaves the state alone
    store.save_guard_state(GUARD_NAME, {"state": "disabled", "uuid": "u"})
    assert store.guard_state(GUARD_NAME) == {"state": "disabled", "uuid": "u"}
    assert store.guard_holder(GUARD_NAME)[0] == "a"


def test_open_gap_records_one_gap_per_subscription_and_disabled_time(store: JobStore) -> None:
    first, created = store.open_gap(_gap())
    assert created and first.state == GapState.OPEN
    again, created = store.open_gap(_gap(id="g2", error="later"))
    assert not created and again.id == "g1"
    store.gap_closed_by_enable("g1", "2026-12-07T10:01:00", "2026-12-07 10:02:00")
    store.gap_closed_by_enable("g1", "2026-12-07T11:00:00", "2026-12-07 11:01:00")  # the first end stays
    [gap] = store.gaps()
    assert (gap.enabled_at, gap.window_end) == ("2026-12-07T10:01:00", "2026-12-07 10:02:00")
    assert store.close_gap("g1", GapState.REPLAYED, "5 new").state == GapState.REPLAYED  # type: ignore[union-attr]
    assert store.close_gap("g1", GapState.DISMISSED) is not None
    assert store.gaps() == [] and store.gaps(None)[0].state == GapState.REPLAYED  # closed once
    assert store.close_gap("nope", GapState.DISMISSED) is None
    with pytest.raises(ValueError, match="replayed or dismissed"):
        store.close_gap("g1", GapState.OPEN)


# ------------------------------------------------------------------------------ the clock
def test_tz_offset_is_whole_quarter_hours() -> None:
    from datetime import UTC, datetime

    utc = 1_796_000_000.0
    local = datetime.fromtimestamp(utc + 0.9, UTC).replace(tzinfo=None).isoformat()
    assert _tz_offset(local, utc) == 0
    local = datetime.fromtimestamp(utc + 5.5 * 3600 + 0.7, UTC).replace(tzinfo=None).isoformat()
    assert _tz_offset(local, utc) == 19800
    local = datetime.fromtimestamp(utc - 8 * 3600 - 0.4, UTC).replace(tzinfo=None).isoformat()
    assert _tz_offset(local, utc) == -28800


def test_window_starts_a_margin_before_the_last_sight_of_an_enabled_subscription() -> None:
    from datetime import UTC, datetime

    updated = "2026-12-07T08:00:00"
    assert str(_window_start(updated, {})) == "2026-12-07 07:55:00"
    seen = datetime(2026, 12, 7, 9, 30, tzinfo=UTC).timestamp()  # 10:30 in a UTC+1 Notifications
    assert str(_window_start(updated, {"last_enabled": seen, "tz_offset": 3600})) == "2026-12-07 10:25:00"
    # Without the zone the sighting cannot be placed on Notifications' clock: updated decides.
    assert str(_window_start(updated, {"last_enabled": seen})) == "2026-12-07 07:55:00"


def test_replay_command_is_eventget_of_the_window_piped_into_jobs_import() -> None:
    assert replay_command(_gap()) is None  # not enabled again yet: no end
    gap = _gap(window_end="2026-12-07 10:02:00")
    assert replay_command(gap) == (
        "pacifica-notifications-cmd eventget --start-date '2026-12-07 09:55:00' "
        "--end-date '2026-12-07 10:02:00' --limit 1000000 | downloader-service jobs import --gap g1 -"
    )
    compose = replay_command(gap, compose=True)
    assert compose is not None and compose.startswith("docker compose exec -T notifications ")
    assert "| docker compose exec -T downloader downloader-service jobs import --gap g1 -" in compose


# --------------------------------------------------------------------------- the settings
def _env(**extra: str) -> dict[str, str]:
    return {
        "DOWNLOADER_NOTIFICATIONS_URL": "http://notifications:8070",
        "DOWNLOADER_NOTIFICATIONS_USER": "dmlb2001",
        "DOWNLOADER_PUBLIC_URL": "http://downloader:8080",
        **extra,
    }


def test_settings_for_the_guard_are_checked_together() -> None:
    settings = settings_from_env(_env())
    assert settings.target_url() == "http://downloader:8080/"
    assert desired(settings) == {
        "name": "pacifica downloader",
        "jsonpath": INGEST,
        "target_url": "http://downloader:8080/",
    }
    for extra, named in (
        ({"DOWNLOADER_NOTIFICATIONS_USER": ""}, "DOWNLOADER_NOTIFICATIONS_USER"),
        ({"DOWNLOADER_PUBLIC_URL": ""}, "DOWNLOADER_PUBLIC_URL"),
        ({"DOWNLOADER_NOTIFICATIONS_URL": "notifications:8070"}, "DOWNLOADER_NOTIFICATIONS_URL"),
        ({"DOWNLOADER_SUBSCRIPTION_JSONPATH": "$[?("}, "DOWNLOADER_SUBSCRIPTION_JSONPATH"),
        ({"DOWNLOADER_SUBSCRIPTION_CHECK": "0"}, "DOWNLOADER_SUBSCRIPTION_CHECK"),
    ):
        with pytest.raises(ValueError, match=named):
            settings_from_env(_env(**extra))
    assert settings_from_env({"DOWNLOADER_NOTIFICATIONS_USER": ""}).notifications_url == ""  # guard off


def test_the_subscription_carries_the_services_own_credentials() -> None:
    token = desired(settings_from_env(_env(DOWNLOADER_TOKEN="s3cret")))
    assert token["auth"] == {"type": "header", "header": {"type": "Bearer", "credentials": "s3cret"}}
    basic = desired(settings_from_env(_env(DOWNLOADER_BASIC_AUTH="notify:pa:ss")))
    assert basic["auth"] == {"type": "basic", "basic": {"username": "notify", "password": "pa:ss"}}


def test_jsonpath_matches_as_notifications_does() -> None:
    rule = compile_jsonpath(INGEST)
    assert matches(rule, make_event([]))
    assert not matches(rule, {**make_event([]), "eventType": "org.pacifica.metadata.other"})
    assert not matches(rule, [1, 2]) and not matches(rule, "text")


# ------------------------------------------------------------------------- the input
EVENTGET = """Event - 0d4c8f0e-1111-4ad7-9e0e-111111111111
{"cloudEventsVersion": "0.1", "eventID": "a"}
    ELM 6a1c (2026-12-07T10:00:01) policy 200 target 200
Event - 0d4c8f0e-2222-4ad7-9e0e-222222222222
{"cloudEventsVersion": "0.1", "eventID": "b"}
"""


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        (EVENTGET, ["a", "b"]),
        ('[{"eventID": "a"}, {"eventID": "b"}]', ["a", "b"]),
        ('{"eventID": "a"}\n\n{"eventID": "b"}\n', ["a", "b"]),
        ('{\n  "eventID": "a"\n}\n{\n  "eventID": "b"\n}\n', ["a", "b"]),
        ("\n\n", []),
    ],
    ids=["eventget", "array", "json-lines", "pretty-printed", "empty"],
)
def test_read_events_takes_every_input_format(text: str, ids: list[str]) -> None:
    events = list(read_events(io.StringIO(text)))
    assert [json.loads(event.text)["eventID"] for event in events] == ids


def test_read_events_names_where_each_event_was() -> None:
    events = list(read_events(io.StringIO(EVENTGET)))
    assert events[0].where == "event log 0d4c8f0e-1111-4ad7-9e0e-111111111111"
    lines = list(read_events(io.StringIO('{"eventID": "a"}\nnot json\n')))
    assert [event.where for event in lines] == ["line 1", "line 2"]


# ------------------------------------------------------------------------------ replay
def _replayer(store: JobStore, tmp_path: Path, **kwargs: Any) -> Replayer:
    settings = Settings(download_root=str(tmp_path / "root"), state_dir=str(tmp_path))
    return Replayer(Intake(settings, store, ServiceMetrics()), INGEST, **kwargs)


def _events(*ids: str) -> list[dict[str, Any]]:
    return [make_event([file_obj(34, "foo.txt", "a", b"foo")], event_id=event_id) for event_id in ids]


def test_replay_counts_new_known_skipped_and_rejected(store: JobStore, tmp_path: Path) -> None:
    replayer = _replayer(store, tmp_path)
    other = {**_events("other")[0], "eventType": "org.pacifica.metadata.other"}
    no_id = make_event([{**file_obj(0, "x", "a", b"x"), "_id": None}], event_id="no-id")
    del no_id["data"][1]["_id"]
    lines = [json.dumps(e) for e in [*_events("e1", "e2"), other, no_id]] + ["{not json"]
    result = replayer.replay(read_events(io.StringIO("\n".join(lines))))
    assert (result.new, result.known, result.skipped, result.rejected, result.failed) == (2, 0, 1, 2, 0)
    assert result.line() == "2 new, 0 already known, 1 skipped, 2 rejected"
    assert any("line 5: not JSON" in problem for problem in result.problems)
    again = replayer.replay(read_events(io.StringIO("\n".join(lines[:2]))))
    assert (again.new, again.known) == (0, 2)
    assert sorted(job.event_id for job in store.list_jobs()) == ["e1", "e2", "no-id"]


def test_replay_asks_policy_as_notifications_does(store: JobStore, tmp_path: Path) -> None:
    policy = PolicyStandIn()
    try:
        replayer = _replayer(store, tmp_path, policy_url=policy.url, user="dmlb2001")
        policy.status = 403
        refused = replayer.replay(read_events(io.StringIO(json.dumps(_events("p1")))))
        assert (refused.new, refused.skipped) == (0, 1) and store.list_jobs() == []
        policy.status = 200
        allowed = replayer.replay(read_events(io.StringIO(json.dumps(_events("p1")))))
        assert allowed.new == 1
        assert [(user, doc["eventID"]) for user, doc in policy.requests] == [("dmlb2001", "p1")] * 2
        policy.status = 500
        broken = replayer.replay(read_events(io.StringIO(json.dumps(_events("p2")))))
        assert broken.failed == 1 and "Policy answered 500" in broken.problems[0]
    finally:
        policy.stop()


# ------------------------------------------------------------------------------ the page
def test_the_page_shows_each_open_gap_with_its_replay_command(make_client: MakeClient) -> None:
    client = make_client(workers=0)
    store = client.application.service.store
    store.open_gap(_gap(window_end="2026-12-07 10:02:00", error="<script>x</script>"))
    plain = client.get("/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert "Missed events" not in plain  # the guard is off: nothing of gaps is shown
    guarded = make_client(
        workers=0,
        notifications_url="http://notifications:8070",
        notifications_user="u",
        public_url="http://downloader:8080",
        state_dir=str(Path(store.url.removeprefix("sqlite:///")).parent),
    )
    page = guarded.get("/", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert "Missed events" in page and "jobs import --gap g1 -" in page
    assert "<script>x" not in page and "&lt;script&gt;x" in page
    ready = guarded.get("/health/ready").get_json()["subscription"]
    assert ready["gaps"][0]["id"] == "g1" and ready["state"] == "unknown"  # no guard has checked
    metrics = guarded.get("/metrics").get_data(as_text=True)
    assert "downloader_subscription_gaps 1.0" in metrics and "downloader_subscription_enabled 0.0" in metrics


def test_the_guard_outlives_an_answer_it_did_not_expect(
    store: JobStore, caplog: pytest.LogCaptureFixture
) -> None:
    from downloader_service.service.subscription import NotificationsClient, SubscriptionGuard

    class Odd(NotificationsClient):
        def subscriptions(self) -> list[Any]:
            raise KeyError("uuid")  # what Subscription.from_doc meets in a document without one

    settings = settings_from_env(_env())
    guard = SubscriptionGuard(settings, store, "me", client=Odd("http://n", "u"))
    assert guard.check() is None and guard.check() is None  # no exception, checked again
    assert "subscription check crashed" in caplog.text
