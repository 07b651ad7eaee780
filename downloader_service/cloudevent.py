"""Files from a Pacifica Notifications CloudEvent (0.1 as Notifications sends it, or 1.0)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

from .cartfile import SUPPORTED_HASHTYPES, CartFile, YieldFiles, as_yield_files, check_files, collect_files
from .errors import InvalidEventError, echo
from .jsonstream import JsonWindow


class CloudEvent:
    """Turn an event's ``data`` list into the files of a cart."""

    @staticmethod
    def files(cloudevent: Mapping[str, Any]) -> list[CartFile]:
        """Validate the event and return its files, or raise :class:`InvalidEventError`.

        ``data`` is a flat list (or another sequence, not text) of metadata objects; those
        with ``destinationTable: "Files"`` are files. Every problem is reported at once, each
        naming the object's index.
        """
        files: list[CartFile] = []
        CloudEvent.check_files(cloudevent, files.append)
        return files

    @staticmethod
    def check_files(cloudevent: Mapping[str, Any], take: Callable[[CartFile], None]) -> int:
        """Validate the event as :meth:`files` does, handing each file to ``take`` as it comes.

        Returns how many files there are; raises as :meth:`files` does (``take`` may have seen
        files by then). Without a list of the files, an event of many is checked in little
        memory when ``take`` keeps less than the file.
        """
        if not isinstance(cloudevent, Mapping):
            raise _not_an_object(cloudevent)
        what = f"event {echo(event_id(cloudevent))}"
        data = cloudevent.get("data")
        if not isinstance(data, Sequence) or isinstance(data, (str, bytes, bytearray)):
            raise _data_not_a_list(what, _kind(data))
        return check_files(_entries(data), InvalidEventError, what, _label, take)

    @staticmethod
    def read_files(source: IO[str] | IO[bytes]) -> list[CartFile]:
        """Read an event's JSON from ``source`` and return its files, as :meth:`files` would.

        The text is read a window at a time and each object of ``data`` is decoded, checked
        and let go in turn: neither the text nor the event is ever held whole, only the files.
        ``source`` is a text file, or a binary one holding UTF-8. Malformed JSON raises
        ``ValueError`` (``UnicodeDecodeError`` for bytes that are not UTF-8), as ``json.load``
        does; an event that is not valid raises :class:`InvalidEventError`. Keys other than
        ``id``/``eventID`` and ``data`` are read and dropped; an event with two ``data`` keys
        is refused.
        """
        header: dict[str, Any] = {}

        def what() -> str:
            return f"event {echo(event_id(header))}"

        entries = _read_entries(JsonWindow(source.read), header, what)
        return collect_files(entries, InvalidEventError, what, _label)

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


def _entries(data: Sequence[Any]) -> Iterator[tuple[int, Any, Any, Any, Mapping[str, Any]]]:
    for index, obj in enumerate(data):
        if isinstance(obj, Mapping) and obj.get("destinationTable") == "Files":
            yield index, obj.get("_id"), obj.get("name"), obj.get("subdir"), obj


def _read_entries(
    window: JsonWindow, header: dict[str, Any], what: Callable[[], str]
) -> Iterator[tuple[int, Any, Any, Any, Mapping[str, Any]]]:
    """:func:`_entries` of the event in ``window``, each ``data`` object decoded in its turn."""
    if window.peek() != "{":
        event = window.value()
        window.end()
        raise _not_an_object(event)
    data = _kind(None)  # "list", or what it was instead of one
    for key in window.members():
        if key != "data":
            value = window.value()
            if key in ("id", "eventID"):
                header[key] = value
            continue
        if data != _kind(None):
            raise InvalidEventError(f"{what()}: data is given twice", field="data")
        if window.peek() != "[":
            data = _kind(window.value())
            continue
        data = "list"
        for index in window.items():
            obj = window.value()
            if isinstance(obj, dict) and obj.get("destinationTable") == "Files":
                yield index, obj.get("_id"), obj.get("name"), obj.get("subdir"), obj
    window.end()
    if data != "list":
        raise _data_not_a_list(what(), data)


def _not_an_object(event: Any) -> InvalidEventError:
    return InvalidEventError(f"a CloudEvent is a JSON object, not {type(event).__name__}", field="event")


def _kind(data: Any) -> str:
    """What ``data`` is, for a message: "missing" (absent or null), or "a <type>"."""
    return "missing" if data is None else f"a {type(data).__name__}"


def _data_not_a_list(what: str, got: str) -> InvalidEventError:
    return InvalidEventError(f"{what}: data must be a list of metadata objects, got {got}", field="data")


def _label(index: int, file_id: str | None) -> str:
    """How a message names the object at ``data[index]``, with its ``_id`` if it has one."""
    return f"data[{index}]" + ("" if file_id is None else f" (_id {file_id})")


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
