"""Our Pacifica Notifications subscription: kept present and enabled, and every gap recorded.

Notifications 0.5.2 disables a subscription at the first connection error or non-2xx answer
of its target and from then on routes it nothing, silently. A deploy, a crash or a proxy's
502 while we start would cut the site off for good. So the service owns its subscription
(one per Notifications user and target URL, ``DOWNLOADER_PUBLIC_URL``):

- :func:`ensure` makes it exist, match the settings and be enabled. A disabled subscription
  becomes a :class:`~.store.Gap` in the job store *before* it is re-enabled (a store that
  cannot be written means we are not ready to take events, and it stays disabled); so does
  one deleted under us. ``downloader-service subscribe`` runs it once.
- :class:`SubscriptionGuard` runs it in ``serve`` every ``DOWNLOADER_SUBSCRIPTION_CHECK``
  seconds. Replicas elect one guard through a leased row of the store; a guard that dies is
  replaced when its lease runs out.
- A gap's window is in Notifications' own local clock (its times are ``datetime.now()``),
  which is what ``pacifica-notifications-cmd eventget --start-date/--end-date`` takes: the
  events it prints for that window go through ``downloader-service jobs import``
  (:mod:`.replay`), and the ones already downloaded are recognised and skipped.

Notifications being down during a check is not a gap (nothing is routed then either, and it
keeps its event log): the check is logged and tried again at the next interval.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, Final

import requests

from ..errors import DownloaderError, first_line
from .logs import redact
from .settings import Settings
from .store import Gap, GapState, JobStore, StoreError, owner_is_dead

LOGGER = logging.getLogger(__name__)

GUARD_NAME: Final = "notifications-subscription"
# How far a replay window reaches past what we know: before, the events dispatched while the
# subscription was still enabled but routed after it failed (Celery's queue); after, those
# received just before it was enabled again. Duplicates cost a look-up; a missed event is lost.
WINDOW_BEFORE: Final = timedelta(minutes=5)
WINDOW_AFTER: Final = timedelta(minutes=1)
# eventget prints at most --limit events (10 by default) in no particular order.
EVENTGET_LIMIT: Final = 1_000_000
EVENTGET_FORMAT: Final = "%Y-%m-%d %H:%M:%S"
NOTIFICATIONS_TIMEOUT: Final = (5.0, 30.0)
_TIME_ZONE_STEP: Final = 900  # time zones are whole quarter hours from UTC

# What a check saw, in the guard's state and in /health/ready.


class SubscriptionState(StrEnum):
    """What the last check saw of the subscription (``off``: no Notifications URL is set)."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    MISSING = "missing"
    UNKNOWN = "unknown"
    OFF = "off"


class NotificationsError(DownloaderError):
    """Notifications could not be asked (down, timing out, a 5xx): try again later."""

    retryable = True


class NotificationsRefusedError(NotificationsError):
    """Notifications (or a proxy before it) refused the request: wrong user or credentials."""

    retryable = False


@dataclass(frozen=True)
class Subscription:
    """A subscription as Notifications' REST API shows it (times in its local clock)."""

    uuid: str
    name: str
    jsonpath: str
    target_url: str
    user: str = ""
    disabled: str | None = None
    error: str | None = None
    created: str = ""
    updated: str = ""
    auth: Mapping[str, Any] = field(default_factory=dict)
    extensions: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Subscription:
        return cls(
            uuid=str(doc["uuid"]),
            name=str(doc.get("name", "")),
            jsonpath=str(doc.get("jsonpath", "")),
            target_url=str(doc.get("target_url", "")),
            user=str(doc.get("user", "")),
            disabled=doc.get("disabled"),
            error=doc.get("error"),
            created=str(doc.get("created") or ""),
            updated=str(doc.get("updated") or ""),
            auth=dict(doc.get("auth") or {}),
            extensions=dict(doc.get("extensions") or {}),
        )

    @property
    def order(self) -> tuple[str, str]:
        """The oldest subscription of a target is the one kept: by creation, then uuid."""
        return (self.created, self.uuid)

    def public(self) -> dict[str, Any]:
        """JSON-ready, with the credentials Notifications keeps in clear left out."""
        doc: dict[str, Any] = {
            "uuid": self.uuid,
            "name": self.name,
            "user": self.user,
            "jsonpath": self.jsonpath,
            "target_url": self.target_url,
            "disabled": self.disabled,
            "error": self.error,
            "created": self.created,
            "updated": self.updated,
            "extensions": dict(self.extensions),
        }
        if self.auth:
            doc["auth"] = {"type": self.auth.get("type"), "credentials": "[REDACTED]"}
        return doc


class NotificationsClient:
    """Notifications' ``/eventmatch`` API as one user (the header Notifications reads it from).

    Credentials in the URL (``http://user:password@host:8070``) go to a proxy in front of it
    as basic auth. :attr:`server_time` is the ``Date`` of the last answer (UTC seconds).
    """

    def __init__(
        self,
        url: str,
        user: str,
        user_header: str = "Http-Remote-User",
        session: requests.Session | None = None,
        timeout: tuple[float, float] = NOTIFICATIONS_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self.user_header = user_header
        self.session = session or requests.Session()
        self.timeout = timeout
        self.server_time: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NotificationsClient:
        return cls(
            settings.notifications_url, settings.notifications_user, settings.notifications_user_header
        )

    def subscriptions(self) -> list[Subscription]:
        """The user's subscriptions (Notifications answers 403 when there are none)."""
        docs = self._call("GET", "/eventmatch", none_on_403=True)
        return [Subscription.from_doc(doc) for doc in docs or []]

    def create(self, doc: Mapping[str, Any]) -> Subscription:
        return Subscription.from_doc(self._call("POST", "/eventmatch", doc))

    def update(self, subscription_id: str, doc: Mapping[str, Any]) -> Subscription:
        return Subscription.from_doc(self._call("PUT", f"/eventmatch/{subscription_id}", doc))

    def delete(self, subscription_id: str) -> None:
        self._call("DELETE", f"/eventmatch/{subscription_id}")

    def _call(self, method: str, path: str, body: Any = None, none_on_403: bool = False) -> Any:
        url = self.url + path
        headers = {self.user_header: self.user, "Accept": "application/json"}
        try:
            with self.session.request(
                method, url, json=body, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as resp:
                self.server_time = _http_date(resp.headers.get("Date"))
                text = resp.text[:2000]
                status = resp.status_code
        except requests.RequestException as exc:
            raise NotificationsError(
                f"Notifications at {redact(self.url)} cannot be reached: {first_line(exc)}", url=redact(url)
            ) from exc
        if status == 403 and none_on_403:
            return None
        if status >= 500 or status in (408, 429):
            raise NotificationsError(
                f"Notifications answered {method} {redact(url)} with {status}: {first_line(text)}",
                url=redact(url),
                status=status,
            )
        if not 200 <= status < 300:
            raise NotificationsRefusedError(
                f"Notifications refused {method} {redact(url)} with {status}: {first_line(text)}; check "
                "DOWNLOADER_NOTIFICATIONS_USER, DOWNLOADER_NOTIFICATIONS_USER_HEADER and the credentials "
                "in DOWNLOADER_NOTIFICATIONS_URL",
                url=redact(url),
                status=status,
            )
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise NotificationsError(
                f"Notifications answered {method} {redact(url)} with something not JSON: {first_line(text)}",
                url=redact(url),
            ) from exc


def auth_object(settings: Settings) -> dict[str, Any] | None:
    """The credentials Notifications must send us, in its subscription ``auth`` form."""
    if settings.token:
        return {"type": "header", "header": {"type": "Bearer", "credentials": settings.token}}
    if settings.basic_auth:
        username, _, password = settings.basic_auth.partition(":")
        return {"type": "basic", "basic": {"username": username, "password": password}}
    return None


def desired(settings: Settings) -> dict[str, Any]:
    """The subscription the settings ask for (``extensions`` are the operator's: kept as found)."""
    doc: dict[str, Any] = {
        "name": settings.subscription_name,
        "jsonpath": settings.subscription_jsonpath,
        "target_url": settings.target_url(),
    }
    auth = auth_object(settings)
    if auth is not None:
        doc["auth"] = auth
    return doc


@dataclass(frozen=True)
class Outcome:
    """What one :func:`ensure` did: ``created``, ``recreated``, ``enabled``, ``updated`` or ``unchanged``."""

    subscription: Subscription
    action: str
    gap: Gap | None = None


def ensure(
    client: NotificationsClient,
    store: JobStore,
    settings: Settings,
    clock: Callable[[], float] = time.time,
    sync: bool = True,
) -> Outcome:
    """Make our subscription exist, match the settings and be enabled; record any gap first.

    ``sync`` also rewrites an enabled subscription whose name, rule or credentials differ
    from the settings (and learns Notifications' time zone from the answer). Raises
    :class:`NotificationsError` when Notifications cannot be asked, and
    :class:`~.store.StoreError` when the store cannot record what was found (then nothing
    was re-enabled).
    """
    state = store.guard_state(GUARD_NAME)
    want = desired(settings)
    target = want["target_url"]
    mine = sorted((sub for sub in client.subscriptions() if sub.target_url == target), key=lambda s: s.order)
    seen_at = client.server_time
    if not mine:
        return _create(client, store, want, state, clock)
    current = mine[0]
    if len(mine) > 1:
        LOGGER.warning(
            "several subscriptions post to this service: each event arrives more than once "
            "(duplicates are recognised); the oldest is guarded",
            extra={"target_url": target, "subscriptions": [sub.uuid for sub in mine]},
        )
    if current.disabled:
        return _enable(client, store, current, want, state, clock)
    differs = _differs(current, want)
    if sync and (differs or state.get("tz_offset") is None):
        # Without "disabled" in the body a failure routed meanwhile keeps it disabled.
        current = client.update(current.uuid, {**want, "extensions": dict(current.extensions)})
        _save(
            store,
            current,
            SubscriptionState.ENABLED,
            clock,
            state,
            tz_from=client.server_time,
            enabled_seen=seen_at,
        )
        return Outcome(current, "updated" if differs else "unchanged")
    _save(store, current, SubscriptionState.ENABLED, clock, state, enabled_seen=seen_at)
    return Outcome(current, "unchanged")


def _create(
    client: NotificationsClient,
    store: JobStore,
    want: dict[str, Any],
    state: dict[str, Any],
    clock: Callable[[], float],
) -> Outcome:
    """No subscription posts to us: a new one, and a gap if we had one that disappeared."""
    gap = None
    previous = state.get("uuid")
    if previous and state.get("target_url") == want["target_url"]:
        since = _window_start(state.get("updated") or "", state)
        gap, _new = store.open_gap(
            Gap(
                id=uuid.uuid4().hex,
                subscription=str(previous),
                kind="deleted",
                target_url=want["target_url"],
                disabled_at=_local_text(since + WINDOW_BEFORE),
                window_start=_local_text(since),
                error="the subscription was deleted",
            )
        )
    created = client.create(want)
    for other in sorted(
        (sub for sub in client.subscriptions() if sub.target_url == want["target_url"]), key=lambda s: s.order
    ):
        # Another process made one at the same moment: the oldest stays, the others go.
        if other.uuid != created.uuid and other.order < created.order:
            client.delete(created.uuid)
            LOGGER.info(
                "another process created the subscription at the same time: keeping the older one",
                extra={"subscription": other.uuid, "deleted": created.uuid},
            )
            _save(store, other, SubscriptionState.ENABLED, clock, state)
            return Outcome(other, "unchanged")
    _save(
        store,
        created,
        SubscriptionState.ENABLED,
        clock,
        state,
        tz_from=client.server_time,
        enabled_seen=client.server_time,
    )
    if gap is not None:
        gap = _close_window(store, gap, created.updated or created.created)
        LOGGER.warning(
            "subscription re-created after it was deleted: events routed meanwhile are missing",
            extra={**_gap_log(gap), "subscription": created.uuid},
        )
        return Outcome(created, "recreated", gap)
    LOGGER.info(
        "subscription created", extra={"subscription": created.uuid, "target_url": created.target_url}
    )
    return Outcome(created, "created")


def _enable(
    client: NotificationsClient,
    store: JobStore,
    current: Subscription,
    want: dict[str, Any],
    state: dict[str, Any],
    clock: Callable[[], float],
) -> Outcome:
    """A disabled subscription: the gap recorded first, then enabled again."""
    disabled_at = str(current.disabled)
    start = min(_window_start(current.updated, state), _parse_local(disabled_at) - WINDOW_BEFORE)
    gap, _new = store.open_gap(
        Gap(
            id=uuid.uuid4().hex,
            subscription=current.uuid,
            kind="disabled",
            target_url=current.target_url,
            disabled_at=disabled_at,
            window_start=_local_text(start),
            error=current.error,
        )
    )
    enabled = client.update(
        current.uuid, {**want, "extensions": dict(current.extensions), "disabled": None, "error": None}
    )
    _save(
        store,
        enabled,
        SubscriptionState.ENABLED,
        clock,
        state,
        tz_from=client.server_time,
        enabled_seen=client.server_time,
    )
    gap = _close_window(store, gap, enabled.updated)
    LOGGER.warning(
        "subscription re-enabled: Notifications had disabled it, events routed meanwhile are missing",
        extra={**_gap_log(gap), "subscription": enabled.uuid},
    )
    return Outcome(enabled, "enabled", gap)


def _close_window(store: JobStore, gap: Gap, enabled_at: str) -> Gap:
    """The gap's window ends a margin after Notifications routes to us again."""
    if gap.enabled_at is not None or not enabled_at:
        return gap
    end = _local_text(_parse_local(enabled_at) + WINDOW_AFTER)
    store.gap_closed_by_enable(gap.id, enabled_at, end)
    return Gap(**{**gap.__dict__, "enabled_at": enabled_at, "window_end": end})


def _differs(current: Subscription, want: Mapping[str, Any]) -> bool:
    return (
        current.name != want["name"]
        or current.jsonpath != want["jsonpath"]
        or dict(current.auth) != dict(want.get("auth") or {})
    )


def _save(
    store: JobStore,
    sub: Subscription,
    seen: str,
    clock: Callable[[], float],
    state: dict[str, Any],
    tz_from: float | None = None,
    enabled_seen: float | None = None,
) -> None:
    """Record what a check saw, learning Notifications' time zone from a write's answer."""
    new = {
        **state,
        "uuid": sub.uuid,
        "target_url": sub.target_url,
        "state": seen,
        "checked_at": clock(),
        "reason": None,
        "updated": sub.updated,
        "disabled": sub.disabled,
        "error": sub.error,
    }
    if tz_from is not None and sub.updated:
        new["tz_offset"] = _tz_offset(sub.updated, tz_from)
    if enabled_seen is not None and seen == SubscriptionState.ENABLED:
        new["last_enabled"] = enabled_seen
    store.save_guard_state(GUARD_NAME, new)


def record_unreachable(store: JobStore, exc: Exception, clock: Callable[[], float] = time.time) -> None:
    """A check that could not ask Notifications: the state is unknown, and why (not a gap)."""
    state = store.guard_state(GUARD_NAME)
    store.save_guard_state(
        GUARD_NAME, {**state, "state": SubscriptionState.UNKNOWN, "checked_at": clock(), "reason": str(exc)}
    )


# --------------------------------------------------------------------------- the clock
def _window_start(updated: str, state: Mapping[str, Any]) -> datetime:
    """When routing to us last surely worked, in Notifications' clock, less the margin.

    The later of the subscription's ``updated`` (Notifications set it when it was last enabled
    or created) and the last check that saw it enabled (its ``Date``, moved to Notifications'
    local time when we know its zone).
    """
    known = [_parse_local(updated)] if updated else []
    last, offset = state.get("last_enabled"), state.get("tz_offset")
    if last is not None and offset is not None:
        known.append(datetime.fromtimestamp(float(last) + float(offset), UTC).replace(tzinfo=None))
    if not known:
        known.append(datetime.now(UTC).replace(tzinfo=None) - timedelta(days=1))
    return max(known) - WINDOW_BEFORE


def _tz_offset(local: str, server_utc: float) -> int:
    """Notifications' local time less UTC, in seconds, from a time it just wrote and its ``Date``."""
    naive = _parse_local(local).replace(tzinfo=UTC).timestamp()
    return int(round((naive - server_utc) / _TIME_ZONE_STEP) * _TIME_ZONE_STEP)


def _parse_local(text: str) -> datetime:
    """A Notifications time (``isoformat()`` of a naive ``datetime.now()``)."""
    parsed = datetime.fromisoformat(text)
    return (
        parsed.replace(tzinfo=None) if parsed.tzinfo is None else parsed.astimezone(UTC).replace(tzinfo=None)
    )


def _local_text(when: datetime) -> str:
    return when.strftime(EVENTGET_FORMAT)


def _http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------- what we tell
def replay_command(gap: Gap, compose: bool = False) -> str | None:
    """The shell line that replays ``gap``'s window (None while the subscription is still off)."""
    if gap.window_end is None:
        return None
    eventget = (
        f"pacifica-notifications-cmd eventget --start-date '{gap.window_start}' "
        f"--end-date '{gap.window_end}' --limit {EVENTGET_LIMIT}"
    )
    importer = f"downloader-service jobs import --gap {gap.id} -"
    if compose:
        run = "docker compose exec -T"
        return f"{run} notifications {eventget} | {run} downloader {importer}"
    return f"{eventget} | {importer}"


def gap_summary(gap: Gap) -> dict[str, Any]:
    """A gap, JSON-ready, with the command that replays it."""
    return {
        "id": gap.id,
        "kind": gap.kind,
        "subscription": gap.subscription,
        "state": gap.state,
        "disabled_at": gap.disabled_at,
        "enabled_at": gap.enabled_at,
        "error": gap.error,
        "window": {"start": gap.window_start, "end": gap.window_end},
        "recorded": datetime.fromtimestamp(gap.recorded_at, UTC).isoformat(),
        "replay": replay_command(gap),
    }


def _gap_log(gap: Gap) -> dict[str, Any]:
    return {
        "gap": gap.id,
        "disabled_at": gap.disabled_at,
        "enabled_at": gap.enabled_at,
        "notifications_error": gap.error,
        "replay": replay_command(gap),
    }


def report(settings: Settings, store: JobStore, clock: Callable[[], float] = time.time) -> dict[str, Any]:
    """The subscription as every replica reports it (``/health/ready``): its state and open gaps.

    ``unknown`` when no guard has checked for three intervals (every guard gone, or the store
    holds an old check).
    """
    if not settings.notifications_url:
        return {"state": SubscriptionState.OFF}
    state = store.guard_state(GUARD_NAME)
    seen = state.get("state", SubscriptionState.UNKNOWN)
    checked = state.get("checked_at")
    body: dict[str, Any] = {
        "state": seen,
        "subscription": state.get("uuid"),
        "target_url": settings.target_url(),
        "checked": None if checked is None else datetime.fromtimestamp(float(checked), UTC).isoformat(),
    }
    if state.get("reason"):
        body["reason"] = state["reason"]
    if checked is None or clock() - float(checked) > 3 * settings.subscription_check + 5:
        body["state"] = SubscriptionState.UNKNOWN
        body["reason"] = "no guard has checked the subscription lately"
    body["gaps"] = [gap_summary(gap) for gap in store.gaps(GapState.OPEN)]
    return body


# --------------------------------------------------------------------------- the guard
class SubscriptionGuard:
    """Runs :func:`ensure` every ``subscription_check`` seconds while this replica is elected."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        owner: str,
        client: NotificationsClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.owner = owner
        self.client = client or NotificationsClient.from_settings(settings)
        self.clock = clock
        self.interval = settings.subscription_check
        # Past this a guard that died on another host is replaced by another replica (one that
        # died here is replaced at once: see owner_is_dead).
        self.lease = 2 * self.interval + 5
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._synced = False
        self._last_problem: str | None = None

    def check(self) -> Outcome | None:
        """One check, if this replica holds the guard; None when another does or it failed."""
        try:
            holder, _expires = self.store.guard_holder(GUARD_NAME)
            dead = holder if holder is not None and owner_is_dead(holder, self.owner) else None
            if not self.store.take_guard(GUARD_NAME, self.owner, self.lease, dead=dead):
                return None
            outcome = ensure(self.client, self.store, self.settings, self.clock, sync=not self._synced)
        except (NotificationsError, StoreError) as exc:
            self._problem(exc)
            return None
        except Exception:  # an answer we did not expect must not end the guard: logged, checked again
            LOGGER.exception("subscription check crashed; trying again at the next check")
            return None
        self._synced = True
        if self._last_problem is not None:
            LOGGER.info("subscription check works again", extra={"subscription": outcome.subscription.uuid})
            self._last_problem = None
        return outcome

    def _problem(self, exc: Exception) -> None:
        """Log a failed check once per new reason; record it unless the store is what failed."""
        if isinstance(exc, NotificationsError):
            with contextlib.suppress(StoreError):
                record_unreachable(self.store, exc, self.clock)
        if str(exc) != self._last_problem:
            LOGGER.warning(
                "subscription check failed; trying again at the next check",
                extra={"detail": str(exc), "retry_in": self.interval},
            )
        self._last_problem = str(exc)

    def start(self) -> None:
        """Check now, then every interval, on a thread of its own."""
        self._thread = threading.Thread(target=self._run, name="subscription-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(self._pause())

    def _pause(self) -> float:
        """The interval; a replica that is not the guard looks again just after its lease ends."""
        try:
            holder, expires = self.store.guard_holder(GUARD_NAME)
        except StoreError:
            return self.interval
        if holder is None or holder == self.owner or expires is None:
            return self.interval
        return min(self.interval, max(0.1, expires - self.clock() + 0.1))

    def stop(self) -> None:
        """Stop checking and give the guard up, so another replica takes it at once."""
        self._stop.set()
        if self._thread is not None:
            # Not the whole Notifications timeout: a stop must fit Docker's 10 s. A check cut
            # short changes nothing it had not recorded (a gap is written before the enable).
            self._thread.join(2.0)
        with contextlib.suppress(StoreError):
            self.store.release_guard(GUARD_NAME, self.owner)
