"""The cart's tar: streamed member by member onto disk, refused if unsafe, verified by hash.

Nothing is held in memory beyond one chunk and one member's headers: a header record (pax
header, GNU long name) larger than :data:`MAX_HEADER_RECORD` is refused before it is read,
and tarfile's list of members is emptied as the stream goes. Files are written into a private
staging directory beside the target and only moved into place once *every* requested file
has arrived and matched its checksum, so a failed or interrupted download leaves nothing
that looks complete, and never touches files already at the target.

Moving into a target that already holds files is planned before anything moves (see
:func:`_plan`): a symbolic link on the way, or a file where a directory must go (or the
reverse), refuses the whole download. A file already there with other content is kept
beside the new one as ``name.~1~`` (``~2~``, ... as GNU ``cp --backup=numbered`` does).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from .cartfile import NAME_MAX, PATH_MAX, CartFile, check_path
from .errors import (
    ECHO_CHARS,
    DownloaderError,
    DownloadInterruptedError,
    HashMismatchError,
    InvalidInputError,
    LocalStorageError,
    MissingFileError,
    UnsafeArchiveError,
    echo,
    shorten,
)
from .progress import DownloadProgress

LOGGER = logging.getLogger(__name__)

# Bytes read, hashed and written at a time, and tarfile's stream buffer. Every chunk is a new
# bytes object, and glibc serves allocations of 128 KiB and more with mmap/munmap, so larger
# chunks page-fault on every read: measured on the real Cartd, 128 KiB to 1 MiB chunks moved
# ~210 MB/s, 32-64 KiB ~300 MB/s, level with `curl | tar` (benchmarks/README.md).
DEFAULT_CHUNK_SIZE = 64 << 10
# The largest header record read into memory: a pax header (Cartd writes one of ~100 bytes plus
# the path for every member, its mtimes being floats) or a GNU long name. A path we accept is
# at most 3 KiB, so this is generous; tarfile itself would read gigabytes.
MAX_HEADER_RECORD = 64 << 10
# Header records before one member: a pax header, a GNU long name and long link name make 3.
# tarfile reads them by recursion, so without a bound a chain of them overflows the stack.
MAX_HEADER_RECORDS = 8
_RECORD_KINDS = {
    tarfile.XHDTYPE: "pax header",
    tarfile.SOLARIS_XHDTYPE: "pax header",
    tarfile.XGLTYPE: "global pax header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
}
# The staging directory is ``.<filename>.part-`` and 8 random characters.
_STAGING_EXTRA = len("..part-") + 8
MAX_FILENAME_BYTES = NAME_MAX - _STAGING_EXTRA
# A bundled cart whose stream breaks is asked again from where the verified data ends, at
# most this many times per download; then the interruption is the error.
DEFAULT_MAX_RESUMES = 5
_MISSING_SHOWN = 5
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Readable(Protocol):
    """What the extractor reads from: anything with ``read(size)``."""

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes, ``b""`` at the end."""


class RangeReadable(Readable, Protocol):
    """A stream of the tar from byte ``start`` on (0: the whole tar)."""

    start: int


# resume(offset) opens the tar again from byte ``offset`` (a ``Range`` request); the stream's
# ``start`` says where it really starts: ``offset``, or 0 if the server sent the whole tar.
Resume = Callable[[int], AbstractContextManager[RangeReadable]]


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction put on disk."""

    root: Path
    files: tuple[Path, ...]
    bytes: int


def check_filename(filename: str) -> str:
    """``filename`` names the cart's top directory; it must be one plain path component."""
    if not filename or filename in (".", "..") or "/" in filename or "\x00" in filename:
        raise InvalidInputError(
            f"filename must be a single directory name, not {echo(filename)}", field="filename"
        )
    try:
        check_path(filename)
        size = len(filename.encode("utf-8"))
    except ValueError as exc:
        raise InvalidInputError(f"filename {echo(filename)} {exc}", field="filename") from None
    if size > MAX_FILENAME_BYTES:
        raise InvalidInputError(
            f"filename {echo(filename)} is {size} bytes long, more than the {MAX_FILENAME_BYTES} allowed",
            field="filename",
        )
    return filename


def check_destination(location: Path, filename: str, files: Sequence[CartFile] | None) -> str:
    """Check ``filename``, and that every file's staging path fits in PATH_MAX under ``location``.

    Paths are validated on their own (:data:`~.cartfile.MAX_PATH_BYTES`); a download root so
    deep that they no longer fit beneath it is refused before a cart is made, not mid-stream.
    """
    check_filename(filename)
    longest = max((len(file.path.encode("utf-8")) for file in files or ()), default=0)
    root = len(os.fsencode(os.path.abspath(location)))
    # <location>/.<filename>.part-XXXXXXXX/<filename>/<path> and the terminating NUL
    needed = root + 1 + _STAGING_EXTRA + 2 * len(filename.encode("utf-8")) + 2 + longest + 1
    if files and needed > PATH_MAX:
        raise LocalStorageError(
            f"{echo(str(location))} is too deep for this download: its longest file would need "
            f"a path of {needed} bytes, more than PATH_MAX ({PATH_MAX})",
            path=str(location),
            retryable=False,
        )
    return filename


def extract_cart(
    stream: Readable,
    location: Path,
    filename: str,
    files: Sequence[CartFile] | None,
    progress: DownloadProgress | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    top: str | None = None,
    resume: Resume | None = None,
    max_resumes: int = DEFAULT_MAX_RESUMES,
) -> ExtractResult:
    """Extract the cart's tar from ``stream`` into ``location/filename``.

    The tar may hold exactly the requested regular ``files`` under ``filename/`` and their
    parent directories; anything else is an :class:`UnsafeArchiveError` naming the member.
    With ``files=None`` any regular files and directories under ``filename/`` are taken,
    unverified; links, devices and escaping paths are still refused.

    ``top`` is another name the tar's top directory may have (a bundled cart's is the cart's
    uid): its members are placed, and checked, as if they were under ``filename/``.

    With ``resume``, a stream that breaks (:class:`DownloadInterruptedError`) is opened again
    from the header of the first member not yet written and verified, at most
    ``max_resumes`` times; a file cut midway is discarded and fetched again whole. If the
    server sends the whole tar instead, the extraction starts over.
    """
    extractor = _Extractor(
        location, check_destination(location, filename, files), files, progress or DownloadProgress()
    )
    if top is not None and top != filename:
        extractor.top = check_filename(top)
    try:
        location.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{filename}.part-", dir=location))
    except OSError as exc:
        raise LocalStorageError(f"cannot write to {location}: {exc}", path=str(location)) from exc
    try:
        extractor.run(stream, staging, chunk_size, resume, max_resumes)
        return extractor.commit(staging)
    except DownloaderError:
        raise
    except OSError as exc:
        raise LocalStorageError(
            f"writing the cart under {location} failed: {shorten(str(exc), ECHO_CHARS)}",
            path=str(location),
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _TarInfo(tarfile.TarInfo):
    """A TarInfo that checks what a header announces before tarfile reads it."""

    def _proc_member(self, archive: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile calls this right after parsing each 512-byte header and only then reads what
        # the header announces: pax records and GNU long names whole, into memory, however
        # large their declared size; the records before one member recursively.
        if self.size < 0:
            self._refuse("declares a negative size")
        if self.type == tarfile.GNUTYPE_SPARSE:
            self._refuse("is a sparse file")  # its map is read from any number of blocks
        kind = _RECORD_KINDS.get(self.type)
        if kind is not None and isinstance(archive, _TarFile):
            if self.size > MAX_HEADER_RECORD:
                self._refuse(f"is a {kind} of {self.size} bytes, more than {MAX_HEADER_RECORD}")
            archive.records += 1
            if archive.records > MAX_HEADER_RECORDS:
                self._refuse(f"is one of more than {MAX_HEADER_RECORDS} header records in a row")
            if self.type == tarfile.XGLTYPE:  # global headers add up for the whole archive
                archive.global_bytes += self.size
                if archive.global_bytes > MAX_HEADER_RECORD:
                    self._refuse(f"brings global pax headers over {MAX_HEADER_RECORD} bytes")
        return super()._proc_member(archive)  # type: ignore[misc,no-any-return]

    def _proc_gnusparse_10(self, *args: object) -> NoReturn:
        self._refuse("is a sparse file")  # GNU sparse 1.0 reads its map from the data blocks

    def _refuse(self, why: str) -> NoReturn:
        raise UnsafeArchiveError(
            f"refusing the tar header {echo(self.name)} at byte {self.offset}: it {why}",
            member=shorten(self.name, PATH_MAX),
        )


class _TarFile(tarfile.TarFile):
    """A stream-mode TarFile with bounded headers that forgets each member once it is read."""

    tarinfo = _TarInfo
    records = 0  # header records read before the current member
    global_bytes = 0  # bytes of global pax headers read so far

    def next(self) -> tarfile.TarInfo | None:
        self.records = 0
        member = super().next()
        # tarfile keeps every member for random access, which a stream cannot use: memory
        # would grow with the member count (93 MiB for 200,000 empty directory entries).
        self.members.clear()  # type: ignore[attr-defined]
        return member


class _Extractor:
    """The state of one extraction: what is expected, what has arrived."""

    def __init__(
        self,
        location: Path,
        filename: str,
        files: Sequence[CartFile] | None,
        progress: DownloadProgress,
    ) -> None:
        self.location = location
        self.filename = filename
        self.progress = progress
        self.verify = files is not None
        self.expected = {f"{filename}/{file.path}": file for file in files or ()}
        self.directories = {filename}
        for name in self.expected:
            parts = name.split("/")
            self.directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
        self.top: str | None = None  # another name of the tar's top directory (a bundle's uid)
        self.written: dict[str, Path] = {}
        self.made: set[str] = set()  # directory members already made in staging
        self.bytes = 0
        # Where the tar can be asked again from: the header after the last member taken whole
        # (file verified, directory made). ``partial`` is the file being written, if any.
        self.resume_at = 0
        self.resumable = True  # False once a global pax header was read: it would be lost
        self.partial: Path | None = None
        self.partial_from = 0  # self.bytes when the partial file began

    def run(
        self,
        stream: Readable,
        staging: Path,
        chunk_size: int,
        resume: Resume | None = None,
        max_resumes: int = 0,
    ) -> None:
        try:
            self._stream_all(stream, staging, chunk_size, resume, max_resumes)
        except DownloaderError:
            raise
        # tarfile reports a bad header as TarError, but a hostile pax header (a size or mtime
        # that is not a number) as ValueError or OverflowError.
        except (tarfile.TarError, EOFError, ValueError, OverflowError) as exc:
            raise DownloadInterruptedError(
                f"the cart's tar is cut short or malformed after {self.bytes} bytes of file data: "
                + shorten(str(exc), ECHO_CHARS),
                files_written=len(self.written),
            ) from exc
        missing = sorted(set(self.expected) - set(self.written))
        if missing:
            shown = ", ".join(echo(name) for name in missing[:_MISSING_SHOWN])
            more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
            raise MissingFileError(
                f"{len(missing)} requested file(s) missing from the cart: {shown}{more}",
                missing=missing,
            )

    def _stream_all(
        self, stream: Readable, staging: Path, chunk_size: int, resume: Resume | None, max_resumes: int
    ) -> None:
        """Parse the tar, opening it again with ``resume`` where the stream broke."""
        resumes = 0
        start = 0
        with contextlib.ExitStack() as reopened:
            while True:
                try:
                    self._parse(stream, start, staging, chunk_size)
                    return
                except DownloadInterruptedError as exc:  # the connection, not the tar
                    if resume is None or resumes >= max_resumes or not self.resumable:
                        raise
                    resumes += 1
                    LOGGER.info(
                        "cart stream broke, resuming",
                        extra={"offset": self.resume_at, "resume": resumes, "detail": str(exc)},
                    )
                    self._discard_partial()
                    reopened.close()  # the broken stream we opened, if it was ours
                    ranged = reopened.enter_context(resume(self.resume_at))
                    stream, start = ranged, ranged.start
                    if start != self.resume_at:  # the server sent the whole tar again
                        self._start_over(staging)

    def _parse(self, stream: Readable, start: int, staging: Path, chunk_size: int) -> None:
        """Take the members of a tar stream that begins at byte ``start`` of the cart's tar."""
        with _TarFile.open(fileobj=stream, mode="r|", bufsize=chunk_size) as tar:  # type: ignore[call-overload]
            while (member := tar.next()) is not None:
                if tar.global_bytes:
                    self.resumable = False
                self._rename_top(member)
                if self._check(member):
                    self._write(tar, member, staging, chunk_size)
                elif member.name not in self.made:
                    (staging / member.name).mkdir(parents=True, exist_ok=True)
                    self.made.add(member.name)
                # In stream mode tar.offset is where the next header starts (data skipped).
                self.resume_at = start + tar.offset

    def _rename_top(self, member: tarfile.TarInfo) -> None:
        """Place a member under ``top/`` (a bundle's uid) as if it were under ``filename/``."""
        if self.top is not None:
            head, slash, rest = member.name.partition("/")
            if head == self.top:
                member.name = self.filename + slash + rest

    def _discard_partial(self) -> None:
        """Forget the file cut midway: it is fetched again from its header, never trusted."""
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)
            self.bytes = self.partial_from
            self.partial = None

    def _start_over(self, staging: Path) -> None:
        """The server ignored the range: drop everything staged and take the tar from byte 0."""
        LOGGER.info("the server sent the whole cart again; starting over")
        for child in staging.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.written.clear()
        self.made.clear()
        self.bytes = 0
        self.resume_at = 0

    def _check(self, member: tarfile.TarInfo) -> bool:
        """Refuse an unsafe member; return True for a file to write, False for a directory."""
        name = member.name
        parts = name.split("/")
        if name.startswith("/") or os.path.isabs(name):
            self._refuse(member, "has an absolute path")
        if ".." in parts:
            self._refuse(member, "has a '..' component")
        if member.issym() or member.islnk():
            self._refuse(
                member, f"is a {'symbolic' if member.issym() else 'hard'} link to {echo(member.linkname)}"
            )
        if not (member.isreg() or member.isdir()):
            self._refuse(member, "is a device, fifo or other special file")
        if member.sparse is not None:
            self._refuse(member, "is a sparse file")
        if parts[0] != self.filename:
            inside = self.filename + "/" if self.top is None else f"{self.top}/ or {self.filename}/"
            self._refuse(member, f"is outside {echo(inside)}")
        if len(parts) > 1:
            try:
                check_path(name.partition("/")[2])
            except ValueError as exc:
                self._refuse(member, f"has a path that {exc}")
        if member.isdir():
            if self.verify and name not in self.directories:
                self._refuse(member, "is a directory that no requested file lives in")
            return False
        if self.verify and name not in self.expected:
            self._refuse(member, "was not requested")
        if name in self.written:
            self._refuse(member, "appears twice")
        return True

    def _refuse(self, member: tarfile.TarInfo, why: str) -> NoReturn:
        # The message shows a hostile name shortened; the attribute keeps any name a path can be.
        raise UnsafeArchiveError(
            f"refusing tar member {echo(member.name)}: it {why}", member=shorten(member.name, PATH_MAX)
        )

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, chunk: int) -> None:
        file = self.expected.get(member.name)
        path = member.name.partition("/")[2]
        target = staging / member.name
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(staging).free
        if member.size > free:
            raise LocalStorageError(
                f"{echo(path)} declares {member.size} bytes but only {free} are free in {self.location}",
                path=path,
            )
        self.progress.file_started(path, member.size)
        digest = hashlib.new(file.hashtype) if file is not None else None
        source = tar.extractfile(member)
        if source is None:  # only for non-files, which _check refused; keeps mypy honest
            self._refuse(member, "has no data")
        self.partial, self.partial_from = target, self.bytes
        with source, open(target, "xb") as out:
            while data := source.read(chunk):
                if digest is not None:
                    digest.update(data)
                out.write(data)
                self.bytes += len(data)
                self.progress.file_advanced(len(data))
        if file is not None and digest is not None and (actual := digest.hexdigest()) != file.hashsum:
            raise HashMismatchError(
                f"{echo(file.path)} (id {file.id}) failed its {file.hashtype} check: "
                f"expected {file.hashsum}, got {actual}",
                path=file.path,
                file_id=file.id,
                expected=file.hashsum,
                actual=actual,
            )
        with contextlib.suppress(OverflowError, ValueError, OSError):  # an absurd mtime is not fatal
            os.utime(target, (member.mtime, member.mtime))
        self.written[member.name] = target
        self.partial = None
        self.progress.file_finished(path)

    def commit(self, staging: Path) -> ExtractResult:
        """Move the verified tree into place: one rename when the target is new, else a merge."""
        staged_root = staging / self.filename
        final_root = self.location / self.filename
        staged_root.mkdir(exist_ok=True)
        if os.path.lexists(final_root) or not _rename_new(staged_root, final_root):
            _merge(self.location, self.written)
        files = tuple(self.location / name for name in sorted(self.written))
        return ExtractResult(final_root, files, self.bytes)


def _rename_new(staged_root: Path, final_root: Path) -> bool:
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


def _merge(location: Path, staged: Mapping[str, Path]) -> None:
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
        taken.update(_parents(name))
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
    for parent in (*_parents(directory), directory):
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


def _same_content(existing: Path, staged: Path, chunk: int = DEFAULT_CHUNK_SIZE) -> bool:
    """Whether the regular file ``existing`` holds exactly the bytes of ``staged``."""
    fd = os.open(existing, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as old, open(staged, "rb") as new:
        if os.fstat(old.fileno()).st_size != os.fstat(new.fileno()).st_size:
            return False
        while (data := new.read(chunk)) == old.read(chunk):
            if not data:
                return True
        return False


def _parents(path: str) -> Iterator[str]:
    """``a/b/c`` -> ``a``, ``a/b``."""
    index = path.find("/")
    while index != -1:
        yield path[:index]
        index = path.find("/", index + 1)
