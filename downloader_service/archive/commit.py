"""Moving a verified staged tree into place: planned before anything moves, undone on failure.

When the target is new, the staged tree is renamed onto it. Otherwise every conflict is
found first (:func:`merge`): a symbolic link on the way, or a file where a directory must go
(or the reverse), refuses the whole download; a file already there with other content is
kept beside the new one as ``name.~1~`` (``~2~``, ... as GNU ``cp --backup=numbered`` does).
The moves go through directory descriptors opened with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..cartfile import NAME_MAX
from ..errors import (
    ECHO_CHARS,
    LocalStorageError,
    echo,
    shorten,
)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_COMPARE_CHUNK = 256 << 10  # read size when comparing a file already there with the new one


def rename_new(staged_root: Path, final_root: Path) -> bool:
    """Rename the staged tree onto a target that was missing; False if one appeared meanwhile."""
    try:
        os.rename(staged_root, final_root)  # never follows a link: one there fails with ENOTDIR
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            return False
        raise
    return True


@dataclass(frozen=True)
class _Move:
    """One staged file to move to ``name`` (relative to the location)."""

    name: str
    staged: Path
    backup: str | None  # what to rename the different file already at ``name`` to, in its directory


def merge(location: Path, staged: Mapping[str, Path]) -> None:
    """Move staged files into an existing tree: every conflict is found first, then all move.

    The moves go through directory descriptors opened with ``O_NOFOLLOW`` from ``location``
    down, so even a link planted after the plan is never followed; if any move fails, those
    done are undone and the tree is as it was.
    """
    moves = _plan(location, staged)
    # The caller chose location, links and all; below it nothing is followed.
    with _Moves(os.open(location, _DIR_FLAGS & ~os.O_NOFOLLOW)) as transaction:
        try:
            for move in moves:
                transaction.apply(move)
        except OSError as exc:
            transaction.rollback()
            blocked = exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR)
            raise LocalStorageError(
                f"cannot put the cart into place under {location}: {shorten(str(exc), ECHO_CHARS)}",
                path=str(location),
                retryable=not blocked,
            ) from exc


def _plan(location: Path, staged: Mapping[str, Path]) -> list[_Move]:
    """Check where each staged file goes, raising before anything has moved."""
    names = sorted(staged)
    taken = set(names)  # names a backup must not take: files and directories of this cart
    for name in names:
        taken.update(parents(name))
    directories: dict[str, bool] = {}  # directory -> it exists (False: to be made)
    moves = []
    for name in names:
        parent = name.rpartition("/")[0]
        exists = _directory_exists(location, parent, directories)
        backup = _backup_name(location, name, staged[name], taken) if exists else None
        moves.append(_Move(name, staged[name], backup))
    return moves


def _directory_exists(location: Path, directory: str, known: dict[str, bool]) -> bool:
    """Whether ``directory`` exists as a real directory; raise if something else is there."""
    if directory in known:
        return known[directory]
    exists = True
    for parent in (*parents(directory), directory):
        if parent in known:
            exists = known[parent]
            continue
        if exists:
            mode = _lstat_mode(location, parent)
            if mode is not None and not stat.S_ISDIR(mode):
                _blocked(parent, mode, "a directory")
            exists = mode is not None
        known[parent] = exists
    return exists


def _backup_name(location: Path, name: str, staged: Path, taken: set[str]) -> str | None:
    """None if ``name`` is free or holds the same bytes; else a free ``name.~N~`` to keep it as."""
    mode = _lstat_mode(location, name)
    if mode is None:
        return None
    if not stat.S_ISREG(mode):
        _blocked(name, mode, "a file")
    if _same_content(location / name, staged):
        return None
    number = 1
    while f"{name}.~{number}~" in taken or _lstat_mode(location, f"{name}.~{number}~") is not None:
        number += 1
    backup = f"{name.rpartition('/')[2]}.~{number}~"
    if len(backup.encode("utf-8")) > NAME_MAX:
        raise LocalStorageError(
            f"{echo(name)} is already there with other content, and its name is too long for "
            "a backup beside it: move it away and download again",
            path=name,
            retryable=False,
        )
    return backup


@dataclass(frozen=True)
class _Done:
    """A change made in the directory ``parts``: ``made`` is new there, ``was`` it before.

    ``was`` is None for a directory that was made, a name in the same directory for a backup,
    a staged path for a file moved in.
    """

    parts: tuple[str, ...]
    made: str
    was: str | Path | None


class _Moves:
    """Directories made and files renamed below the descriptor ``top``, undone on failure."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.done: list[_Done] = []

    def __enter__(self) -> _Moves:
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.close(self.top)

    def apply(self, move: _Move) -> None:
        """Make the missing directories, keep the backup if planned, move the file in."""
        directory, _, leaf = move.name.rpartition("/")
        parts = tuple(directory.split("/"))
        fd = self._open(parts, make=True)
        try:
            if move.backup is not None:
                os.rename(leaf, move.backup, src_dir_fd=fd, dst_dir_fd=fd)
                self.done.append(_Done(parts, move.backup, leaf))
            os.rename(move.staged, leaf, dst_dir_fd=fd)
            self.done.append(_Done(parts, leaf, move.staged))
        finally:
            os.close(fd)

    def rollback(self) -> None:
        """Undo what was done, newest first, as far as it goes."""
        for done in reversed(self.done):
            with contextlib.suppress(OSError):
                fd = self._open(done.parts)
                try:
                    if done.was is None:
                        os.rmdir(done.made, dir_fd=fd)
                    elif isinstance(done.was, Path):
                        os.rename(done.made, done.was, src_dir_fd=fd)
                    else:
                        os.rename(done.made, done.was, src_dir_fd=fd, dst_dir_fd=fd)
                finally:
                    os.close(fd)
        self.done.clear()

    def _open(self, parts: tuple[str, ...], make: bool = False) -> int:
        """A descriptor of the directory ``parts`` below ``top``; ELOOP if one is a link."""
        fd = os.dup(self.top)
        try:
            for depth, part in enumerate(parts):
                if make:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, dir_fd=fd)
                        self.done.append(_Done(parts[:depth], part, None))
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd


def _lstat_mode(location: Path, name: str) -> int | None:
    """The ``st_mode`` of ``location/name`` itself (not a link's target), None if missing."""
    try:
        return os.lstat(location / name).st_mode
    except FileNotFoundError:
        return None


def _blocked(name: str, mode: int, needed: str) -> NoReturn:
    what = "a symbolic link" if stat.S_ISLNK(mode) else "a directory" if stat.S_ISDIR(mode) else "a file"
    if stat.S_ISLNK(mode):
        why = "the download never writes through a link"
    else:
        why = f"the cart needs {needed} there"
    raise LocalStorageError(
        f"cannot put the cart into place: {echo(name)} is {what} and {why}; "
        "move it away or download elsewhere",
        path=name,
        retryable=False,
    )


def _same_content(existing: Path, staged: Path, chunk: int = _COMPARE_CHUNK) -> bool:
    """Whether the regular file ``existing`` holds exactly the bytes of ``staged``."""
    fd = os.open(existing, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as old, open(staged, "rb") as new:
        if os.fstat(old.fileno()).st_size != os.fstat(new.fileno()).st_size:
            return False
        while (data := new.read(chunk)) == old.read(chunk):
            if not data:
                return True
        return False


def parents(path: str) -> Iterator[str]:
    """``a/b/c`` -> ``a``, ``a/b``."""
    index = path.find("/")
    while index != -1:
        yield path[:index]
        index = path.find("/", index + 1)
