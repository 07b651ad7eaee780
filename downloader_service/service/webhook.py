"""CloudEvents over HTTP, read at the edge into our own immutable :class:`ReceivedEvent`.

Takes what Pacifica Notifications really sends (a CloudEvents 0.1 JSON object as
``application/json``, mapped to 1.0 attributes) and the 1.0 structured, binary and batch
modes. Every event is validated by the ``cloudevents`` SDK; its exceptions stop here.
No body reaches a JSON parser (ours or the SDK's) nested deeper than :data:`MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import base64
import re
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import accumulate
from typing import Any, Final

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.common import get_event_factory_for_version
from cloudevents.core.bindings.http import HTTPMessage, from_binary_event
from cloudevents.core.exceptions import BaseCloudEventException, CloudEventValidationError
from cloudevents.core.v1.event import CloudEvent as SDKCloudEvent
from dateutil.parser import isoparse  # type: ignore[import-untyped]  # the SDK's own parser of "time"

from ..errors import InvalidEventError
from . import eventdata
from .errors import UnsupportedMediaTypeError

STRUCTURED: Final = "application/cloudevents+json"
BATCH: Final = "application/cloudevents-batch+json"
PLAIN_JSON: Final = frozenset({"application/json", "text/json"})
MEDIA_TYPES: Final = (STRUCTURED, BATCH, "application/json", "ce-* headers (binary mode)")
# A batch of 1.0 events holding Files objects is 4 levels deep; deeper input is an attack on
# the parser's recursion (100,000 nested arrays end in RecursionError), not an event.
MAX_JSON_DEPTH: Final = 64

# CloudEvents 0.1 attribute -> 1.0 attribute (extensions are handled apart).
_V01_ATTRIBUTES: Final = {
    "eventID": "id",
    "eventType": "type",
    "source": "source",
    "eventTime": "time",
    "contentType": "datacontenttype",
    "schemaURL": "dataschema",
}
_CORE_ATTRIBUTES: Final = frozenset(
    {"id", "source", "type", "specversion", "time", "datacontenttype", "dataschema", "subject", "data"}
)
_NOT_EXTENSION_CHARS = re.compile(r"[^a-z0-9]")
# A run of everything but the brackets that nest (other bytes, and JSON strings, escapes
# included, or an unterminated one up to the end: their brackets do not nest), then the next
# bracket, if any. Possessive, and matching the unterminated kind, so the scan stays linear
# on hostile quoting; one match at a time, so it holds one bracket a bracket: the whole body
# scanned by one ``sub`` held 2.5 times the body at its peak (25 MB for a 10 MiB event).
_NEXT_BRACKET = re.compile(rb'(?:[^"\[\]{}]++|"(?:[^"\\]++|\\.)*+(?:"|\\?\Z))*+([\[\]{}]?)', re.DOTALL)
# Opening brackets to +1 and closing ones to -1 (as signed bytes).
_BRACKET_STEPS: Final = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
# The SDK fills in a missing ``id`` (a fresh uuid) and ``specversion``: a sender that forgot
# them must hear so, and duplicate detection needs the sender's own id.
_REQUIRED: Final = ("id", "source", "type", "specversion")


@dataclass(frozen=True)
class ReceivedEvent:
    """One validated CloudEvent: its identity and its ``data``, nothing from the SDK."""

    id: str
    source: str
    type: str
    mode: str  # "notifications-0.1", "structured", "binary" or "batch"
    data: Any
    # Every other attribute as JSON values (time, subject, extensions), for the record.
    attributes: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        """What makes two deliveries the same event (CloudEvents: ``source`` + ``id``)."""
        return (self.source, self.id)

    def document(self) -> dict[str, Any]:
        """The event as the library's ``CloudEvent.files`` reads it."""
        return {"id": self.id, "source": self.source, "type": self.type, "data": self.data}

    def record(self) -> dict[str, Any]:
        """The whole event as CloudEvents 1.0 JSON (and how it came), for the job store."""
        return {**self.attributes, **self.document(), "specversion": "1.0", "receivedmode": self.mode}


def media_type(content_type: str) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return content_type.split(";", 1)[0].strip().lower()


def check_media_type(headers: Mapping[str, str]) -> None:
    """Refuse, from the head alone, a request no CloudEvents mode reads (before its body is read)."""
    lowered = {key.lower(): value for key, value in headers.items()}
    if any(key.startswith("ce-") for key in lowered):
        return
    media = media_type(lowered.get("content-type", ""))
    if media not in (STRUCTURED, BATCH, *PLAIN_JSON):
        raise UnsupportedMediaTypeError(
            f"media type {media or '(none)'!r} is not a CloudEvents HTTP mode; send one of "
            + ", ".join(MEDIA_TYPES),
            field="content-type",
        )


def parse_request(headers: Mapping[str, str], body: bytes) -> list[ReceivedEvent]:
    """Read one HTTP request into its events (several only in batch mode).

    Raises :class:`UnsupportedMediaTypeError` for a media type we do not read and
    :class:`InvalidEventError`, naming the attribute, for anything malformed.
    """
    lowered = {key.lower(): value for key, value in headers.items()}
    media = media_type(lowered.get("content-type", ""))
    if any(key.startswith("ce-") for key in lowered):
        _require(lowered, "ce-", "header")
        _check_depth(body)  # the SDK parses a JSON body itself
        if len(body) <= eventdata.SMALL:
            return [_sdk_event(lambda: from_binary_event(HTTPMessage(lowered, body)), "binary")]
        # A large body is the data alone: the SDK checks the headers, we read the data as we
        # read a structured event's (its items kept as text, not parsed whole by the SDK).
        event = _sdk_event(lambda: from_binary_event(HTTPMessage(lowered, b"")), "binary")
        return [replace(event, data=_json(body, data=True))]
    if media == STRUCTURED:
        return [_structured(_json(body), "structured")]
    if media == BATCH:
        return _batch(body)
    if media in PLAIN_JSON:
        return [_plain_json(body)]
    raise UnsupportedMediaTypeError(
        f"media type {media or '(none)'!r} is not a CloudEvents HTTP mode; send one of "
        + ", ".join(MEDIA_TYPES),
        field="content-type",
    )


def json_depth(body: bytes) -> int:
    """How deep ``body``'s arrays and objects nest, found without parsing (no recursion)."""
    brackets = bytearray()
    position = 0
    while True:
        match = _NEXT_BRACKET.match(body, position)
        assert match is not None  # every position starts a match, empty at the end
        if not match.group(1):
            break  # the end: no bracket follows the run
        brackets += match.group(1)
        position = match.end()
    return max(accumulate(array("b", bytes(brackets).translate(_BRACKET_STEPS))), default=0)


def _check_depth(body: bytes) -> None:
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return  # too few brackets to nest too deep: the common case, and no scan
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        raise InvalidEventError(
            f"the body nests JSON {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted", field="body"
        )


def _json(body: bytes, data: bool = False) -> Any:
    """The body's JSON, each ``data`` array of a large one kept as text (:class:`.DataList`).

    ``data``: the body is the data alone (binary mode), a large array of it kept as text.
    """
    _check_depth(body)
    try:
        return eventdata.loads(body, data)
    except UnicodeDecodeError as exc:
        raise InvalidEventError(f"the body is not UTF-8: {exc}", field="body") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidEventError(f"the body is not valid JSON: {exc}", field="body") from exc


def _structured(doc: Any, mode: str) -> ReceivedEvent:
    """A structured event from its body as parsed (once: the SDK is handed the object)."""
    if not isinstance(doc, dict):
        raise InvalidEventError(
            f"a structured CloudEvent is a JSON object, not a {type(doc).__name__}", field="body"
        )
    _require(doc, "", "attribute")
    return _sdk_event(lambda: _from_structured(doc), mode)


def _from_structured(doc: dict[str, Any]) -> BaseCloudEvent:
    """What the SDK's ``from_structured_event`` makes of a body, from the object parsed already.

    The same steps as the SDK's JSON format ``read`` (cloudevents 2.x), without its parse of
    the body: that was a second parse of every event (and a third of each in a batch, which
    was encoded again for it). The SDK's event class still validates every attribute.
    """
    attributes = dict(doc)
    specversion = attributes.get("specversion", "1.0")
    factory = get_event_factory_for_version(specversion)
    if "time" in attributes:
        attributes["time"] = isoparse(attributes["time"])
    data = attributes.pop("data", None)
    encoding = attributes.get("datacontentencoding", "") if specversion == "0.3" else ""
    if encoding.lower() == "base64" and isinstance(data, str):
        data = base64.b64decode(data)
    if data is None:
        encoded = attributes.pop("data_base64", None)
        if encoded is not None:
            data = base64.b64decode(encoded)
    return factory(attributes, data)


def _batch(body: bytes) -> list[ReceivedEvent]:
    docs = _json(body)
    if not isinstance(docs, list) or not docs:
        raise InvalidEventError("a CloudEvents batch is a non-empty JSON array of events", field="body")
    events = []
    for index, doc in enumerate(docs):
        try:
            events.append(_structured(doc, "batch"))
        except InvalidEventError as exc:
            context: dict[str, Any] = dict(exc.context)
            raise InvalidEventError(f"batch[{index}]: {exc}", index=index, **context) from exc
    return events


def _plain_json(body: bytes) -> ReceivedEvent:
    """``application/json``: Notifications' 0.1 events, or a 1.0 event a sender mislabelled."""
    doc = _json(body)
    if isinstance(doc, dict) and "cloudEventsVersion" in doc:
        return _sdk_event(lambda: _from_v01(doc), "notifications-0.1")
    if isinstance(doc, dict) and "specversion" in doc:
        return _structured(doc, "structured")
    raise InvalidEventError(
        "not a CloudEvent: an application/json body must be an object with 'specversion' (1.0) "
        "or 'cloudEventsVersion' (0.1, as Pacifica Notifications sends)",
        field="specversion",
    )


def _require(attributes: Mapping[str, Any], prefix: str, what: str) -> None:
    missing = [name for name in _REQUIRED if f"{prefix}{name}" not in attributes]
    if missing:
        names = ", ".join(f"{prefix}{name}" for name in missing)
        raise InvalidEventError(f"invalid CloudEvent: missing required {what}(s) {names}", field=missing[0])


def _from_v01(doc: dict[str, Any]) -> SDKCloudEvent:
    """Map a CloudEvents 0.1 object onto 1.0 attributes and let the SDK validate them."""
    missing = [name for name in ("eventID", "eventType", "source") if name not in doc]
    if missing:
        raise InvalidEventError(
            "invalid CloudEvents 0.1 event: missing " + ", ".join(missing),
            field=_V01_ATTRIBUTES[missing[0]],
        )
    attributes: dict[str, Any] = {"specversion": "1.0"}
    for old, new in _V01_ATTRIBUTES.items():
        if old in doc:
            attributes[new] = doc[old]
    if isinstance(attributes.get("time"), str):
        attributes["time"] = datetime.fromisoformat(attributes["time"])
    if "eventTypeVersion" in doc:
        attributes["eventtypeversion"] = doc["eventTypeVersion"]
    extensions = doc.get("extensions") or {}
    if not isinstance(extensions, dict):
        raise InvalidEventError("extensions must be an object", field="extensions")
    for name, value in extensions.items():
        # 1.0 extension names are lowercase alphanumerics: comExampleExtension -> comexampleextension.
        mapped = _NOT_EXTENSION_CHARS.sub("", str(name).lower())
        if not mapped or mapped in _CORE_ATTRIBUTES or mapped in attributes:
            raise InvalidEventError(
                f"extension {name!r} cannot be mapped to a CloudEvents 1.0 attribute", field="extensions"
            )
        attributes[mapped] = value
    return SDKCloudEvent(attributes, doc.get("data"))


def _sdk_event(parse: Any, mode: str) -> ReceivedEvent:
    """Run an SDK parse, translating its exceptions, and copy the event into our value."""
    try:
        event = parse()
    except InvalidEventError:
        raise
    except CloudEventValidationError as exc:
        field = next(iter(exc.errors), "event")
        raise InvalidEventError(f"invalid CloudEvent: {exc}", field=field) from exc
    except (BaseCloudEventException, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise InvalidEventError(f"invalid CloudEvent: {exc}", field="event") from exc
    data = event.get_data()
    if isinstance(data, (bytes, str)):
        # Binary mode with a non-JSON content type, or data_base64: the files list is JSON.
        data = _json(data if isinstance(data, bytes) else data.encode("utf-8"))
    attributes = {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in event.get_attributes().items()
        if name not in ("id", "source", "type", "specversion", "data")
    }
    identity = {"id": str(event.get_id()), "source": str(event.get_source()), "type": str(event.get_type())}
    for name, value in identity.items():
        # "\udc80" is valid JSON but no text: it cannot be a key in the store, nor be logged.
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidEventError(
                    f"the event's {name} is not valid Unicode ({exc.reason} at character {exc.start})",
                    field=name,
                ) from None
    return ReceivedEvent(
        **identity,
        mode=mode,
        data=data,
        attributes={name: value for name, value in attributes.items() if _json_safe(value)},
    )


def _json_safe(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None
