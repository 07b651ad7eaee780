"""An event's ``data`` list kept as compact JSON text, never as a Python object per item.

The largest event a 10 MiB body admits lists 76,646 file objects: parsed whole, its ``data``
took ~55 MB of dicts in the intake, and the worker parsed the stored event whole again to
write ``notification.json``. Read with :class:`~downloader_service.jsonstream.JsonWindow`
instead, each item is decoded, encoded again as the store's compact JSON
(:func:`~.jobs.dumps`) and let go; the text is kept in chunks of :data:`CHUNK` items, and
whatever reads the list again (the files' check, the stored row, its digest,
``notification.json``, the transaction's metadata) walks it a chunk's items at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..jsonstream import JsonWindow, reader
from .jobs import dumps

CHUNK = 1000  # items a chunk holds: ~130 KB of text for file objects
# Text up to this many characters (or bytes) is parsed whole by ``json.loads``: its ``data``
# stays a list, which every reader here takes as it takes a DataList.
SMALL = 1 << 16


class DataList(Sequence[Any]):
    """A JSON array's items as compact JSON text, in chunks (each the items joined by commas).

    Iterating decodes the items a chunk at a time; it compares equal to the list it holds.
    Indexing decodes the chunk holding the item.
    """

    __slots__ = ("chunks", "length")

    def __init__(self, chunks: list[str], length: int) -> None:
        self.chunks = chunks
        self.length = length

    @classmethod
    def read(cls, window: JsonWindow) -> DataList:
        """Read the array at hand in ``window``, one item decoded at a time."""
        chunks: list[str] = []
        batch: list[str] = []
        count = 0
        for _ in window.items():
            batch.append(dumps(window.value()))
            count += 1
            if len(batch) == CHUNK:
                chunks.append(",".join(batch))
                batch = []
        if batch:
            chunks.append(",".join(batch))
        return cls(chunks, count)

    def __iter__(self) -> Iterator[Any]:
        self._check()
        for chunk in self.chunks:
            yield from json.loads("[" + chunk + "]")

    def release(self) -> None:
        """Let the text go (it was stored): reading the list afterwards is an error."""
        self.chunks = []

    def _check(self) -> None:
        if self.length and not self.chunks:
            raise RuntimeError("this data list was released once its event was stored")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        if not -self.length <= index < self.length:
            raise IndexError("DataList index out of range")
        self._check()
        chunk, at = divmod(index % self.length, CHUNK)
        return json.loads("[" + self.chunks[chunk] + "]")[at]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DataList):
            return self.chunks == other.chunks
        if isinstance(other, list):
            return len(other) == self.length and list(self) == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable, as the list it stands for

    def __repr__(self) -> str:
        return f"DataList({self.length} items)"

    def pieces(self) -> Iterator[str]:
        """The array's compact JSON text, in pieces (``"".join`` them for the whole)."""
        self._check()
        yield "["
        for index, chunk in enumerate(self.chunks):
            yield "," + chunk if index else chunk
        yield "]"


class StoredDataList(DataList):
    """A stored event's ``data``, read again from the store each time it is walked.

    It holds none of it: the worker walks it twice when it publishes a download.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Callable[[], Iterator[Any]], length: int) -> None:
        super().__init__([], length)
        self._items = items

    def __iter__(self) -> Iterator[Any]:
        return self._items()

    def _check(self) -> None:
        return

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return list(self)[index]
        if not -self.length <= index < self.length:
            raise IndexError("DataList index out of range")
        return next(itertools.islice(self, index % self.length, None))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, DataList)):
            return len(other) == self.length and list(self) == list(other)
        return NotImplemented

    __hash__ = None

    def pieces(self) -> Iterator[str]:
        yield "["
        for index, item in enumerate(self):
            yield ("," if index else "") + dumps(item)
        yield "]"


def data_items(window: JsonWindow) -> Iterator[Any]:
    """Each item of the ``data`` array of the event object at hand, decoded in its turn."""
    for key in window.members():
        if key == "data" and window.peek() == "[":
            for _ in window.items():
                yield window.value()
            return
        window.value()


def stored_data(text: str, length: int) -> StoredDataList:
    """The ``data`` of an event's stored ``text``, read from the text anew each time it is walked."""
    return StoredDataList(lambda: data_items(JsonWindow(reader(text))), length)


def read_value(window: JsonWindow) -> Any:
    """The JSON value at hand, each ``data`` array of it read as a :class:`DataList`.

    That is the ``data`` of an object, or of the objects of an array (a batch); anything else
    is decoded as ``json.loads`` would. Of a key given twice the last value stands, as with ``json.loads``.
    """
    char = window.peek()
    if char == "{":
        doc: dict[str, Any] = {}
        for key in window.members():
            doc[key] = DataList.read(window) if key == "data" and window.peek() == "[" else window.value()
        return doc
    if char == "[":
        return [read_value(window) if window.peek() == "{" else window.value() for _ in window.items()]
    return window.value()


def loads(text: str | bytes, data: bool = False) -> Any:
    """:func:`read_value` of the whole of ``text``; ``ValueError`` if it is not one JSON value.

    With ``data``, the text is an event's data alone (a binary-mode body): an array of it is
    read as a :class:`DataList`. Bytes are UTF-8 (``UnicodeDecodeError`` if not; a byte order
    mark is refused, as by ``json.loads``).
    """
    if len(text) <= SMALL:
        # A few objects: as they are (no chunks), and faster.
        return json.loads(text.decode("utf-8") if isinstance(text, bytes) else text)
    if isinstance(text, bytes) and text.startswith(b"\xef\xbb\xbf"):
        raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 column 1 (char 0)")
    window = JsonWindow(reader(text))
    value = DataList.read(window) if data and window.peek() == "[" else read_value(window)
    window.end()
    return value


def pieces(record: Mapping[str, Any]) -> Iterator[str]:
    """``record``'s compact JSON (:func:`~.jobs.dumps`) in pieces, its ``data`` streamed."""
    data = record.get("data")
    if not isinstance(data, DataList):
        yield dumps(dict(record))
        return
    before, after = around_data(record)
    yield before
    yield from data.pieces()
    yield after


def around_data(record: Mapping[str, Any], indent: int | None = None) -> tuple[str, str]:
    """:func:`~.jobs.dumps` of ``record`` before and after its ``data`` value (the data left out)."""
    token = uuid.uuid4().hex  # stands for the data in the text around it: no sender can guess it
    before, after = dumps({**record, "data": token}, indent=indent).split(f'"{token}"')
    return before, after


def encode(record: Mapping[str, Any]) -> str:
    """``record``'s compact JSON, as :func:`~.jobs.dumps` writes it with ``data`` as a list."""
    return "".join(pieces(record))


def digest(record: Mapping[str, Any]) -> str:
    """sha256 (hex) of ``record``'s compact JSON."""
    sha = hashlib.sha256()
    for piece in pieces(record):
        sha.update(piece.encode("utf-8", "surrogatepass"))
    return sha.hexdigest()


@dataclass(frozen=True)
class StoredEvent:
    """An event's record as the job store keeps it: its compact JSON, and a digest.

    The digest is of the record without ``receivedmode``: the same event may come another way.
    """

    text: str
    digest: str

    @classmethod
    def of(cls, record: Mapping[str, Any]) -> StoredEvent:
        return cls(encode(record), event_digest(record))


def event_digest(record: Mapping[str, Any]) -> str:
    """sha256 of an event's record, without how it came (the same event may come another way)."""
    return digest({key: value for key, value in record.items() if key != "receivedmode"})
