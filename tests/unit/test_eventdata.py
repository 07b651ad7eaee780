"""A large event's ``data`` kept as text: the same values, texts and answers as a parsed list."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from downloader_service.errors import InvalidEventError
from downloader_service.service import eventdata
from downloader_service.service.eventdata import DataList, event_digest
from downloader_service.service.jobs import Job, JobState, dumps
from downloader_service.service.layout import NOTIFICATION_FILE, write_beside
from downloader_service.service.webhook import parse_request
from tests.events import file_obj, make_event

# More files than fit in eventdata.SMALL, and more than a chunk holds, with text that is not
# ASCII and a lone surrogate (encoded escaped, as dumps does), so every path is taken.
FILES = [file_obj(index, f"f{index}-é", "d/ü", b"x") for index in range(2500)]


def large_event(version: str = "1.0") -> dict[str, object]:
    event = make_event(FILES, version=version)
    event["data"].append({"destinationTable": "TransactionKeyValue", "key": "k", "value": "\udc80 lone"})  # type: ignore[attr-defined]
    return event


def test_a_large_body_keeps_its_data_as_chunks_that_read_back_as_the_list() -> None:
    event = large_event()
    body = json.dumps(event).encode()
    assert len(body) > eventdata.SMALL
    (received,) = parse_request({"content-type": "application/cloudevents+json"}, body)
    assert isinstance(received.data, DataList)
    assert len(received.data.chunks) == 3  # 2,502 items, 1,000 a chunk
    assert received.data == event["data"] and len(received.data) == len(event["data"])
    assert received.data[0] == event["data"][0] and received.data[-1] == event["data"][-1]  # type: ignore[index]
    assert received.data[1001] == event["data"][1001]  # type: ignore[index]
    with pytest.raises(IndexError):
        received.data[2502]


def test_the_stored_text_and_digest_are_those_of_the_parsed_event() -> None:
    """A small and a large event encode alike: duplicates and conflicts are found across sizes."""
    event = large_event()
    event["data"][-1]["value"] = "plain"  # type: ignore[index]  # one surrogate escapes all of dumps' text
    body = json.dumps(event).encode()
    streamed = parse_request({"content-type": "application/cloudevents+json"}, body)[0].record()
    parsed = {**streamed, "data": json.loads(body)["data"]}
    assert isinstance(streamed["data"], DataList) and isinstance(parsed["data"], list)
    assert eventdata.encode(streamed) == eventdata.encode(parsed) == dumps(parsed)
    assert event_digest(streamed) == event_digest(parsed)
    assert eventdata.loads(eventdata.encode(streamed)) == parsed


def test_a_lone_surrogate_in_a_large_event_is_stored_escaped_and_reads_back() -> None:
    event = large_event()
    streamed = eventdata.loads(json.dumps(event))
    text = eventdata.encode(streamed)
    text.encode("utf-8")  # storable: the item with the surrogate is escaped
    assert eventdata.loads(text) == event == json.loads(text)


def test_notification_json_of_a_large_event_is_written_as_json_dump_writes_it(tmp_path: Path) -> None:
    event = large_event()
    event["data"][-1]["value"] = "plain"  # type: ignore[index]  # one surrogate escapes all of dumps' text
    streamed = eventdata.loads(json.dumps(event))
    assert isinstance(streamed["data"], DataList)
    job = Job(
        id="j", source="/s", event_id="ev-1", type="t", state=JobState.RUNNING, attempts=1,
        created_at=0.0, updated_at=0.0, run_at=0.0, retry_from=0.0, event=streamed,
    )  # fmt: skip
    write_beside(str(tmp_path), job)
    assert (tmp_path / NOTIFICATION_FILE).read_text(encoding="utf-8") == dumps(event, indent=2) + "\n"


def test_reading_a_large_body_holds_a_fraction_of_what_the_parsed_event_holds() -> None:
    body = json.dumps(large_event()).encode()
    tracemalloc.start()
    try:
        value = eventdata.loads(body)
        streamed = tracemalloc.get_traced_memory()[1]  # the peak, text and reading alike
        before = tracemalloc.get_traced_memory()[0]
        parsed = json.loads(body)
        held = tracemalloc.get_traced_memory()[0] - before  # what the parsed event holds
    finally:
        tracemalloc.stop()
    assert value["data"] == parsed["data"]
    assert streamed < held / 2, (streamed, held)


@pytest.mark.parametrize(
    "body",
    [b'{"data": [1, 2', b'{"data": [1, 2]} x', b'{"data": [1 2]}', b"\xef\xbb\xbf{}", b'{"a": "\xff"}'],
    ids=["cut", "extra", "comma", "bom", "utf8"],
)
def test_a_large_malformed_body_is_refused_as_a_small_one_is(body: bytes) -> None:
    padded = body.replace(b"{", b"{" + b" " * eventdata.SMALL, 1)
    assert len(padded) > eventdata.SMALL
    with pytest.raises(ValueError, match=r"\w") as parsed:  # UnicodeDecodeError is one
        json.loads(padded.decode("utf-8"))
    unicode = isinstance(parsed.value, UnicodeDecodeError)
    with pytest.raises(UnicodeDecodeError if unicode else ValueError, match=r"\w"):
        eventdata.loads(padded)


@pytest.mark.parametrize("broken", [False, True], ids=["valid", "one-bad-file"])
def test_the_intake_makes_the_same_job_of_a_large_event_as_of_the_parsed_one(broken: bool) -> None:
    """Its files checked from the stored text, after the chunks were let go: same row, same error."""
    from dataclasses import replace

    from downloader_service.service.intake import Intake
    from downloader_service.service.metrics import ServiceMetrics
    from downloader_service.service.settings import settings_from_env
    from downloader_service.service.store import FilesColumn, StoredEvent

    event = large_event()
    event["data"][-1]["value"] = "plain"  # type: ignore[index]  # one surrogate escapes all of dumps' text
    if broken:
        event["data"][1700]["hashsum"] = "not hex"  # type: ignore[index]
    (received,) = parse_request({"content-type": "application/cloudevents+json"}, json.dumps(event).encode())
    parsed = replace(received, data=json.loads(json.dumps(event))["data"])
    intake = Intake(settings_from_env({}), None, ServiceMetrics())  # type: ignore[arg-type]  # new_job stores nothing
    streamed_job, parsed_job = intake.new_job(received), intake.new_job(parsed)
    assert isinstance(received.data, DataList) and not received.data.chunks  # let go
    assert isinstance(streamed_job.event, StoredEvent) and streamed_job.event == parsed_job.event
    assert streamed_job.error == parsed_job.error
    assert (streamed_job.error is not None) == broken
    if not broken:
        assert isinstance(streamed_job.files, FilesColumn) and isinstance(parsed_job.files, FilesColumn)
        assert streamed_job.files.count == parsed_job.files.count == len(FILES)
        assert streamed_job.files.text() == parsed_job.files.text()


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_a_large_binary_mode_event_is_read_as_a_structured_one(content_type: str) -> None:
    """The SDK checks the ce- headers; the body, the data alone, is kept as text as in the other modes."""
    event = large_event()
    event["data"][-1]["value"] = "plain"  # type: ignore[index]
    headers = {
        "ce-id": "ev-1",
        "ce-source": "/pacifica/metadata/ingest",
        "ce-type": "org.pacifica.metadata.ingest",
        "ce-specversion": "1.0",
        "content-type": content_type,
    }
    (binary,) = parse_request(headers, json.dumps(event["data"]).encode())
    (structured,) = parse_request(
        {"content-type": "application/cloudevents+json"}, json.dumps(event).encode()
    )
    assert binary.mode == "binary" and isinstance(binary.data, DataList)
    assert (binary.id, binary.source, binary.type) == (structured.id, structured.source, structured.type)
    assert binary.data == structured.data == event["data"]
    with pytest.raises(InvalidEventError, match=r"source.*must not be None or empty"):
        parse_request({**headers, "ce-source": ""}, json.dumps(event["data"]).encode())
