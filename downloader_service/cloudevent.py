"""Files from a Pacifica Notifications CloudEvent (0.1 as Notifications sends it, or 1.0)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from .cartfile import SUPPORTED_HASHTYPES, CartFile, YieldFiles, as_yield_files, collect_files
from .errors import InvalidEventError, echo


class CloudEvent:
    """Turn an event's ``data`` list into the files of a cart."""

    @staticmethod
    def files(cloudevent: Mapping[str, Any]) -> list[CartFile]:
        """Validate the event and return its files, or raise :class:`InvalidEventError`.

        ``data`` is a flat list of metadata objects; those with ``destinationTable: "Files"``
        are files. Every problem is reported at once, each naming the object's index.
        """
        if not isinstance(cloudevent, Mapping):
            raise InvalidEventError(
                f"a CloudEvent is a JSON object, not {type(cloudevent).__name__}", field="event"
            )
        data = cloudevent.get("data")
        if not isinstance(data, list):
            got = "missing" if data is None else f"a {type(data).__name__}"
            raise InvalidEventError(
                f"event {echo(event_id(cloudevent))}: data must be a list of metadata objects, got {got}",
                field="data",
            )
        return collect_files(_entries(data), InvalidEventError, f"event {echo(event_id(cloudevent))}")

    @staticmethod
    def loads(text: str | bytes) -> Any:
        """Parse an event's JSON, keeping of each Files object only what a download reads.

        Each ``destinationTable: "Files"`` object becomes a :class:`FileObject` as the
        decoder makes it (``_id``, ``name``, ``subdir``, ``hashtype``, ``hashsum``, ``size``),
        so a large event never holds a dict of every key per file: with 76,000 files (the most
        a 10 MiB body holds) the parsed event takes about 300 bytes a file instead of 540.
        Invalid JSON raises ``ValueError``, as ``json.loads`` does.
        """
        return json.loads(text, object_hook=_slim)

    @staticmethod
    def yield_files(cloudevent: Mapping[str, Any]) -> YieldFiles:
        """Return a callable yielding the Cartd file objects of the event (upstream API).

        The event is validated now, so a bad event fails here and not halfway through a POST.
        """
        return as_yield_files(CloudEvent.files(cloudevent))


def event_id(cloudevent: Mapping[str, Any]) -> str:
    """The event's id under its 1.0 (``id``) or 0.1 (``eventID``) name, for messages."""
    return str(cloudevent.get("id", cloudevent.get("eventID", "<no id>")))


def _entries(data: list[Any]) -> Iterator[tuple[str, Any, Any, Any, Mapping[str, Any]]]:
    for index, obj in enumerate(data):
        if not isinstance(obj, Mapping) or obj.get("destinationTable") != "Files":
            continue
        label = f"data[{index}]" + (f" (_id {echo(obj['_id'])})" if "_id" in obj else "")
        yield label, obj.get("_id"), obj.get("name"), obj.get("subdir"), obj


# What a download reads of a Files object: the key, and the slot of FileObject holding it.
_FILE_SLOTS = {
    "destinationTable": "table",
    "_id": "id",
    "name": "name",
    "subdir": "subdir",
    "hashtype": "hashtype",
    "hashsum": "hashsum",
    "size": "size",
}
_ABSENT: Any = object()
# One string for the table's name and for each hash type, instead of a copy per file.
_SHARED = {name: name for name in (*SUPPORTED_HASHTYPES, "Files")}


class FileObject(Mapping[str, Any]):
    """A Files metadata object reduced to the keys a download reads (:meth:`CloudEvent.loads`).

    It is a read-only mapping, so everything that takes an event's objects takes it.
    """

    __slots__ = tuple(_FILE_SLOTS.values())

    def __init__(self, obj: Mapping[str, Any]) -> None:
        for key, slot in _FILE_SLOTS.items():
            value = obj.get(key, _ABSENT)
            setattr(self, slot, _SHARED.get(value, value) if isinstance(value, str) else value)

    def __getitem__(self, key: str) -> Any:
        slot = _FILE_SLOTS.get(key)
        value = _ABSENT if slot is None else getattr(self, slot)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (key for key, slot in _FILE_SLOTS.items() if getattr(self, slot) is not _ABSENT)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"FileObject({dict(self)!r})"


def _slim(obj: dict[str, Any]) -> Any:
    return FileObject(obj) if obj.get("destinationTable") == "Files" else obj
