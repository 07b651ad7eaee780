from __future__ import annotations

import json
from typing import Any

import pytest
from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent as SDKCloudEvent

from downloader_service import InvalidEventError
from downloader_service.service.errors import UnsupportedMediaTypeError
from downloader_service.service.webhook import MAX_JSON_DEPTH, json_depth, parse_request
from tests.events import file_obj, make_event

FILES = [file_obj(1, "a.txt", "d", b"a")]


def sdk_event(event_id: str = "e1", data: Any = None) -> SDKCloudEvent:
    attributes = {
        "id": event_id,
        "source": "/pacifica/metadata/ingest",
        "type": "org.pacifica.metadata.ingest",
    }
    return SDKCloudEvent(attributes, make_event(FILES)["data"] if data is None else data)


def test_parse_request_maps_notifications_0_1_to_1_0(notifications_event: dict[str, Any]) -> None:
    body = json.dumps(notifications_event).encode()
    (event,) = parse_request({"Content-Type": "application/json"}, body)
    assert event.id == "C234-1234-1234"
    assert event.source == "/pacifica/metadata/ingest"
    assert event.type == "org.pacifica.metadata.ingest"
    assert event.mode == "notifications-0.1"
    assert event.data == notifications_event["data"]


def test_parse_request_0_1_without_event_id_names_it() -> None:
    doc = make_event(FILES)
    del doc["eventID"]
    with pytest.raises(InvalidEventError, match="id") as info:
        parse_request({"content-type": "application/json"}, json.dumps(doc).encode())
    assert info.value.field == "id"


def test_parse_request_0_1_with_bad_time_is_invalid() -> None:
    doc = {**make_event(FILES), "eventTime": "yesterday"}
    with pytest.raises(InvalidEventError, match="yesterday"):
        parse_request({"content-type": "application/json"}, json.dumps(doc).encode())


def test_parse_request_structured_with_charset() -> None:
    message = to_structured_event(sdk_event())
    (event,) = parse_request({"Content-Type": "application/cloudevents+json; charset=utf-8"}, message.body)
    assert (event.id, event.mode) == ("e1", "structured")
    assert event.data[1]["name"] == "a.txt"


def test_parse_request_binary_mode() -> None:
    message = to_binary_event(sdk_event(data={}))
    assert any(key.startswith("ce-") for key in message.headers)
    # The SDK's to_binary writes a list with str(), so the body is serialised here.
    body = json.dumps(make_event(FILES)["data"]).encode()
    (event,) = parse_request({**message.headers, "content-type": "application/json"}, body)
    assert (event.id, event.mode, event.type) == ("e1", "binary", "org.pacifica.metadata.ingest")
    assert event.data[1]["_id"] == 1


def test_parse_request_binary_mode_missing_source_names_it() -> None:
    headers = {"ce-id": "1", "ce-type": "t", "ce-specversion": "1.0", "content-type": "application/json"}
    with pytest.raises(InvalidEventError, match="ce-source") as info:
        parse_request(headers, b"[]")
    assert info.value.field == "source"


def test_parse_request_batch() -> None:
    docs = [json.loads(to_structured_event(sdk_event(f"e{i}")).body) for i in range(3)]
    events = parse_request({"content-type": "application/cloudevents-batch+json"}, json.dumps(docs).encode())
    assert [e.id for e in events] == ["e0", "e1", "e2"]


def test_parse_request_batch_names_the_bad_entry() -> None:
    docs = [json.loads(to_structured_event(sdk_event()).body), {"id": "x"}]
    with pytest.raises(InvalidEventError, match=r"batch\[1\]") as info:
        parse_request({"content-type": "application/cloudevents-batch+json"}, json.dumps(docs).encode())
    assert info.value.index == 1


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("application/json", b"{not json", "not valid JSON"),
        ("application/json", b"\xff\xfe", "not UTF-8"),
        ("application/json", b"[1, 2]", "not a CloudEvent"),
        ("application/json", b'{"hello": "world"}', "not a CloudEvent"),
        ("application/cloudevents+json", b"[]", "JSON object"),
        ("application/cloudevents+json", b'{"specversion": "1.0"}', "id"),
        (
            "application/cloudevents+json",
            b'{"specversion": "0.2", "id": "1", "source": "s", "type": "t"}',
            "'1.0'",
        ),
        (
            "application/cloudevents+json",
            b'{"specversion": "1.0", "source": "s", "type": "t"}',
            "attribute.s. id",
        ),
        ("application/cloudevents-batch+json", b"[]", "non-empty JSON array"),
    ],
)
def test_parse_request_refuses_malformed(content_type: str, body: bytes, message: str) -> None:
    with pytest.raises(InvalidEventError, match=message):
        parse_request({"content-type": content_type}, body)


@pytest.mark.parametrize("content_type", ["text/plain", "", "application/xml", "multipart/form-data"])
def test_parse_request_refuses_other_media_types(content_type: str) -> None:
    with pytest.raises(UnsupportedMediaTypeError, match="not a CloudEvents HTTP mode"):
        parse_request({"content-type": content_type}, b"{}")


def test_parse_request_maps_0_1_extensions_to_valid_names(notifications_event: dict[str, Any]) -> None:
    notifications_event["extensions"] = {"comExampleExtension": "value", "id": "clash"}
    with pytest.raises(InvalidEventError, match="extension 'id'"):
        parse_request({"content-type": "application/json"}, json.dumps(notifications_event).encode())


DEEP = b"[" * 100_000 + b"]" * 100_000
BINARY = {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "s", "ce-type": "t"}


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/json"},
        {"content-type": "application/cloudevents+json"},
        {"content-type": "application/cloudevents-batch+json"},
        {**BINARY, "content-type": "application/json"},
        {**BINARY, "content-type": "text/plain"},  # data the SDK keeps as bytes, parsed by us
    ],
    ids=["json", "structured", "batch", "binary", "binary-text"],
)
def test_parse_request_refuses_deep_nesting_before_any_parser(headers: dict[str, str]) -> None:
    with pytest.raises(InvalidEventError, match=f"100000 levels deep; at most {MAX_JSON_DEPTH}") as info:
        parse_request(headers, DEEP)
    assert info.value.field == "body"


def test_parse_request_takes_nesting_up_to_the_limit() -> None:
    event = make_event(FILES, version="1.0")
    event["data"][0]["value"] = json.loads("[" * (MAX_JSON_DEPTH - 3) + "]" * (MAX_JSON_DEPTH - 3))
    body = json.dumps(event).encode()
    assert json_depth(body) == MAX_JSON_DEPTH
    (parsed,) = parse_request({"content-type": "application/cloudevents+json"}, body)
    assert parsed.id == "ev-1"
    event["data"][0]["value"] = [event["data"][0]["value"]]
    with pytest.raises(InvalidEventError, match="65 levels deep"):
        parse_request({"content-type": "application/cloudevents+json"}, json.dumps(event).encode())


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"{}", 1),
        (b'{"a": "[[[[{{{{", "b": [["]\\"]"]]}', 3),
        (b'["a\\"[[[', 1),  # an unterminated string runs to the end
        (b'"' + b'\\"' * 1000, 0),
        (b"123", 0),
    ],
)
def test_json_depth_skips_brackets_in_strings(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


def test_json_depth_of_a_large_event_holds_a_fraction_of_its_size() -> None:
    import tracemalloc

    body = json.dumps(make_event([file_obj(i, f"f{i}", "d", b"x") for i in range(20_000)])).encode()
    tracemalloc.start()
    try:
        depth = json_depth(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert depth == 3
    # removing each string on its own made a new object of every piece between two strings:
    # ~15x the body at the peak (150 MB for the largest event the body limit admits)
    assert peak < 0.25 * len(body)
