"""Hashing and writing the cart's files on a second thread, while the reader reads on.

The reader hands a :class:`Writer` operations in the tar's order (open a file, its data as
views into the shared buffers, close it); the writer hashes and writes them, returns each
buffer to the pool once its data is written, and records what is on disk in a
:class:`Ledger`, the only state it shares with the extraction.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

from ..cartfile import CartFile
from ..errors import (
    HashMismatchError,
    echo,
)
from ..progress import DownloadProgress

Pool = queue.SimpleQueue[bytearray]
STOP = ("stop",)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def buffer_pool(size: int, count: int) -> Pool:
    """``count`` reusable buffers of ``size`` bytes the tar is read into (no copy per chunk).

    Data views handed to the writer point into a buffer; a buffer goes back to the pool only
    when the writer has finished with everything before its ``release``, so at most
    ``count * size`` bytes are ever held, however large the cart.
    """
    pool: Pool = queue.SimpleQueue()
    for _ in range(count):
        pool.put(bytearray(size))
    return pool


@dataclass(slots=True)
class Member:
    """One regular file on its way to staging (created by the reader, finished by the writer)."""

    path: str  # below ``filename/``, as progress reports it
    target: str
    size: int
    mtime: float
    file: CartFile | None
    start: int  # offset in the cart's tar of its first data byte
    end: int  # offset in the cart's tar after its data


@dataclass(slots=True)
class Ledger:
    """What is on disk so far: all the writer tells the extraction (the narrow way back).

    While the stream is read only the writer changes it (or the reader, writing a small file
    itself after a drain); the extraction reads it once the writer has stopped, to resume or
    to report.
    """

    bytes: int = 0  # file bytes written
    # Where the tar can be asked again from: the header after the last member taken whole
    # (file verified, directory made).
    resume_at: int = 0
    partial: Member | None = None  # the file being written, if any
    partial_from: int = 0  # ``bytes`` when the partial file began


class Writer(threading.Thread):  # implements tarstream.Buffers
    """Hashes and writes file data while the reader takes the next bytes off the network.

    It takes operations in order from a queue, so files are finished, and ``resume_at``
    moves, exactly in the tar's order. hashlib and ``os.write`` release the GIL, so the two
    threads use both cores. The first error is kept; later data is skipped, but buffers are
    still given back so that the reader never waits forever; the reader raises it.
    """

    def __init__(self, ledger: Ledger, progress: DownloadProgress, pool: Pool) -> None:
        super().__init__(name="cart-writer", daemon=True)
        self.ledger = ledger  # what is written: the only state it shares with the extraction
        self.progress = progress
        self.pool = pool  # where buffers go back once the data in them is written
        self.ops: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.abort = False
        self.fd = -1
        self.member: Member | None = None
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
            self.ledger.resume_at = end

    def acquire(self) -> bytearray:
        """A buffer the writer is done with; raises the writer's error as soon as there is one."""
        while True:
            self.check()
            try:
                return self.pool.get(timeout=0.5)
            except queue.Empty:
                continue

    def give_back(self, buffer: bytearray) -> None:
        """A buffer the reader did not fill goes straight back to the pool."""
        self.pool.put(buffer)

    def release(self, buffer: bytearray) -> None:
        """A read buffer goes back to the pool after the data queued before it is written."""
        self.ops.put(("release", buffer))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self, abort: bool) -> None:
        """Stop after the queued operations (or skipping them, with ``abort``) and wait."""
        self.abort = self.abort or abort
        self.ops.put(STOP)
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
                    self.ledger.resume_at = op[1]
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, which raises it
                self.error = exc

    def open_file(self, member: Member) -> None:
        ledger = self.ledger
        self.progress.file_started(member.path, member.size)
        file = member.file
        self.digest = hashlib.new(file.hashtype) if file is not None else None
        self.fd = os.open(member.target, _FILE_FLAGS, 0o666)
        self.member = member
        ledger.partial, ledger.partial_from = member, ledger.bytes

    def write(self, data: memoryview) -> None:
        if self.digest is not None:
            self.digest.update(data)
        fd, size = self.fd, len(data)
        written = os.write(fd, data)
        while written < size:
            written += os.write(fd, data[written:])
        self.ledger.bytes += size
        self.progress.file_advanced(size)

    def close_file(self) -> None:
        member, ledger = self.member, self.ledger
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
        ledger.partial = None
        ledger.resume_at = member.end
        self.progress.file_finished(member.path)

    def detach(self) -> tuple[int, Any]:
        """Give up the open file (descriptor and hash so far) for a resumed stream to go on with."""
        kept, self.fd, self.member = (self.fd, self.digest), -1, None
        return kept

    def adopt(self, member: Member, fd: int, digest: Any) -> None:
        """Go on with a file an earlier stream began: the bytes on disk are already hashed."""
        self.member, self.fd, self.digest = member, fd, digest

    def close_partial(self) -> None:
        """Close a file left open by an extraction that stopped."""
        if self.fd != -1:
            os.close(self.fd)
            self.fd = -1
