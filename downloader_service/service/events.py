"""Completion events and cart deletions: what follows a job's end, delivered durably.

When a job ends (``done``, or ``failed`` for good) and a sink is configured
(``DOWNLOADER_EVENT_SINK``, else Knative's ``K_SINK``), the worker writes a CloudEvent into the
store's outbox *in the same transaction* as the job's end, so neither can exist without the
other. The outbox also holds each attempt's cart, deleted on Cartd once the attempt's end is
recorded: no download waits on Cartd's slow DELETE, and no cart is forgotten. A
:class:`Deliverer` thread in every worker process claims due outbox rows (leased, like jobs),
POSTs events as structured CloudEvents built by the ``cloudevents`` SDK (or DELETEs carts), and
records the answer: ``2xx`` is done; a ``4xx`` (but 408, 425 and 429) is recorded as failed
and not retried, since sending the same event again cannot help; anything else (5xx, no
connection) is retried with the job retry policy's backoff, for its window.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

import requests

from ..cartapi import connection_problem
from .jobs import Job, JobError, JobState
from .retry import RetryPolicy
from .settings import Settings
from .store import CART_DELETE_TYPE, Delivery, JobStore, Notice, StoreError

LOGGER = logging.getLogger(__name__)


class EventType(StrEnum):
    """The completion events this service sends (``DOWNLOADER_EVENTS_URL``)."""

    COMPLETED = "org.pacifica.downloader.download.completed"
    FAILED = "org.pacifica.downloader.download.failed"


# Not a CloudEvent: an outbox row whose delivery is DELETE <cart URL> on Cartd.
CART_DELETE: Final = CART_DELETE_TYPE
DEFAULT_SOURCE: Final = "/pacifica/downloader"
SEND_TIMEOUT: Final = (5.0, 30.0)
# What is read of any answer: enough for a status line's worth of detail, never an endless body.
ANSWER_BYTES: Final = 4096
# Threads per lane: Cartd's deletions in one, events to sinks in the other two (a sink that
# hangs for its whole timeout holds one of them, not every delivery).
LANES: Final = (("carts", True, 1), ("events", False, 2))
_RETRYABLE_4XX: Final = frozenset({408, 425, 429})


def completion_notice(
    settings: Settings,
    job: Job,
    result: dict[str, Any] | None = None,
    download_path: str | None = None,
    host: str | None = None,
    error: JobError | None = None,
) -> Notice | None:
    """The event for a job that ends now, or ``None`` when no sink is configured."""
    if not settings.event_sink:
        return None
    base = settings.public_url.rstrip("/")
    data: dict[str, Any] = {
        "job_id": job.id,
        "event_id": job.event_id,
        "event_source": job.source,
        "state": "failed" if error is not None else JobState.DONE,
        "attempts": job.attempts,
    }
    if error is None:
        data.update(download_path=download_path, host=host, **(result or {}))
    else:
        data["error"] = {"error": error.kind, "detail": error.detail, "retryable": error.retryable}
    if base:
        data["status_url"] = f"{base}/jobs/{job.id}"
    notice_id = uuid.uuid4().hex
    event = {
        "specversion": "1.0",
        "id": notice_id,
        "source": base or DEFAULT_SOURCE,
        "type": EventType.FAILED if error is not None else EventType.COMPLETED,
        # The event this one follows from: its id as the subject, its source as an extension.
        "subject": job.event_id,
        "eventsource": job.source,
        "jobid": job.id,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": data,
    }
    return Notice(notice_id, str(event["type"]), settings.event_sink, event)


def cart_deletion(cart_url: str | None) -> list[Notice]:
    """The outbox row that deletes an attempt's cart once the attempt's end is committed.

    The download is reported as soon as its files are verified and in place; Cartd's DELETE
    (three Celery revocations per file: seconds for thousands of files) comes after, durably:
    a cart whose deletion failed is deleted later, never forgotten.
    """
    if not cart_url:
        return []
    return [Notice(uuid.uuid4().hex, CART_DELETE, cart_url, {})]


def structured(event: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The headers and body of a structured-mode HTTP request, from the SDK.

    The SDK (and dateutil under it) is imported when a first event is sent: a worker process
    with no completion events configured never holds it.
    """
    from cloudevents.core.bindings.http import to_structured_event
    from cloudevents.core.v1.event import CloudEvent as SDKCloudEvent

    attributes = {name: value for name, value in event.items() if name != "data"}
    if isinstance(attributes.get("time"), str):
        attributes["time"] = datetime.fromisoformat(attributes["time"])
    message = to_structured_event(SDKCloudEvent(attributes, event.get("data")))
    return dict(message.headers), message.body


class Deliverer:
    """One thread that delivers the outbox's due events to their sinks."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        owner: str,
        retry: RetryPolicy,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.owner = owner
        self.retry = retry
        self.session = session or requests.Session()
        self.clock = clock
        # Cartd's DELETE revokes Celery tasks per file: give it the read timeout Cartd gets.
        self.cart_timeout = (settings.connect_timeout, max(settings.read_timeout, SEND_TIMEOUT[1]))
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Deliver in the background until :meth:`stop`: cart deletions and events apart."""
        for name, carts, count in LANES:
            for number in range(count):
                thread = threading.Thread(
                    target=self._loop, args=(carts,), name=f"deliver-{name}-{number}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the deliveries in hand (an unfinished one is retried when its lease ends)."""
        self._stopping.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _loop(self, carts: bool | None = None) -> None:
        while not self._stopping.is_set():
            try:
                delivered = self.deliver_once(carts)
            except StoreError as exc:
                LOGGER.warning("the outbox could not be read", extra={"detail": str(exc)})
                delivered = None
            if delivered is None:
                self._stopping.wait(self.settings.poll_interval)

    def deliver_once(self, carts: bool | None = None) -> Delivery | None:
        """Claim one due row (of the lane ``carts`` says) and send it; None if none was due."""
        # The job lease's length: a deliverer that died is replaced as fast as a worker. One
        # still sending past it may be joined by another: delivery is at least once (the
        # same event id, an idempotent DELETE).
        delivery = self.store.claim_delivery(self.owner, self.settings.lease_seconds, carts)
        if delivery is None:
            return None
        status, error, retryable = self._send(delivery)
        retry_at = None
        if error is not None and retryable:
            pause = self.retry.delay(
                delivery.attempts, RuntimeError(error), self.clock() - delivery.created_at
            )
            retry_at = None if pause is None else self.clock() + pause
        self.store.delivered(delivery.id, self.owner, status, error, retry_at)
        log = {"delivery": delivery.id, "job_id": delivery.job_id, "type": delivery.type, "status": status}
        what = "cart deleted" if delivery.type == CART_DELETE else "completion event delivered"
        if error is None:
            LOGGER.info(what, extra=log)
        elif retry_at is not None:
            LOGGER.warning(f"not yet {what}; retrying", extra={**log, "detail": error})
        else:
            LOGGER.warning(f"not {what}, for good", extra={**log, "detail": error})
        return delivery

    def _send(self, delivery: Delivery) -> tuple[int | None, str | None, bool]:
        """POST the event (or DELETE the cart): ``(status, error or None, whether a retry can help)``."""
        # Never a redirect followed (requests would follow a 302 as a GET without the event
        # and call that delivered), never more than ANSWER_BYTES of an answer read.
        options: dict[str, Any] = {"allow_redirects": False, "stream": True}
        try:
            if delivery.type == CART_DELETE:
                # Cartd's TLS options (a CA bundle, a client certificate), not the sinks'.
                cartd = {**options, **self.settings.request_options()}
                with self.session.delete(delivery.sink, timeout=self.cart_timeout, **cartd) as resp:
                    # 404: Cartd has no such cart any more (deleted before, or purged): done.
                    status = 200 if resp.status_code == 404 else resp.status_code
                    text = _start_of(resp)
            else:
                headers, body = structured(dict(delivery.event))
                with self.session.post(
                    delivery.sink, data=body, headers=headers, timeout=SEND_TIMEOUT, **options
                ) as resp:
                    status = resp.status_code
                    text = _start_of(resp)
        except (OSError, ValueError) as exc:
            # requests' errors are OSErrors, as is its word for a certificate file gone since
            # the start (ValueError: ours, for one that no longer loads): worth another try.
            where = "Cartd" if delivery.type == CART_DELETE else "the sink"
            problem = connection_problem(exc) if isinstance(exc, requests.RequestException) else str(exc)
            return None, f"cannot reach {where}: {problem}", True
        if status < 300:
            return status, None, False
        where = "Cartd" if delivery.type == CART_DELETE else "the sink"
        if status < 400:  # a redirect is no delivery; the sink may move back: retried
            moved = f" to {resp.headers.get('Location', '(nowhere)')[:200]}"
            return status, f"{where} answered {status} (a redirect{moved}; not followed)", True
        retryable = status >= 500 or status in _RETRYABLE_4XX
        return status, f"{where} answered {status}: {text}".strip(), retryable


def _start_of(resp: requests.Response) -> str:
    """At most :data:`ANSWER_BYTES` of an answer's body, as text (its first 300 characters).

    A body that ends within the limit is read to its end, so that the connection goes back to
    the pool; a longer (or endless) one is left, and its connection closed.
    """
    data = bytearray()
    try:
        for chunk in resp.iter_content(chunk_size=1024):
            data += chunk
            if len(data) >= ANSWER_BYTES:
                break
    except (requests.RequestException, OSError, ValueError):
        pass
    return bytes(data[:ANSWER_BYTES]).decode("utf-8", "replace")[:300]
