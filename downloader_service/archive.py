"""The cart's tar: streamed member by member onto disk, refused if unsafe, verified by hash.

Nothing is held in memory beyond one chunk. Files are written into a private staging
directory beside the target and only moved into place once *every* requested file has
arrived and matched its checksum, so a failed or interrupted download leaves nothing that
looks complete, and never touches files already at the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from .cartfile import CartFile
from .errors import (
    DownloaderError,
    DownloadInterruptedError,
    HashMismatchError,
    InvalidInputError,
    LocalStorageError,
    MissingFileError,
    UnsafeArchiveError,
)
from .progress import DownloadProgress

LOGGER = logging.getLogger(__name__)

# Bytes read, hashed and written at a time, and tarfile's stream buffer. Every chunk is a new
# bytes object, and glibc serves allocations of 128 KiB and more with mmap/munmap, so larger
# chunks page-fault on every read: measured on the real Cartd, 128 KiB to 1 MiB chunks moved
# ~210 MB/s, 32-64 KiB ~300 MB/s, level with `curl | tar` (benchmarks/README.md).
DEFAULT_CHUNK_SIZE = 64 << 10
_MISSING_SHOWN = 5


class Readable(Protocol):
    """What the extractor reads from: anything with ``read(size)``."""

    def read(self, size: int = -1) -> bytes:
        """Read up to ``size`` bytes, ``b""`` at the end."""


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
            f"filename must be a single directory name, not {filename!r}", field="filename"
        )
    return filename


def extract_cart(
    stream: Readable,
    location: Path,
    filename: str,
    files: Sequence[CartFile] | None,
    progress: DownloadProgress | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> ExtractResult:
    """Extract the cart's tar from ``stream`` into ``location/filename``.

    The tar may hold exactly the requested regular ``files`` under ``filename/`` and their
    parent directories; anything else is an :class:`UnsafeArchiveError` naming the member.
    With ``files=None`` any regular files and directories under ``filename/`` are taken,
    unverified; links, devices and escaping paths are still refused.
    """
    extractor = _Extractor(location, check_filename(filename), files, progress or DownloadProgress())
    try:
        location.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{filename}.part-", dir=location))
    except OSError as exc:
        raise LocalStorageError(f"cannot write to {location}: {exc}", path=str(location)) from exc
    try:
        extractor.run(stream, staging, chunk_size)
        return extractor.commit(staging)
    except DownloaderError:
        raise
    except OSError as exc:
        raise LocalStorageError(
            f"writing the cart under {location} failed: {exc}", path=str(location)
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
        self.expected = {f"{filename}/{file.path}": file for file in files or ()}
        self.directories = {filename}
        for name in self.expected:
            parts = name.split("/")
            self.directories.update("/".join(parts[:i]) for i in range(1, len(parts)))
        self.written: dict[str, Path] = {}
        self.bytes = 0

    def run(self, stream: Readable, staging: Path, chunk_size: int) -> None:
        try:
            with tarfile.open(fileobj=stream, mode="r|", bufsize=chunk_size) as tar:  # type: ignore[call-overload]
                for member in tar:
                    if self._check(member):
                        self._write(tar, member, staging, chunk_size)
                    else:
                        (staging / member.name).mkdir(parents=True, exist_ok=True)
        except DownloaderError:
            raise
        # tarfile reports a bad header as TarError, but a hostile pax header (a size or mtime
        # that is not a number) as ValueError or OverflowError.
        except (tarfile.TarError, EOFError, ValueError, OverflowError) as exc:
            raise DownloadInterruptedError(
                f"the cart's tar is cut short or malformed after {self.bytes} bytes of file data: {exc}",
                files_written=len(self.written),
            ) from exc
        missing = sorted(set(self.expected) - set(self.written))
        if missing:
            shown = ", ".join(missing[:_MISSING_SHOWN])
            more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
            raise MissingFileError(
                f"{len(missing)} requested file(s) missing from the cart: {shown}{more}",
                missing=missing,
            )

    def _check(self, member: tarfile.TarInfo) -> bool:
        """Refuse an unsafe member; return True for a file to write, False for a directory."""
        name = member.name
        parts = name.split("/")
        if name.startswith("/") or os.path.isabs(name):
            self._refuse(member, "has an absolute path")
        if ".." in parts or "\x00" in name:
            self._refuse(member, "has a '..' component")
        if member.issym() or member.islnk():
            self._refuse(
                member, f"is a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}"
            )
        if not (member.isreg() or member.isdir()):
            self._refuse(member, "is a device, fifo or other special file")
        if parts[0] != self.filename:
            self._refuse(member, f"is outside {self.filename + '/'!r}")
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
        raise UnsafeArchiveError(f"refusing tar member {member.name!r}: it {why}", member=member.name)

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, staging: Path, chunk: int) -> None:
        file = self.expected.get(member.name)
        path = member.name.partition("/")[2]
        target = staging / member.name
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(staging).free
        if member.size > free:
            raise LocalStorageError(
                f"{path} declares {member.size} bytes but only {free} are free in {self.location}",
                path=path,
            )
        self.progress.file_started(path, member.size)
        digest = hashlib.new(file.hashtype) if file is not None else None
        source = tar.extractfile(member)
        if source is None:  # only for non-files, which _check refused; keeps mypy honest
            self._refuse(member, "has no data")
        with source, open(target, "xb") as out:
            while data := source.read(chunk):
                if digest is not None:
                    digest.update(data)
                out.write(data)
                self.bytes += len(data)
                self.progress.file_advanced(len(data))
        if file is not None and digest is not None and (actual := digest.hexdigest()) != file.hashsum:
            raise HashMismatchError(
                f"{file.path} (id {file.id}) failed its {file.hashtype} check: "
                f"expected {file.hashsum}, got {actual}",
                path=file.path,
                file_id=file.id,
                expected=file.hashsum,
                actual=actual,
            )
        with contextlib.suppress(OverflowError, ValueError, OSError):  # an absurd mtime is not fatal
            os.utime(target, (member.mtime, member.mtime))
        self.written[member.name] = target
        self.progress.file_finished(path)

    def commit(self, staging: Path) -> ExtractResult:
        """Move the verified tree into place: one rename when the target is new, else per file."""
        staged_root = staging / self.filename
        final_root = self.location / self.filename
        if not final_root.exists() and not final_root.is_symlink():
            staged_root.mkdir(exist_ok=True)
            os.rename(staged_root, final_root)
        else:
            for name in sorted(self.written):
                final = self.location / name
                try:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self.written[name], final)
                except OSError as exc:
                    raise LocalStorageError(
                        f"cannot put {name} into place under {self.location}: {exc}",
                        path=name,
                    ) from exc
        files = tuple(self.location / name for name in sorted(self.written))
        return ExtractResult(final_root, files, self.bytes)
