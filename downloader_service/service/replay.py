"""Replay: events Notifications logged while it routed us nothing, put through the intake.

``downloader-service jobs import`` reads events as a JSON array, as JSON lines, or as the
text ``pacifica-notifications-cmd eventget`` prints (``Event - <uuid>``, the event's JSON on
the next line, then indented ``ELM ...`` lines). Each event is what Notifications would have
routed to us only if our subscription's JSONPath matches it (jsonpath2, as Notifications
matches) and, when a Policy URL is given, Policy allows it (``POST /events/<user>``, 2xx);
then it is the body of a ``POST /`` in Notifications' form (``application/json``): the same
parsing, validation, (``source``, ``id``) de-duplication and ``rejected`` handling.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import requests

from ..cartapi import connection_problem
from ..errors import DownloaderError, InvalidEventError, PolicyUnavailableError
from .intake import Intake
from .jobs import JobState
from .jsonpath import compile_jsonpath, matches
from .webhook import parse_request

LOGGER = logging.getLogger(__name__)
POLICY_TIMEOUT = (5.0, 30.0)
_EVENTGET_HEAD = "Event - "
_PLAIN_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class LoggedEvent:
    """One event of the input, where it was (line, or Notifications' event log uuid)."""

    where: str
    text: str


@dataclass
class ReplayResult:
    """What became of the input's events."""

    new: int = 0
    known: int = 0
    skipped: int = 0
    rejected: int = 0
    failed: int = 0
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        text = f"{self.new} new, {self.known} already known, {self.skipped} skipped, {self.rejected} rejected"
        return text + (f", {self.failed} failed" if self.failed else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "new": self.new,
            "known": self.known,
            "skipped": self.skipped,
            "rejected": self.rejected,
            "failed": self.failed,
            "problems": self.problems,
        }


def read_events(stream: IO[str]) -> Iterator[LoggedEvent]:
    """The events of ``stream``: a JSON array, JSON lines, or ``eventget``'s text.

    A JSON array is read whole; the two line formats an event at a time. A line that is not
    JSON becomes an event whose text fails validation later, so it is counted, not fatal.
    """
    first = ""
    while not first.strip():
        first = stream.readline()
        if not first:
            return
    if first.lstrip().startswith("["):
        yield from _array(first + stream.read())
    elif first.startswith(_EVENTGET_HEAD):
        yield from _eventget(first, stream)
    elif first.lstrip().startswith("{") and not _is_json(first):
        yield from _documents(first + stream.read())  # one (or several) pretty-printed objects
    else:
        yield from _json_lines(first, stream)


def _array(text: str) -> Iterator[LoggedEvent]:
    try:
        docs = json.loads(text)
    except ValueError:
        yield LoggedEvent("input", text)  # fails again when replayed, and is reported then
        return
    if not isinstance(docs, list):
        yield LoggedEvent("input", json.dumps(docs))
        return
    for index, doc in enumerate(docs):
        yield LoggedEvent(f"[{index}]", json.dumps(doc))


def _eventget(first: str, stream: IO[str]) -> Iterator[LoggedEvent]:
    """``Event - <uuid>`` then the event's JSON on one line; ``ELM`` lines (indented) between."""
    head: str | None = first
    for line in stream:
        if head is not None:
            yield LoggedEvent(f"event log {head[len(_EVENTGET_HEAD) :].strip()}", line.strip())
            head = None
        elif line.startswith(_EVENTGET_HEAD):
            head = line
        elif line.strip() and not line.startswith((" ", "\t")):
            yield LoggedEvent("eventget output", line.strip())  # not its format: reported
    if head is not None:
        yield LoggedEvent(f"event log {head[len(_EVENTGET_HEAD) :].strip()}", "")


def _documents(text: str) -> Iterator[LoggedEvent]:
    decoder = json.JSONDecoder()
    position, number = 0, 0
    while position < len(text):
        while position < len(text) and text[position].isspace():
            position += 1
        if position >= len(text):
            return
        number += 1
        try:
            doc, position = decoder.raw_decode(text, position)
        except ValueError:
            yield LoggedEvent(f"document {number}", text[position:])
            return
        yield LoggedEvent(f"document {number}", json.dumps(doc))


def _json_lines(first: str, stream: IO[str]) -> Iterator[LoggedEvent]:
    for number, line in enumerate(_chain(first, stream), start=1):
        if line.strip():
            yield LoggedEvent(f"line {number}", line.strip())


def _chain(first: str, rest: Iterable[str]) -> Iterator[str]:
    yield first
    yield from rest


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


class Replayer:
    """Puts logged events through the intake, as Notifications would have routed them."""

    def __init__(
        self,
        intake: Intake,
        jsonpath: str,
        policy_url: str = "",
        user: str = "",
        session: requests.Session | None = None,
    ) -> None:
        self.intake = intake
        self.rule = compile_jsonpath(jsonpath)
        self.policy_url = policy_url.rstrip("/")
        self.user = user
        self.session = session or requests.Session()

    def replay(self, events: Iterable[LoggedEvent]) -> ReplayResult:
        result = ReplayResult()
        for logged in events:
            self._one(logged, result)
        return result

    def _one(self, logged: LoggedEvent, result: ReplayResult) -> None:
        try:
            doc = json.loads(logged.text)
        except ValueError as exc:
            result.rejected += 1
            result.problems.append(f"{logged.where}: not JSON: {exc}")
            return
        if not matches(self.rule, doc):
            result.skipped += 1
            return
        try:
            if self.policy_url and not self._allowed(logged.text):
                result.skipped += 1
                return
            # Bytes that were not UTF-8 come back as they were (the CLI reads with
            # surrogateescape), so the intake refuses them as it refuses such a POST.
            body = logged.text.encode("utf-8", "surrogateescape")
            [(job, created)] = self.intake.accept(parse_request(_PLAIN_JSON, body))
        except InvalidEventError as exc:
            result.rejected += 1
            result.problems.append(f"{logged.where}: {exc}")
            return
        except DownloaderError as exc:
            result.failed += 1
            result.problems.append(f"{logged.where}: {exc}")
            return
        if not created:
            result.known += 1
        elif job.state == JobState.REJECTED:
            result.rejected += 1
            detail = job.error.detail if job.error is not None else ""
            result.problems.append(f"{logged.where}: event {job.event_id!r} rejected: {detail}")
        else:
            result.new += 1

    def _allowed(self, text: str) -> bool:
        """Policy's word, asked exactly as Notifications asks it before routing (2xx routes)."""
        url = f"{self.policy_url}/events/{self.user}"
        try:
            with self.session.post(
                url,
                data=text.encode("utf-8"),
                headers=_PLAIN_JSON,
                timeout=POLICY_TIMEOUT,
                **self.intake.settings.request_options(),
            ) as resp:
                status = resp.status_code
        except requests.RequestException as exc:
            raise PolicyUnavailableError(
                f"Policy at {url} cannot be reached: {connection_problem(exc)}", url=url
            ) from exc
        if status >= 500:
            raise PolicyUnavailableError(f"Policy answered {status} at {url}", url=url, status=status)
        return 200 <= status < 300
