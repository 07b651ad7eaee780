r"""A lone surrogate written as a JSON escape (the six characters ``\udc80``) on every path in.

Valid JSON, but no text: no file system can hold it as a name, no UTF-8 store column or file
can hold it as it is. A name with one is the same refusal as any other unwritable name (a
``rejected`` job, or 400 in strict mode, exit 3 in the CLI); an id or source with one is a
400 (it cannot be a key); anywhere else in the event it is kept, escaped, and the download
goes on.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from downloader_service import CloudEvent, InvalidEventError
from tests.conftest import SCRIPT, MakeClient
from tests.events import file_obj, make_event
from tests.fakecartd import FakeCartd

FOO = b"foo\n"
LONE = "\\udc80"  # as it stands in the body: backslash, u, d, c, 8, 0


def _body(event: dict[str, Any], placeholder: str = "PLACEHOLDER") -> str:
    return json.dumps(event).replace(placeholder, LONE)


def _event(name: str = "fPLACEHOLDER", event_id: str = "sur-1", version: str = "0.1") -> dict[str, Any]:
    return make_event([file_obj(34, name, "a", FOO)], version=version, event_id=event_id)


def _binary(event: dict[str, Any]) -> tuple[str, dict[str, str]]:
    headers = {
        "Content-Type": "application/json",
        "ce-specversion": "1.0",
        "ce-id": event["id"],
        "ce-source": event["source"],
        "ce-type": event["type"],
    }
    return _body(event["data"]), headers


@pytest.mark.parametrize("mode", ["notifications-0.1", "structured", "binary", "batch"])
def test_a_name_with_a_lone_surrogate_is_rejected_like_any_unwritable_name(
    make_client: MakeClient, fake_cartd: FakeCartd, mode: str
) -> None:
    fake_cartd.add(34, FOO)
    client = make_client()
    event = _event(version="0.1" if mode == "notifications-0.1" else "1.0")
    if mode == "notifications-0.1":
        data, headers = _body(event), {"Content-Type": "application/json"}
    elif mode == "structured":
        data, headers = _body(event), {"Content-Type": "application/cloudevents+json"}
    elif mode == "binary":
        data, headers = _binary(event)
    else:
        data, headers = _body([event]), {"Content-Type": "application/cloudevents-batch+json"}
    resp = client.post("/", data=data, headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    answer = resp.get_json()
    answer = answer["events"][0] if mode == "batch" else answer
    assert (answer["state"], answer["error"], answer["field"]) == ("rejected", "invalid_event", "path")
    assert "not valid Unicode" in answer["detail"]
    # The stored event reads back with its surrogate, and the job's record shows.
    shown = client.get(f"/jobs/{answer['job_id']}")
    assert shown.status_code == 200 and shown.get_json()["state"] == "rejected"
    strict = make_client(strict=True).post("/", data=data, headers=headers)
    assert strict.status_code == 400 and strict.get_json()["error"] == "invalid_event"


@pytest.mark.parametrize("field", ["eventID", "source"])
def test_an_id_or_source_with_a_lone_surrogate_is_a_400(make_client: MakeClient, field: str) -> None:
    event = _event(name="ok.txt")
    event[field] = "x-PLACEHOLDER"
    resp = make_client().post("/", data=_body(event), headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["error"] == "invalid_event"
    assert resp.get_json()["field"] == {"eventID": "id", "source": "source"}[field]


def test_a_lone_surrogate_elsewhere_in_the_event_is_kept_and_the_files_arrive(
    make_client: MakeClient, fake_cartd: FakeCartd
) -> None:
    fake_cartd.add(34, FOO)
    event = _event(name="ok.txt")
    event["data"].append({"destinationTable": "TransactionKeyValue", "key": "note", "value": "PLACEHOLDER"})
    resp = make_client().post("/", data=_body(event), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.get_data(as_text=True)
    path = Path(resp.get_json()["download_path"])
    assert (path / "data/a/ok.txt").read_bytes() == FOO
    written = json.loads((path / "notification.json").read_text(encoding="utf-8"))
    assert written["data"][-1]["value"] == "\udc80"


def test_the_library_refuses_the_name(tmp_path: Path) -> None:
    text = _body(_event())
    with pytest.raises(InvalidEventError, match="not valid Unicode"):
        CloudEvent.files(json.loads(text))
    path = tmp_path / "event.json"
    path.write_text(text, encoding="utf-8")
    with open(path, encoding="utf-8") as handle, pytest.raises(InvalidEventError, match="not valid Unicode"):
        CloudEvent.read_files(handle)


def test_the_cli_download_is_exit_3_and_jobs_import_a_rejected_job(tmp_path: Path) -> None:
    event_file = tmp_path / "event.json"
    event_file.write_text(_body(_event()), encoding="utf-8")
    done = subprocess.run(
        [str(SCRIPT), "download", "event", str(event_file), str(tmp_path / "dest")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3 and "not valid Unicode" in done.stderr, done
    assert done.stderr.count("\n") == 1
    env = {"DOWNLOADER_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    imported = subprocess.run(
        [str(SCRIPT), "jobs", "import", "--json", str(event_file)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["rejected"] == 1
    assert "not valid Unicode" in imported.stderr
    shown = subprocess.run(
        [str(SCRIPT), "jobs", "list", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert json.loads(shown.stdout)["state"] == "rejected"
