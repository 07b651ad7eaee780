"""One file of a cart: its Cartd id, its safe relative path and the checksum it must match."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInputError, NoFilesError

# shake_* digests have no fixed length, so a hashsum could not be checked against them.
SUPPORTED_HASHTYPES = frozenset(
    name for name in hashlib.algorithms_guaranteed if not name.startswith("shake_")
)
_HEX = re.compile(r"[0-9a-f]+")
_DIGITS = re.compile(r"[0-9]+")

CartdFile = dict[str, str]
YieldFiles = Callable[[], Iterator[CartdFile]]


@dataclass(frozen=True)
class CartFile:
    """A file to put in a cart, already validated: ``path`` is relative, normalised, safe."""

    id: str
    path: str
    hashtype: str
    hashsum: str

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
            raise InvalidInputError(f"cart file {obj!r}: {field} {why}", field=field)
        return file


def join_cart_path(subdir: str, name: str) -> str:
    """Join ``subdir`` and ``name`` into a relative POSIX path, or raise ``ValueError``.

    Empty and ``.`` components are dropped, so ``a/b/`` + ``foo.txt`` is ``a/b/foo.txt`` and an
    empty subdir gives just the name; ``..`` and absolute paths are refused, never resolved.
    """
    if subdir.startswith("/") or name.startswith("/"):
        raise ValueError("is an absolute path")
    parts = [part for part in f"{subdir}/{name}".split("/") if part not in ("", ".")]
    if ".." in parts:
        raise ValueError("has a '..' component")
    if "\x00" in name or "\x00" in subdir:
        raise ValueError("contains a NUL character")
    if not parts:
        raise ValueError("is empty")
    return "/".join(parts)


def collect_files(
    entries: Iterable[tuple[str, Any, Any, Any, Mapping[str, Any]]],
    error: type[InvalidInputError],
    what: str,
) -> list[CartFile]:
    """Validate ``(label, id, name, subdir, obj)`` entries, raising once with every problem.

    ``label`` names the object in messages (its index or id), ``error`` is the class raised.
    Two files landing on the same path are refused: the second would overwrite the first.
    """
    files: list[CartFile] = []
    problems: list[str] = []
    first: tuple[str, str] | None = None
    seen: dict[str, str] = {}
    for label, file_id, name, subdir, obj in entries:
        mine: list[tuple[str, str]] = []
        file = _build(file_id, name, subdir, obj, mine)
        if file is not None and file.path in seen:
            mine.append(("path", f"{file.path!r} repeats the path of {seen[file.path]}"))
        for field, why in mine:
            problems.append(f"{label}: {field} {why}")
            first = first or (label, field)
        if file is not None and not mine:
            seen[file.path] = label
            files.append(file)
    if first is not None:
        raise error(f"invalid {what}: " + "; ".join(problems), object=first[0], field=first[1])
    if not files:
        raise NoFilesError(f"the {what} lists no files", field="files")
    return files


def as_yield_files(files: Iterable[CartFile]) -> YieldFiles:
    """Wrap validated files in the callable ``CartAPI.setup_cart`` takes (the upstream shape)."""
    frozen = tuple(files)

    def yield_files() -> Iterator[CartdFile]:
        return (file.as_cartd() for file in frozen)

    return yield_files


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
    return CartFile(ident, path, hashtype, hashsum)


def _file_id(value: Any, problems: list[tuple[str, str]]) -> str | None:
    # Ids end up in archive-interface URLs, so only plain non-negative integers are taken.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and _DIGITS.fullmatch(value):
        return value
    problems.append(("_id", "is missing" if value is None else f"is not a file id: {value!r}"))
    return None


def _path(name: Any, subdir: Any, problems: list[tuple[str, str]]) -> str | None:
    if not isinstance(name, str) or not name:
        problems.append(("name", "is missing" if name is None else f"is not a name: {name!r}"))
        return None
    if subdir is None:
        subdir = ""
    if not isinstance(subdir, str):
        problems.append(("subdir", f"is not a string: {subdir!r}"))
        return None
    try:
        return join_cart_path(subdir, name)
    except ValueError as exc:
        problems.append(("path", f"{subdir!r} + {name!r} {exc}"))
        return None


def _checksum(hashtype: Any, hashsum: Any, problems: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    if not isinstance(hashtype, str) or hashtype.lower() not in SUPPORTED_HASHTYPES:
        problems.append(("hashtype", f"is not a supported hash: {hashtype!r}"))
        return None, None
    hashtype = hashtype.lower()
    expected = hashlib.new(hashtype).digest_size * 2
    if not isinstance(hashsum, str) or len(hashsum) != expected or not _HEX.fullmatch(hashsum.lower()):
        problems.append(("hashsum", f"is not a {hashtype} hex digest: {hashsum!r}"))
        return hashtype, None
    return hashtype, hashsum.lower()
