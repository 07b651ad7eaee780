from __future__ import annotations

import json
from pathlib import Path

import pytest

from downloader_service.service.jobs import Job
from downloader_service.service.layout import check_layout, render, transaction_metadata

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "notifications-event-0.1.json"


def job(event: dict[str, object], event_id: str = "C234-1234-1234") -> Job:
    return Job(
        id="0123456789abcdef0123456789abcdef",
        source="/pacifica/metadata/ingest",
        event_id=event_id,
        type="org.pacifica.metadata.ingest",
        state="running",
        attempts=1,
        created_at=1_800_000_000.0,
        updated_at=1_800_000_000.0,
        run_at=1_800_000_000.0,
        event=event,
    )


def test_transaction_metadata_reads_the_upstream_event() -> None:
    meta = transaction_metadata(json.loads(FIXTURE.read_text()))
    assert meta == {
        "transaction": 1234,
        "submitter": 10,
        "proposal": "1236é",
        "instrument": 54,
        "key_values": {"Tag": "Nam\\u00e9", "Taggy": "Blah", "Taggier": "Blah"},
    }


def test_render_default_and_nested_layouts() -> None:
    event = json.loads(FIXTURE.read_text())
    assert render("event-{event_id}-{job}", job(event)) == "event-C234-1234-1234-0123456789ab"
    nested = render("{proposal}/{instrument}/{date}/{transaction}-{event_id}", job(event))
    assert nested == "1236é/54/2027-01-15/1234-C234-1234-1234"


@pytest.mark.parametrize(
    ("value", "safe"),
    [("../../etc", "_.._etc"), ("a/b", "a_b"), ("..", "unknown"), ("", "unknown"), ("x" * 300, "x" * 64)],
)
def test_render_makes_hostile_values_one_safe_component(value: str, safe: str) -> None:
    assert render("{event_id}", job({}, event_id=value)) == safe


def test_missing_transaction_fields_render_as_unknown() -> None:
    assert render("{proposal}/{event_id}", job({"data": []}, event_id="e")) == "unknown/e"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{nope}/{event_id}", "unknown field"),
        ("/abs/{event_id}", "relative path"),
        ("a/../{event_id}", "relative path"),
        ("a//{event_id}", "relative path"),
        (".attempt-{job}", "the service's own"),
    ],
)
def test_check_layout_refuses_templates_that_could_escape_or_clash(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_layout(template)


@pytest.mark.parametrize("count", [0, 1, 3])
def test_metadata_json_is_what_json_dump_writes_file_by_file(tmp_path: Path, count: int) -> None:
    import dataclasses

    from downloader_service.cartfile import CartFile
    from downloader_service.service.layout import write_beside

    event = json.loads(FIXTURE.read_text())
    files = tuple(
        CartFile(str(i), f'dïr/[{i}]/n"{i}".txt', "sha1", f"{i:040x}", size=i) for i in range(count)
    )
    write_beside(str(tmp_path), dataclasses.replace(job(event), files=files))
    expected = {
        **transaction_metadata(event),
        "event_id": "C234-1234-1234",
        "source": "/pacifica/metadata/ingest",
        "type": "org.pacifica.metadata.ingest",
        "files": [file.as_cartd() for file in files],
    }
    written = (tmp_path / "metadata.json").read_text(encoding="utf-8")
    assert written == json.dumps(expected, ensure_ascii=False, indent=2) + "\n"
    assert json.loads((tmp_path / "notification.json").read_text(encoding="utf-8")) == event
