"""Where a job's download lands and what lies beside its files, for the work that follows.

Each download directory holds the files (under ``DOWNLOADER_FILENAME``), ``notification.json``
(the event as received) and ``metadata.json`` (the transaction's id, submitter, proposal,
instrument and key/value pairs, read from the event), as Pacifica Notifications' consumer
convention expects. Its path under the download root comes from ``DOWNLOADER_LAYOUT``, a
template over the event's fields whose values are made safe before they become names.
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, TextIO

from .eventdata import DataList, around_data
from .jobs import Job, dumps

DEFAULT_LAYOUT: Final = "event-{event_id}-{job}"
FIELDS: Final = ("event_id", "source", "job", "transaction", "proposal", "instrument", "submitter", "date")
NOTIFICATION_FILE: Final = "notification.json"
METADATA_FILE: Final = "metadata.json"
_UNSAFE: Final = re.compile(r"[^\w.+=@-]")  # \w is Unicode-aware: names a person can read
_FIELD_LIMIT: Final = 64
# Linux's NAME_MAX is 255 bytes; a name already taken gets "-" and the 32-character job id.
NAME_BYTES: Final = 255 - 33
_TRANSACTION_FIELDS: Final = {
    "Transactions._id": "transaction",
    "Transactions.submitter": "submitter",
    "Transactions.proposal": "proposal",
    "Transactions.instrument": "instrument",
}


def check_layout(template: str) -> str:
    """Return ``template`` if it names a relative path from known fields, else ``ValueError``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{template!r} is not a layout: {exc}") from None
    for _text, name, spec, conversion in parsed:
        if spec or conversion:
            # {event_id:>300} would pad a name past what a file system holds: fields only.
            raise ValueError(f"{{{name}}} takes no format spec or conversion; write plain {{{name}}}")
    names = [name for _text, name, _spec, _conv in parsed if name is not None]
    unknown = sorted(set(names) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; the layout takes {', '.join(FIELDS)}")
    rendered = template.format(**dict.fromkeys(FIELDS, "x"))
    parts = rendered.split("/")
    if rendered.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{template!r} must be a relative path without empty, '.' or '..' parts")
    if parts[0].startswith(".attempt-"):
        raise ValueError("names starting with .attempt- are the service's own")
    return template


def render(template: str, job: Job) -> str:
    """The job's download directory relative to the root, every field value made safe."""
    meta = transaction_metadata(job.event or {})
    values = {
        "event_id": job.event_id,
        "source": job.source,
        "job": job.id[:12],
        "date": datetime.fromtimestamp(job.created_at, UTC).strftime("%Y-%m-%d"),
        **{name: meta.get(name) for name in ("transaction", "proposal", "instrument", "submitter")},
    }
    rendered = template.format(**{name: _safe(value) for name, value in values.items()})
    return "/".join(_fit(part) for part in rendered.split("/"))


def _fit(part: str) -> str:
    """A directory name cut to fit NAME_MAX in bytes (between characters, never inside one).

    Room is left for the ``-<job id>`` that a name already taken gets.
    """
    data = part.encode("utf-8")
    if len(data) <= NAME_BYTES:
        return part
    return data[:NAME_BYTES].decode("utf-8", "ignore").rstrip(".") or "unknown"


def _safe(value: Any) -> str:
    """One path component from any value: no separators, no dot names, bounded length."""
    text = "unknown" if value is None or value == "" else str(value)
    text = _UNSAFE.sub("_", text)[:_FIELD_LIMIT].strip(".")
    return text or "unknown"


def transaction_metadata(event: Mapping[str, Any]) -> dict[str, Any]:
    """The transaction's id, submitter, proposal, instrument and key/value pairs in ``data``."""
    data = event.get("data")
    meta: dict[str, Any] = {name: None for name in _TRANSACTION_FIELDS.values()}
    pairs: dict[str, Any] = {}
    for obj in data if isinstance(data, (list, DataList)) else []:
        if not isinstance(obj, Mapping):
            continue
        table = obj.get("destinationTable")
        if table in _TRANSACTION_FIELDS:
            meta[_TRANSACTION_FIELDS[table]] = obj.get("value")
        elif table == "TransactionKeyValue" and isinstance(obj.get("key"), str):
            pairs[obj["key"]] = obj.get("value")
    meta["key_values"] = pairs
    return meta


def write_beside(directory: str, job: Job) -> None:
    """Write ``notification.json`` and ``metadata.json`` into the attempt's directory."""
    event = dict(job.event or {})
    metadata = {
        **transaction_metadata(event),
        "event_id": job.event_id,
        "source": job.source,
        "type": job.type,
        "files": [],  # written one file at a time, below
    }
    with open(os.path.join(directory, NOTIFICATION_FILE), "w", encoding="utf-8") as handle:
        _write_indented(handle, event)
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as handle:
        # As json.dump(indent=2) would write it with every file's Cartd object in "files" (the
        # last key), but without a dict of each of them all at once: 30 MB for 76,000 files.
        head, tail = dumps(metadata, indent=2).rsplit("[]", 1)
        handle.write(head + ("[" if job.files else "[]"))
        for index, file in enumerate(job.files):
            item = json.dumps(file.as_cartd(), ensure_ascii=False, indent=2).replace("\n", "\n    ")
            handle.write(("," if index else "") + "\n    " + item)
        handle.write(("\n  ]" if job.files else "") + tail + "\n")


def _write_indented(handle: TextIO, event: Mapping[str, Any]) -> None:
    """Write ``dumps(event, indent=2)`` and a newline, a large ``data`` one item at a time."""
    data = event.get("data")
    if not isinstance(data, DataList):
        handle.write(dumps(event, indent=2) + "\n")
        return
    head, tail = around_data(event, indent=2)
    handle.write(head + ("[" if data else "[]"))
    for index, item in enumerate(data):
        handle.write(("," if index else "") + "\n    " + dumps(item, indent=2).replace("\n", "\n    "))
    handle.write(("\n  ]" if data else "") + tail + "\n")


def apply_umask(directory: str, umask: int) -> None:
    """Give the tree the modes ``umask`` allows (staging made it private while it was written)."""
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask
    os.chmod(directory, dir_mode)
    for parent, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(parent, name), dir_mode, follow_symlinks=False)
        for name in files:
            os.chmod(os.path.join(parent, name), file_mode, follow_symlinks=False)
