"""One file of a cart: its Cartd id, its safe relative path and the checksum it must match."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError, NoFilesError, echo

# shake_* digests have no fixed length, so a hashsum could not be checked against them.
SUPPORTED_HASHTYPES = frozenset(
    name for name in hashlib.algorithms_guaranteed if not name.startswith("shake_")
)
# One string per hash type, and its digest's length in hex digits: a download of many files
# shares these instead of holding a lower-cased copy per file.
_HASH_TYPES = {name: (name, hashlib.new(name).digest_size * 2) for name in SUPPORTED_HASHTYPES}
_HEX = re.compile(r"[0-9a-f]+")
_DIGITS = re.compile(r"[0-9]+")

# Linux's limits, counted in bytes of the UTF-8 name: NAME_MAX for one path component and
# PATH_MAX for a whole path (with its terminating NUL).
NAME_MAX = 255
PATH_MAX = 4096
# A file's relative path may take 3 KiB of PATH_MAX; the remaining KiB is for the download
# root and for ``<filename>/`` twice, once inside the staging directory ``.<filename>.part-*``.
MAX_PATH_BYTES = 3072
# Components in a file's relative path. os.makedirs, shutil.rmtree (one open descriptor per
# level) and Cartd's own staging recurse once per level: near 1,000 levels they fail.
MAX_DEPTH = 128
# An invalid document's error lists this many problems at most, in this many characters at
# most, then says how many more there are.
PROBLEMS_SHOWN = 10
PROBLEMS_CHARS = 3000

CartdFile = dict[str, str]
YieldFiles = Callable[[], Iterator[CartdFile]]


@dataclass(frozen=True, slots=True)
class CartFile:
    """A file to put in a cart, already validated: ``path`` is relative, normalised, safe."""

    id: str
    path: str
    hashtype: str
    hashsum: str
    # The metadata's ``size`` when it gives a sane one: advice (the wait for staging, a quick
    # check of a file already in place), not identity, so two files compare without it.
    size: int | None = dataclasses.field(default=None, compare=False)

    def as_cartd(self) -> CartdFile:
        """Return the object Cartd expects in its ``fileids`` list."""
        return {"id": self.id, "path": self.path, "hashtype": self.hashtype, "hashsum": self.hashsum}

    @classmethod
    def from_cartd(cls, obj: Mapping[str, Any]) -> CartFile:
        """Validate a Cartd ``fileids`` object (as a ``yield_files`` callable yields it)."""
        problems: list[tuple[str, str]] = []
        file = _build(obj.get("id"), obj.get("path"), None, obj, problems)
        if file is None:
            field, why = problems[0]
            raise InvalidInputError(f"cart file {echo(obj)}: {field} {why}", field=field)
        return file


def join_cart_path(subdir: str, name: str) -> str:
    """Join ``subdir`` and ``name`` into a relative POSIX path, or raise ``ValueError``.

    Empty and ``.`` components are dropped, so ``a/b/`` + ``foo.txt`` is ``a/b/foo.txt`` and an
    empty subdir gives just the name; ``..`` and absolute paths are refused, never resolved.
    A ``/`` inside ``name`` separates components, as it did upstream. The result must also
    pass :func:`check_path`.
    """
    if subdir.startswith("/") or name.startswith("/"):
        raise ValueError("is an absolute path")
    parts = [part for part in f"{subdir}/{name}".split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError("has a '..' component")
    if not parts:
        raise ValueError("is empty")
    path = "/".join(parts)
    check_path(path)
    return name if path == name else path  # the caller's string when it is the same


def check_path(path: str) -> None:
    """Raise ``ValueError`` unless every file system we write to can hold ``path`` as it is.

    It must be text that encodes as UTF-8 (a lone surrogate, such as ``os.fsdecode`` makes of
    an undecodable byte, would be written as that raw byte), hold no NUL, and fit Linux's
    limits: :data:`NAME_MAX` bytes per component, :data:`MAX_PATH_BYTES` and
    :data:`MAX_DEPTH` components in all. Other control characters are legal in POSIX names
    and are kept; messages show them escaped.
    """
    if "\x00" in path:
        raise ValueError("contains a NUL character")
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"is not valid Unicode ({exc.reason} at character {exc.start})") from None
    if size > MAX_PATH_BYTES:
        raise ValueError(f"is {size} bytes long in UTF-8, more than the {MAX_PATH_BYTES} allowed")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise ValueError(f"is {len(parts)} components deep, more than the {MAX_DEPTH} allowed")
    for part in parts:
        if (length := len(part.encode("utf-8"))) > NAME_MAX:
            raise ValueError(f"has a component of {length} bytes in UTF-8, more than NAME_MAX ({NAME_MAX})")


def collect_files(
    entries: Iterable[tuple[Any, Any, Any, Any, Mapping[str, Any]]],
    error: type[InvalidInputError],
    what: str | Callable[[], str],
    describe: Callable[[Any, str | None], str] | None = None,
) -> list[CartFile]:
    """Validate ``(key, id, name, subdir, obj)`` entries, raising once with every problem.

    ``key`` names the object in messages: ``describe(key, id)`` makes its label (the id as
    text, or None) when a problem is found, or ``str(key)`` without ``describe``; no label is
    made for a file without a problem. ``what`` (or what it returns, asked only for an error)
    names the document, ``error`` is the class raised. Two files landing on the same path are
    refused: the second would overwrite the first; so are a file ``a`` and a file ``a/b``:
    ``a`` cannot be both a file and a directory. Each object's own problems come first, then
    these conflicts between files. The message lists the first problems
    (:data:`PROBLEMS_SHOWN`, in :data:`PROBLEMS_CHARS`) and counts the rest.
    """
    files: list[CartFile] = []
    check_files(entries, error, what, describe, files.append)
    return files


def check_files(
    entries: Iterable[tuple[Any, Any, Any, Any, Mapping[str, Any]]],
    error: type[InvalidInputError],
    what: str | Callable[[], str],
    describe: Callable[[Any, str | None], str] | None,
    take: Callable[[CartFile], None],
) -> int:
    """:func:`collect_files`, handing each valid file to ``take`` as it comes; how many there were.

    Only each file's path, id and key are kept (for the conflicts between files), not the
    files: a caller that encodes each file as it comes never holds them all.
    ``take`` sees files that a later problem may still refuse.
    """
    paths: list[str] = []  # each valid file's path, id and key, in step
    ids: list[str] = []
    keys: list[Any] = []
    problems = _Problems()

    def label(key: Any, file_id: str | None) -> str:
        return describe(key, file_id) if describe is not None else str(key)

    for key, file_id, name, subdir, obj in entries:
        mine: list[tuple[str, str]] = []
        file = _build(file_id, name, subdir, obj, mine)
        for field, why in mine:
            problems.add(label(key, None if file_id is None else echo(file_id)), field, why)
        if file is not None:
            take(file)
            paths.append(file.path)
            ids.append(file.id)
            keys.append(key)
    for index, why in _conflicts(paths, lambda head: label(keys[head], ids[head])):
        problems.add(label(keys[index], ids[index]), "path", why)
    document = what if isinstance(what, str) else what()
    problems.raise_if_any(error, f"invalid {document}")
    if not paths:
        raise NoFilesError(f"the {document} lists no files", field="files")
    return len(paths)


def as_yield_files(files: Iterable[CartFile]) -> YieldFiles:
    """Wrap validated files in the callable ``CartAPI.setup_cart`` takes (the upstream shape)."""
    return _YieldCartFiles(files)


def validated_files(yield_files: YieldFiles) -> Sequence[CartFile]:
    """The files ``yield_files`` stands for, each checked by :meth:`CartFile.from_cartd`.

    Raises on the first bad one. Files :func:`as_yield_files` wrapped are checked and given
    back as they are (a ``CartFile`` may be made by hand); anything else yields Cartd objects,
    each made into a new ``CartFile``.
    """
    if isinstance(yield_files, _YieldCartFiles):
        for file in yield_files.files:
            CartFile.from_cartd(file.as_cartd())
        return yield_files.files
    return [CartFile.from_cartd(obj) for obj in yield_files()]


class _YieldCartFiles:
    """What :func:`as_yield_files` returns: called, it yields each file's Cartd object."""

    __slots__ = ("files",)

    def __init__(self, files: Iterable[CartFile]) -> None:
        self.files = tuple(files)

    def __call__(self) -> Iterator[CartdFile]:
        return (file.as_cartd() for file in self.files)


class _Problems:
    """The problems found in a document: the first few spelled out, the rest only counted."""

    def __init__(self) -> None:
        self.shown: list[str] = []
        self.chars = 0
        self.count = 0
        self.first: tuple[str, str] | None = None  # (label, field) of the first problem

    def add(self, label: str, field: str, why: str) -> None:
        line = f"{label}: {field} {why}"
        fits = len(self.shown) < PROBLEMS_SHOWN and self.chars + len(line) <= PROBLEMS_CHARS
        if fits and len(self.shown) == self.count:  # shown ones are the first, without a gap
            self.shown.append(line)
            self.chars += len(line)
        self.count += 1
        self.first = self.first or (label, field)

    def raise_if_any(self, error: type[InvalidInputError], heading: str) -> None:
        if self.first is None:
            return
        more = self.count - len(self.shown)
        tail = f"; and {more} more problem(s)" if more else ""
        raise error(
            f"{heading}: " + "; ".join(self.shown) + tail,
            object=self.first[0],
            field=self.first[1],
            problem_count=self.count,
        )


def _conflicts(paths: Sequence[str], named: Callable[[int], str]) -> Iterator[tuple[int, str]]:
    """``(index, why)`` for each path that repeats another, or needs another as a directory.

    With ``/`` mapped to NUL, which no path holds, sorting puts a path's repeats and then the
    paths under ``a/`` right after ``a``: one pass in sorted order finds every conflict in
    O(n log n) time, holding only the sorted indexes. The sort is stable, so of two files on
    one path the first given is the one the other repeats. ``named(index)`` names a file.
    """
    head = -1  # the path the following ones may repeat or go below
    head_key = ""
    for index in sorted(range(len(paths)), key=lambda at: paths[at].replace("/", "\0")):
        key = paths[index].replace("/", "\0")
        if head >= 0 and key == head_key:
            yield index, f"{echo(paths[index])} repeats the path of {named(head)}"
        elif head >= 0 and key.startswith(head_key + "\0"):
            needs = f"{echo(paths[index])} needs {echo(paths[head])} as a directory"
            yield index, f"{needs}, but it is the file of {named(head)}"
        else:
            head, head_key = index, key


def _build(
    file_id: Any,
    name: Any,
    subdir: Any,
    obj: Mapping[str, Any],
    problems: list[tuple[str, str]],
) -> CartFile | None:
    """Build one CartFile, appending ``(field, why)`` to ``problems`` for each defect."""
    ident = _file_id(file_id, problems)
    path = _path(name, subdir, problems)
    hashtype, hashsum = _checksum(obj.get("hashtype"), obj.get("hashsum"), problems)
    if problems or ident is None or path is None or hashtype is None or hashsum is None:
        return None
    size = obj.get("size")
    known = isinstance(size, int) and not isinstance(size, bool) and size >= 0
    return CartFile(ident, path, hashtype, hashsum, size if known else None)


def _file_id(value: Any, problems: list[tuple[str, str]]) -> str | None:
    # Ids end up in archive-interface URLs, so only plain non-negative integers are taken.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return value
    problems.append(("_id", "is missing" if value is None else f"is not a file id: {echo(value)}"))
    return None


def _path(name: Any, subdir: Any, problems: list[tuple[str, str]]) -> str | None:
    if not isinstance(name, str) or not name:
        problems.append(("name", "is missing" if name is None else f"is not a name: {echo(name)}"))
        return None
    if subdir is None:
        subdir = ""
    if not isinstance(subdir, str):
        problems.append(("subdir", f"is not a string: {echo(subdir)}"))
        return None
    try:
        return join_cart_path(subdir, name)
    except ValueError as exc:
        problems.append(("path", f"{echo(subdir)} + {echo(name)} {exc}"))
        return None


def _checksum(hashtype: Any, hashsum: Any, problems: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    if not isinstance(hashtype, str) or hashtype.lower() not in SUPPORTED_HASHTYPES:
        problems.append(("hashtype", f"is not a supported hash: {echo(hashtype)}"))
        return None, None
    hashtype, expected = _HASH_TYPES[hashtype.lower()]
    lowered = hashsum.lower() if isinstance(hashsum, str) else ""
    if not isinstance(hashsum, str) or len(hashsum) != expected or not _HEX.fullmatch(lowered):
        problems.append(("hashsum", f"is not a {hashtype} hex digest: {echo(hashsum)}"))
        return hashtype, None
    return hashtype, hashsum if lowered == hashsum else lowered
