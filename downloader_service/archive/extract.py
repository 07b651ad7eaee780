"""One cart's extraction: the tar read and checked, its files written and verified, then moved in.

The reading thread (:mod:`.tarstream`) checks every member against what was asked for; a
:class:`~.writer.Writer` hashes and writes the data on a second thread; once every requested
file has arrived and matched its checksum, :mod:`.commit` moves the staging tree into place.
A stream that breaks is opened again from the first byte not yet written (``resume``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, overload

from ..cartfile import NAME_MAX, PATH_MAX, CartFile, check_path
from ..errors import (
    ECHO_CHARS,
    DownloaderError,
    DownloadInterruptedError,
    InvalidInputError,
    LocalStorageError,
    MissingFileError,
    UnsafeArchiveError,
    echo,
    shorten,
)
from ..progress import DownloadProgress
from .commit import merge, parents, rename_new
from .tarstream import (
    Header,
    Headers,
    Readable,
    Reader,
    Resume,
    padded,
)
from .writer import Ledger, Member, Pool, Writer, buffer_pool

LOGGER = logging.getLogger(__name__)

# The size of each reusable read buffer, and how many there are: the reader fills one from
# the network while the writer hashes and writes the others, so at most
# ``_BUFFERS * chunk_size`` bytes of the cart are in memory at once.
DEFAULT_CHUNK_SIZE = 256 << 10
_BUFFERS = 4
# Files smaller than this are hashed and written by the reading thread itself.
_INLINE_BELOW = 512 << 10
# The staging directory is ``.<filename>.part-`` and 8 random characters.
_STAGING_EXTRA = len("..part-") + 8
MAX_FILENAME_BYTES = NAME_MAX - _STAGING_EXTRA
# A bundled cart whose stream breaks is asked again from where the verified data ends, at
# most this many times per download; then the interruption is the error.
DEFAULT_MAX_RESUMES = 5
_MISSING_SHOWN = 5


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
                self.directories.update(parents(directory))
        self.top: str | None = None  # another name of the tar's top directory (a bundle's uid)
        # Paths (below filename/) of the files handed to the writer, in the tar's order (a
        # dict: ordered, and found in constant time; the values are unused). Once the writer
        # has finished without an error, every one of them is written and verified.
        self.written: dict[str, None] = {}
        self.made: set[str] = set()  # directories that exist in staging
        self.ledger = Ledger()  # what is on disk; the writer keeps it while it runs
        self.headers = Headers()
        # The partial file's descriptor and hash after a stream broke, for the resume.
        self.kept: tuple[int, Any] | None = None
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
            self._stream_all(stream, staging, buffer_pool(chunk_size, _BUFFERS), resume, max_resumes)
        except DownloaderError:
            raise
        # A bad header is a TarError; a hostile pax header (a size that is not a number) a ValueError.
        except (tarfile.TarError, ValueError, OverflowError) as exc:
            raise DownloadInterruptedError(
                f"the cart's tar is cut short or malformed after {self.ledger.bytes} bytes of file data: "
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
                    if resume is None or resumes >= max_resumes or not self.headers.resumable:
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
        if self.ledger.partial is None or self.kept is None:
            self._discard_partial()
            return self.ledger.resume_at
        return self.ledger.partial.start + self.ledger.bytes - self.ledger.partial_from

    def _parse(self, stream: Readable, start: int, staging: str, pool: Pool) -> None:
        """Take the members of a tar stream that begins at byte ``start`` of the cart's tar.

        This thread reads and checks headers; a :class:`Writer` hashes and writes the data.
        """
        writer = Writer(self.ledger, self.progress, pool)
        writer.start()
        reader = Reader(stream, start, writer)
        try:
            if self.kept is not None and self.ledger.partial is not None:  # a file cut midway goes on
                (fd, digest), self.kept = self.kept, None
                writer.adopt(self.ledger.partial, fd, digest)
                self._take_data(reader, writer, self.ledger.partial, self.ledger.partial.end - reader.offset)
            while (member := self.headers.next(reader)) is not None:
                self._rename_top(member)
                end = reader.offset + (padded(member.size) if member.isreg() else 0)
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

    def _stop(self, reader: Reader, writer: Writer, abort: bool, keep: bool = False) -> None:
        """End the writer; with ``keep``, a file it left open is kept for a resume."""
        reader.close()
        writer.finish(abort)
        if keep and writer.fd != -1:
            self.kept = writer.detach()
        writer.close_partial()

    def _queue_file(self, reader: Reader, writer: Writer, info: Header, staging: str, end: int) -> None:
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
        member = Member(path, f"{staging}/{name}", size, info.mtime, file, reader.offset, end)
        if size < _INLINE_BELOW:
            # Handing a small file over costs more than writing it: two threads taking turns
            # on the GIL for every system call made 2000 small files ~3 times slower.
            writer.drain()
            writer.open_file(member)
        else:
            writer.put(("open", member))
        self._take_data(reader, writer, member, end - reader.offset)

    @staticmethod
    def _take_data(reader: Reader, writer: Writer, member: Member, left: int) -> None:
        """Hand the ``left`` bytes of ``member`` still to come (and padding) to the writer."""
        data = max(left - (padded(member.size) - member.size), 0)  # the file's bytes, not padding
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
            self.made.update(parents(directory))

    def _rename_top(self, member: Header) -> None:
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
        if self.ledger.partial is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ledger.partial.target)
            self.written.pop(self.ledger.partial.path, None)
            self.ledger.bytes = self.ledger.partial_from
            self.ledger.partial = None

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
        self.ledger.bytes = 0
        self.ledger.resume_at = 0
        self.free = shutil.disk_usage(staging).free

    def _check(self, member: Header) -> bool:
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

    def _refuse(self, member: Header, why: str) -> NoReturn:
        # The message shows a hostile name shortened; the attribute keeps any name a path can be.
        raise UnsafeArchiveError(
            f"refusing tar member {echo(member.name)}: it {why}", member=shorten(member.name, PATH_MAX)
        )

    def commit(self, staging: Path) -> ExtractResult:
        """Move the verified tree into place: one rename when the target is new, else a merge."""
        staged_root = staging / self.filename
        final_root = self.location / self.filename
        staged_root.mkdir(exist_ok=True)
        if os.path.lexists(final_root) or not rename_new(staged_root, final_root):
            top = self.filename
            merge(self.location, {f"{top}/{path}": staging / top / path for path in self.written})
        return ExtractResult(final_root, PathList(final_root, sorted(self.written)), self.ledger.bytes)
