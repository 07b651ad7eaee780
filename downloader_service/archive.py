"""The cart's tar: streamed member by member onto disk, refused if unsafe, verified by hash.

The tar is read by our own small stream parser (tarfile parses each 512-byte header block):
one thread reads the network into a few reusable buffers and checks headers, a second hashes
and writes the data, so both cores work. Nothing is held in memory beyond those buffers and
one member's headers: a header record (pax header, GNU long name) larger than
:data:`MAX_HEADER_RECORD` is refused before it is read. Files are written into a private
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
import queue
import shutil
import stat
import struct
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, overload

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

# The size of each reusable read buffer, and how many there are: the reader fills one from
# the network while the writer hashes and writes the others, so at most
# ``_BUFFERS * chunk_size`` bytes of the cart are in memory at once.
DEFAULT_CHUNK_SIZE = 256 << 10
_BUFFERS = 4
# Files smaller than this are hashed and written by the reading thread itself.
_INLINE_BELOW = 512 << 10
# The largest header record read into memory: a pax header (Cartd writes one of ~100 bytes plus
# the path for every member, its mtimes being floats) or a GNU long name. A path we accept is
# at most 3 KiB, so this is generous; tarfile itself would read gigabytes.
MAX_HEADER_RECORD = 64 << 10
# Header records before one member: a pax header, a GNU long name and long link name make 3;
# a chain of more is refused rather than read.
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
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
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


class PathList(Sequence[Path]):
    """The paths of files below ``root``, made when asked for.

    A download of many files keeps only the names (strings it holds anyway); a ``Path`` per
    file, held for the whole download, cost ~400 bytes a file. It compares equal to any
    sequence of the same paths (a tuple, a list).
    """

    __slots__ = ("names", "root")

    def __init__(self, root: Path, names: Sequence[str]) -> None:
        self.root = root
        self.names = names  # relative to root, with "/"

    def __len__(self) -> int:
        return len(self.names)

    @overload
    def __getitem__(self, index: int) -> Path: ...

    @overload
    def __getitem__(self, index: slice) -> PathList: ...

    def __getitem__(self, index: int | slice) -> Path | PathList:
        if isinstance(index, slice):
            return PathList(self.root, self.names[index])
        return self.root / self.names[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PathList, tuple, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PathList({self.root!r}, {len(self)} files)"


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction put on disk: ``files`` in the tar's order."""

    root: Path
    files: PathList
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

    With ``resume``, a stream that breaks (:class:`DownloadInterruptedError`) is opened again,
    at most ``max_resumes`` times: a file cut midway goes on from its first byte not yet
    written, with its hash so far (so the checksum still covers every byte), a cut between
    files from the next member's first header. If the server sends the whole tar instead,
    the extraction starts over.
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


class _Malformed(tarfile.TarError):
    """The tar's bytes break its format (reported as a malformed or cut-short cart)."""


_NUL_BLOCK = bytes(tarfile.BLOCKSIZE)
_STOP = ("stop",)


def _padded(size: int) -> int:
    """``size`` rounded up to whole 512-byte blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class _Header:
    """What one 512-byte tar header block says, as far as extraction needs it.

    Read with slices and ``int()`` instead of ``tarfile.TarInfo.frombuf``, which decodes
    every field (owner, group, devices, ...) and took half the parsing time of small files.
    The rules are tarfile's: a checksum over the block (which must be there), octal or
    base-256 numbers, a ustar prefix joined to the name, trailing slashes taken from
    directories.
    """

    __slots__ = ("linkname", "mtime", "name", "offset", "size", "type")

    def __init__(self, name: str, size: int, mtime: float, type_: bytes, linkname: str, offset: int) -> None:
        self.name = name
        self.size = size
        self.mtime = mtime
        self.type = type_
        self.linkname = linkname
        self.offset = offset

    @classmethod
    def parse(cls, block: bytes, offset: int) -> _Header:
        """The header in ``block`` (512 bytes, not all NUL) at byte ``offset`` of the tar."""
        field = block[148:156]
        if not field.strip(b"\0 "):
            # Stricter than tarfile, which reads an empty field as 0: bytes that are no tar at
            # all (a gzip stream) match that one time in a few thousand, as signed bytes.
            raise _Malformed("no checksum")
        checksum = _number(field)
        if checksum != 256 + sum(block[:148]) + sum(block[156:]) and checksum != 256 + sum(
            struct.unpack_from("148b8x356b", block)
        ):
            raise _Malformed("bad checksum")
        type_ = block[156:157]
        name = _text(block[0:100])
        if type_ == tarfile.AREGTYPE and name.endswith("/"):
            type_ = tarfile.DIRTYPE  # old V7 tars mark a directory by the slash
        if type_ == tarfile.DIRTYPE:
            name = name.rstrip("/")
        prefix = _text(block[345:500])
        if prefix and type_ not in tarfile.GNU_TYPES:
            name = prefix + "/" + name
        size, mtime, linkname = _number(block[124:136]), _number(block[136:148]), _text(block[157:257])
        return cls(name, size, mtime, type_, linkname, offset)

    def isreg(self) -> bool:
        return self.type in tarfile.REGULAR_TYPES

    def isdir(self) -> bool:
        return self.type == tarfile.DIRTYPE

    def issym(self) -> bool:
        return self.type == tarfile.SYMTYPE

    def islnk(self) -> bool:
        return self.type == tarfile.LNKTYPE


def _text(field: bytes) -> str:
    """A NUL-terminated header field (names are UTF-8; other bytes kept as surrogates)."""
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric header field: octal digits, or base-256 (GNU) when the first byte is 0x80 or 0xff."""
    if field[0] in (0x80, 0xFF):
        value = int.from_bytes(field[1:], "big")
        return value - (256 ** (len(field) - 1)) if field[0] == 0xFF else value
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise _Malformed("invalid header") from None


Pool = queue.SimpleQueue[bytearray]


def _pool(size: int, count: int) -> Pool:
    """``count`` reusable buffers of ``size`` bytes the tar is read into (no copy per chunk).

    Data views handed to the writer point into a buffer; a buffer goes back to the pool only
    when the writer has finished with everything before its ``release``, so at most
    ``count * size`` bytes are ever held, however large the cart.
    """
    pool: Pool = queue.SimpleQueue()
    for _ in range(count):
        pool.put(bytearray(size))
    return pool


class _Reader:
    """Reads one stream of the tar into the writer's pool of buffers, counting its offset."""

    def __init__(self, stream: Readable, start: int, writer: _Writer) -> None:
        self.stream = stream
        self.readinto: Callable[[memoryview], int] | None = getattr(stream, "readinto", None)
        self.writer = writer
        self.offset = start  # offset in the cart's tar of the next byte not yet taken
        self.buffer: bytearray | None = None
        self.view = memoryview(b"")
        self.pos = 0
        self.end = 0
        self.eof = False

    def _fill(self) -> bool:
        """Hand the spent buffer to the writer and read into a free one; False at the end."""
        if self.eof:
            return False
        self.close()
        buffer = self.writer.free_buffer()
        view = memoryview(buffer)
        try:
            if self.readinto is not None:
                count = self.readinto(view)
            else:
                data = self.stream.read(len(buffer))
                count = len(data)
                view[:count] = data
        except BaseException:
            self.writer.pool.put(buffer)
            raise
        self.buffer, self.view, self.pos, self.end = buffer, view, 0, count
        self.eof = count == 0
        return not self.eof

    def take(self, size: int) -> bytes:
        """The next ``size`` bytes as a copy (headers), fewer only at the end of the stream."""
        if self.end - self.pos >= size:  # the common case: all in the current buffer
            data = self.view[self.pos : self.pos + size].tobytes()
            self.pos += size
            self.offset += size
            return data
        parts = bytearray()
        while len(parts) < size:
            if self.pos == self.end and not self._fill():
                break
            count = min(size - len(parts), self.end - self.pos)
            parts += self.view[self.pos : self.pos + count]
            self.pos += count
            self.offset += count
        return bytes(parts)

    def views(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes as views into the buffers; a short stream is malformed."""
        while size:
            if self.pos == self.end and not self._fill():
                raise _Malformed("unexpected end of data")
            count = min(size, self.end - self.pos)
            yield self.view[self.pos : self.pos + count]
            self.pos += count
            self.offset += count
            size -= count

    def skip(self, size: int) -> None:
        """Pass over ``size`` bytes (padding)."""
        for _ in self.views(size):
            pass

    def close(self) -> None:
        """Give the buffer being read back (through the writer, which may still use it)."""
        if self.buffer is not None:
            self.writer.put(("release", self.buffer))
            self.buffer = None


@dataclass(slots=True)
class _Member:
    """One regular file on its way to staging (created by the reader, finished by the writer)."""

    path: str  # below ``filename/``, as progress reports it
    target: str
    size: int
    mtime: float
    file: CartFile | None
    start: int  # offset in the cart's tar of its first data byte
    end: int  # offset in the cart's tar after its data


class _Writer(threading.Thread):
    """Hashes and writes file data while the reader takes the next bytes off the network.

    It takes operations in order from a queue, so files are finished, and ``resume_at``
    moves, exactly in the tar's order. hashlib and ``os.write`` release the GIL, so the two
    threads use both cores. The first error is kept; later data is skipped, but buffers are
    still given back so that the reader never waits forever; the reader raises it.
    """

    def __init__(self, extractor: _Extractor, pool: Pool) -> None:
        super().__init__(name="cart-writer", daemon=True)
        self.extractor = extractor
        self.pool = pool  # where buffers go back once the data in them is written
        self.ops: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.abort = False
        self.fd = -1
        self.member: _Member | None = None
        self.digest: Any = None
        self.queued = False  # work was queued since the last drain

    def put(self, op: tuple[Any, ...]) -> None:
        self.ops.put(op)

    def drain(self) -> None:
        """Wait until everything queued is done: then the reader may write a file itself."""
        if self.queued:
            done = threading.Event()
            self.ops.put(("sync", done))
            done.wait()
            self.queued = False
        self.check()

    def mark(self, end: int) -> None:
        """A directory was taken whole: the tar may be resumed after it, once files before it are."""
        if self.queued:
            self.ops.put(("mark", end))
        else:
            self.extractor.resume_at = end

    def free_buffer(self) -> bytearray:
        """A buffer the writer is done with; raises the writer's error as soon as there is one."""
        while True:
            self.check()
            try:
                return self.pool.get(timeout=0.5)
            except queue.Empty:
                continue

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self, abort: bool) -> None:
        """Stop after the queued operations (or skipping them, with ``abort``) and wait."""
        self.abort = self.abort or abort
        self.ops.put(_STOP)
        self.join()

    def run(self) -> None:
        ops = self.ops
        while True:
            op = ops.get()
            kind = op[0]
            if kind == "release":
                self.pool.put(op[1])
                continue
            if kind == "stop":
                return
            if kind == "sync":
                op[1].set()
                continue
            if self.error is not None or self.abort:
                continue
            try:
                if kind == "data":
                    self.write(op[1])
                elif kind == "open":
                    self.open_file(op[1])
                elif kind == "close":
                    self.close_file()
                else:  # "mark": a directory, taken whole
                    self.extractor.resume_at = op[1]
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                self.error = exc

    def open_file(self, member: _Member) -> None:
        extractor = self.extractor
        extractor.progress.file_started(member.path, member.size)
        file = member.file
        self.digest = hashlib.new(file.hashtype) if file is not None else None
        self.fd = os.open(member.target, _FILE_FLAGS, 0o666)
        self.member = member
        extractor.partial, extractor.partial_from = member, extractor.bytes

    def write(self, data: memoryview) -> None:
        if self.digest is not None:
            self.digest.update(data)
        fd, size = self.fd, len(data)
        written = os.write(fd, data)
        while written < size:
            written += os.write(fd, data[written:])
        self.extractor.bytes += size
        self.extractor.progress.file_advanced(size)

    def close_file(self) -> None:
        member, extractor = self.member, self.extractor
        assert member is not None
        fd, self.fd, self.member = self.fd, -1, None
        try:
            with contextlib.suppress(OverflowError, ValueError, OSError):  # an absurd mtime is not fatal
                os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
        file = member.file
        if file is not None and (actual := self.digest.hexdigest()) != file.hashsum:
            raise HashMismatchError(
                f"{echo(file.path)} (id {file.id}) failed its {file.hashtype} check: "
                f"expected {file.hashsum}, got {actual}",
                path=file.path,
                file_id=file.id,
                expected=file.hashsum,
                actual=actual,
            )
        extractor.partial = None
        extractor.resume_at = member.end
        extractor.progress.file_finished(member.path)

    def detach(self) -> tuple[int, Any]:
        """Give up the open file (descriptor and hash so far) for a resumed stream to go on with."""
        kept, self.fd, self.member = (self.fd, self.digest), -1, None
        return kept

    def adopt(self, member: _Member, fd: int, digest: Any) -> None:
        """Go on with a file an earlier stream began: the bytes on disk are already hashed."""
        self.member, self.fd, self.digest = member, fd, digest

    def close_partial(self) -> None:
        """Close a file left open by an extraction that stopped."""
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1


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
        # Keyed by the files' own path strings, so a file costs this only a dict entry.
        self.expected = {file.path: file for file in files or ()}
        self.directories: set[str] = set()  # below filename/, where requested files live
        for path in self.expected:
            directory = path.rpartition("/")[0]
            if directory and directory not in self.directories:
                self.directories.add(directory)
                self.directories.update(_parents(directory))
        self.top: str | None = None  # another name of the tar's top directory (a bundle's uid)
        # Paths (below filename/) of the files handed to the writer, in the tar's order (a
        # dict: ordered, and found in constant time; the values are unused). Once the writer
        # has finished without an error, every one of them is written and verified.
        self.written: dict[str, None] = {}
        self.made: set[str] = set()  # directories that exist in staging
        self.bytes = 0
        # Where the tar can be asked again from: the header after the last member taken whole
        # (file verified, directory made). ``partial`` is the file being written, if any.
        self.resume_at = 0
        self.resumable = True  # False once a global pax header was read: it would be lost
        self.partial: _Member | None = None
        self.partial_from = 0  # self.bytes when the partial file began
        # The partial file's descriptor and hash after a stream broke, for the resume.
        self.kept: tuple[int, Any] | None = None
        self.global_pax: dict[str, str] = {}
        self.global_bytes = 0  # bytes of global pax headers read so far
        self.free = 0  # bytes the disk is known to have left for the files to come

    def run(
        self,
        stream: Readable,
        staging: Path,
        chunk_size: int,
        resume: Resume | None = None,
        max_resumes: int = 0,
    ) -> None:
        try:
            self._stream_all(stream, staging, _pool(chunk_size, _BUFFERS), resume, max_resumes)
        except DownloaderError:
            raise
        # A bad header is a TarError; a hostile pax header (a size that is not a number) a ValueError.
        except (tarfile.TarError, ValueError, OverflowError) as exc:
            raise DownloadInterruptedError(
                f"the cart's tar is cut short or malformed after {self.bytes} bytes of file data: "
                + shorten(str(exc), ECHO_CHARS),
                files_written=len(self.written),
            ) from exc
        missing = sorted(f"{self.filename}/{path}" for path in self.expected if path not in self.written)
        if missing:
            shown = ", ".join(echo(name) for name in missing[:_MISSING_SHOWN])
            more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
            raise MissingFileError(
                f"{len(missing)} requested file(s) missing from the cart: {shown}{more}",
                missing=missing,
            )

    def _stream_all(
        self, stream: Readable, staging: Path, pool: Pool, resume: Resume | None, max_resumes: int
    ) -> None:
        """Parse the tar, opening it again with ``resume`` where the stream broke.

        A file cut midway goes on from its first byte not yet written: the bytes on disk are
        the bytes already hashed, so the checksum still covers every byte of the file.
        """
        resumes = 0
        start = 0
        self.free = shutil.disk_usage(staging).free
        opened = contextlib.ExitStack()  # the stream of the last resume, if any
        try:
            while True:
                try:
                    self._parse(stream, start, str(staging), pool)
                    return
                except DownloadInterruptedError as exc:  # the connection, not the tar
                    if resume is None or resumes >= max_resumes or not self.resumable:
                        raise
                    resumes += 1
                    offset = self._resume_offset()
                    LOGGER.info(
                        "cart stream broke, resuming",
                        extra={"offset": offset, "resume": resumes, "detail": str(exc)},
                    )
                    opened.close()  # the broken stream, if it was one we opened
                    ranged = opened.enter_context(resume(offset))
                    stream, start = ranged, ranged.start
                    if start != offset:  # the server sent the whole tar again
                        self._start_over(staging)
        finally:
            opened.close()
            self._discard_partial()  # a file kept open for a resume that did not come

    def _resume_offset(self) -> int:
        """Where the tar is asked again from: the partial file's next byte, or the next header."""
        if self.partial is None or self.kept is None:
            self._discard_partial()
            return self.resume_at
        return self.partial.start + self.bytes - self.partial_from

    def _parse(self, stream: Readable, start: int, staging: str, pool: Pool) -> None:
        """Take the members of a tar stream that begins at byte ``start`` of the cart's tar.

        This thread reads and checks headers; a :class:`_Writer` hashes and writes the data.
        """
        writer = _Writer(self, pool)
        writer.start()
        reader = _Reader(stream, start, writer)
        try:
            if self.kept is not None and self.partial is not None:  # a file cut midway goes on
                (fd, digest), self.kept = self.kept, None
                writer.adopt(self.partial, fd, digest)
                self._take_data(reader, writer, self.partial, self.partial.end - reader.offset)
            while (member := self._next(reader)) is not None:
                self._rename_top(member)
                end = reader.offset + (_padded(member.size) if member.isreg() else 0)
                if self._check(member):
                    self._queue_file(reader, writer, member, staging, end)
                else:
                    self._make_dir(staging, member.name)
                    writer.mark(end)
                writer.check()
        except DownloadInterruptedError:
            # Everything that arrived is still written: the resume goes on from there.
            self._stop(reader, writer, abort=False, keep=True)
            writer.check()
            raise
        except BaseException:
            self._stop(reader, writer, abort=True)
            writer.check()  # the writer's error came first: it is the cause
            raise
        self._stop(reader, writer, abort=False)
        writer.check()

    def _stop(self, reader: _Reader, writer: _Writer, abort: bool, keep: bool = False) -> None:
        """End the writer; with ``keep``, a file it left open is kept for a resume."""
        reader.close()
        writer.finish(abort)
        if keep and writer.fd != -1:
            self.kept = writer.detach()
        writer.close_partial()

    def _queue_file(self, reader: _Reader, writer: _Writer, info: _Header, staging: str, end: int) -> None:
        """Check the room a file needs, make its directory, and hand its data to the writer."""
        name, size = info.name, info.size
        path = name.partition("/")[2]
        if size > self.free:
            self.free = shutil.disk_usage(staging).free  # asked again only when it may not fit
            if size > self.free:
                raise LocalStorageError(
                    f"{echo(path)} declares {size} bytes but only {self.free} are free in {self.location}",
                    path=path,
                )
        self.free -= size
        self._make_dir(staging, name.rpartition("/")[0])
        file = self.expected.get(path)
        self.written[path if file is None else file.path] = None  # the string held already
        member = _Member(path, f"{staging}/{name}", size, info.mtime, file, reader.offset, end)
        if size < _INLINE_BELOW:
            # Handing a small file over costs more than writing it: two threads taking turns
            # on the GIL for every system call made 2000 small files ~3 times slower.
            writer.drain()
            writer.open_file(member)
        else:
            writer.put(("open", member))
        self._take_data(reader, writer, member, end - reader.offset)

    @staticmethod
    def _take_data(reader: _Reader, writer: _Writer, member: _Member, left: int) -> None:
        """Hand the ``left`` bytes of ``member`` still to come (and padding) to the writer."""
        data = max(left - (_padded(member.size) - member.size), 0)  # the file's bytes, not padding
        if member.size < _INLINE_BELOW:
            for view in reader.views(data):
                writer.write(view)
            reader.skip(left - data)
            writer.close_file()
            return
        put = writer.put
        for view in reader.views(data):
            put(("data", view))
        reader.skip(left - data)
        put(("close",))
        writer.queued = True

    def _make_dir(self, staging: str, directory: str) -> None:
        """Make ``directory`` (and its parents) in staging, once."""
        if directory not in self.made:
            os.makedirs(f"{staging}/{directory}", exist_ok=True)
            self.made.add(directory)
            self.made.update(_parents(directory))

    def _next(self, reader: _Reader) -> _Header | None:
        """The next member with its pax headers and GNU long names applied; None at the end.

        Header records are bounded before they are read (:data:`MAX_HEADER_RECORD`), and at
        most :data:`MAX_HEADER_RECORDS` come before one member.
        """
        pax: dict[str, str] = {}
        long_names: dict[bytes, str] = {}
        for _ in range(MAX_HEADER_RECORDS + 1):
            at = reader.offset
            block = reader.take(tarfile.BLOCKSIZE)
            if not block:
                if at == 0:
                    raise _Malformed("empty file")
                return None  # the stream ended where a header could begin
            if len(block) < tarfile.BLOCKSIZE:
                raise _Malformed("truncated header")
            if block == _NUL_BLOCK:
                return None  # the end-of-archive marker
            info = _Header.parse(block, at)
            if info.size < 0:
                _refuse_header(info, "declares a negative size")
            if info.type == tarfile.GNUTYPE_SPARSE:
                _refuse_header(info, "is a sparse file")  # its map is read from any number of blocks
            kind = _RECORD_KINDS.get(info.type)
            if kind is None:
                return self._apply(info, pax, long_names)
            if info.size > MAX_HEADER_RECORD:
                _refuse_header(info, f"is a {kind} of {info.size} bytes, more than {MAX_HEADER_RECORD}")
            record = reader.take(info.size)
            if len(record) < info.size:
                raise _Malformed("unexpected end of data")
            reader.skip(_padded(info.size) - info.size)
            if info.type == tarfile.XGLTYPE:  # global headers add up for the whole archive
                self.resumable = False  # a resumed stream would start without them
                self.global_bytes += info.size
                if self.global_bytes > MAX_HEADER_RECORD:
                    _refuse_header(info, f"brings global pax headers over {MAX_HEADER_RECORD} bytes")
                self.global_pax.update(_pax_records(record))
            elif kind == "pax header":
                pax.update(_pax_records(record))
            else:
                long_names[info.type] = record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        _refuse_header(info, f"is one of more than {MAX_HEADER_RECORDS} header records in a row")

    def _apply(self, info: _Header, pax: dict[str, str], long_names: dict[bytes, str]) -> _Header:
        """Give ``info`` what the records before it say: long names, then pax (global, then its own)."""
        if tarfile.GNUTYPE_LONGNAME in long_names:
            info.name = long_names[tarfile.GNUTYPE_LONGNAME]
        if tarfile.GNUTYPE_LONGLINK in long_names:
            info.linkname = long_names[tarfile.GNUTYPE_LONGLINK]
        for headers in (self.global_pax, pax):
            for keyword, value in headers.items():
                if keyword.startswith("GNU.sparse."):
                    _refuse_header(info, "is a sparse file")
                if keyword == "path":
                    info.name = value.rstrip("/")
                elif keyword == "linkpath":
                    info.linkname = value
                elif keyword == "size":
                    if not value.isdigit() or not value.isascii():
                        raise _Malformed(f"pax size {echo(value)} is not a number of bytes")
                    info.size = int(value)
                elif keyword == "mtime":
                    with contextlib.suppress(ValueError):
                        info.mtime = float(value)
        return info

    def _rename_top(self, member: _Header) -> None:
        """Place a member under ``top/`` (a bundle's uid) as if it were under ``filename/``."""
        if self.top is not None:
            head, slash, rest = member.name.partition("/")
            if head == self.top:
                member.name = self.filename + slash + rest

    def _discard_partial(self) -> None:
        """Forget the file cut midway (closed, removed), when its download cannot go on."""
        if self.kept is not None:
            os.close(self.kept[0])
            self.kept = None
        if self.partial is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial.target)
            self.written.pop(self.partial.path, None)
            self.bytes = self.partial_from
            self.partial = None

    def _start_over(self, staging: Path) -> None:
        """The server ignored the range: drop everything staged and take the tar from byte 0."""
        LOGGER.info("the server sent the whole cart again; starting over")
        self._discard_partial()
        for child in staging.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.written.clear()
        self.made.clear()
        self.bytes = 0
        self.resume_at = 0
        self.free = shutil.disk_usage(staging).free

    def _check(self, member: _Header) -> bool:
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
        if parts[0] != self.filename:
            inside = self.filename + "/" if self.top is None else f"{self.top}/ or {self.filename}/"
            self._refuse(member, f"is outside {echo(inside)}")
        if len(parts) > 1:
            try:
                check_path(name.partition("/")[2])
            except ValueError as exc:
                self._refuse(member, f"has a path that {exc}")
        path = name.partition("/")[2]
        if member.isdir():
            if self.verify and path and path not in self.directories:
                self._refuse(member, "is a directory that no requested file lives in")
            return False
        if self.verify and path not in self.expected:
            self._refuse(member, "was not requested")
        if path in self.written:
            self._refuse(member, "appears twice")
        return True

    def _refuse(self, member: _Header, why: str) -> NoReturn:
        # The message shows a hostile name shortened; the attribute keeps any name a path can be.
        raise UnsafeArchiveError(
            f"refusing tar member {echo(member.name)}: it {why}", member=shorten(member.name, PATH_MAX)
        )

    def commit(self, staging: Path) -> ExtractResult:
        """Move the verified tree into place: one rename when the target is new, else a merge."""
        staged_root = staging / self.filename
        final_root = self.location / self.filename
        staged_root.mkdir(exist_ok=True)
        if os.path.lexists(final_root) or not _rename_new(staged_root, final_root):
            top = self.filename
            _merge(self.location, {f"{top}/{path}": staging / top / path for path in self.written})
        return ExtractResult(final_root, PathList(final_root, sorted(self.written)), self.bytes)


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


def _refuse_header(info: _Header, why: str) -> NoReturn:
    raise UnsafeArchiveError(
        f"refusing the tar header {echo(info.name)} at byte {info.offset}: it {why}",
        member=shorten(info.name, PATH_MAX),
    )


def _pax_records(record: bytes) -> Iterator[tuple[str, str]]:
    """The ``length keyword=value`` records of a pax header (values UTF-8, as tarfile reads them)."""
    pos = 0
    while pos < len(record) and record[pos] != 0:
        space = record.find(b" ", pos, pos + 21)
        equals = record.find(b"=", space)
        digits = record[pos:space]
        if space <= pos or not digits.isdigit():
            raise _Malformed("invalid pax header record")
        length = int(digits)
        end = pos + length
        if length == 0 or equals == -1 or equals >= end or end > len(record) or record[end - 1] != 0x0A:
            raise _Malformed("invalid pax header record")
        keyword = record[space + 1 : equals].decode("utf-8", "surrogateescape")
        yield keyword, record[equals + 1 : end - 1].decode("utf-8", "surrogateescape")
        pos = end
