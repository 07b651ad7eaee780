"""The cart's tar as it comes off the wire: header blocks, header records, a buffered reader.

The tar is read by our own small stream parser (each 512-byte header block is parsed with
slices, as tarfile would): :class:`Reader` reads the stream into a few reusable buffers
(:class:`Buffers`, the writer's pool), :class:`Headers` reads each member's header records
within bounds. Nothing here writes to disk.
"""

from __future__ import annotations

import contextlib
import struct
import tarfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import NoReturn, Protocol

from ..cartfile import PATH_MAX
from ..errors import (
    UnsafeArchiveError,
    echo,
    shorten,
)

# The largest header record read into memory: a pax header (Cartd writes one of ~100 bytes plus
# the path for every member, its mtimes being floats) or a GNU long name. A path we accept is
# at most 3 KiB, so this is generous; tarfile itself would read gigabytes.
MAX_HEADER_RECORD = 64 << 10
# Header records before one member: a pax header, a GNU long name and long link name make 3;
# a chain of more is refused rather than read.
MAX_HEADER_RECORDS = 8
RECORD_KINDS = {
    tarfile.XHDTYPE: "pax header",
    tarfile.SOLARIS_XHDTYPE: "pax header",
    tarfile.XGLTYPE: "global pax header",
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link name",
}


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


class Malformed(tarfile.TarError):
    """The tar's bytes break its format (reported as a malformed or cut-short cart)."""


NUL_BLOCK = bytes(tarfile.BLOCKSIZE)


def padded(size: int) -> int:
    """``size`` rounded up to whole 512-byte blocks."""
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class Header:
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
    def parse(cls, block: bytes, offset: int) -> Header:
        """The header in ``block`` (512 bytes, not all NUL) at byte ``offset`` of the tar."""
        field = block[148:156]
        if not field.strip(b"\0 "):
            # Stricter than tarfile, which reads an empty field as 0: bytes that are no tar at
            # all (a gzip stream) match that one time in a few thousand, as signed bytes.
            raise Malformed("no checksum")
        checksum = _number(field)
        if checksum != 256 + sum(block[:148]) + sum(block[156:]) and checksum != 256 + sum(
            struct.unpack_from("148b8x356b", block)
        ):
            raise Malformed("bad checksum")
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
        raise Malformed("invalid header") from None


class Buffers(Protocol):
    """Where the reader gets the buffers it reads into, and hands them on (the writer's pool)."""

    def acquire(self) -> bytearray:
        """A free buffer; waits for one, and raises the consumer's error as soon as it has one."""

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer that holds nothing to hand on."""

    def release(self, buffer: bytearray) -> None:
        """Return a buffer once everything handed on before it is used."""


class Reader:
    """Reads one stream of the tar into reusable buffers, counting its offset."""

    def __init__(self, stream: Readable, start: int, buffers: Buffers) -> None:
        self.stream = stream
        self.readinto: Callable[[memoryview], int] | None = getattr(stream, "readinto", None)
        self.buffers = buffers
        self.offset = start  # offset in the cart's tar of the next byte not yet taken
        self.buffer: bytearray | None = None
        self.view = memoryview(b"")
        self.pos = 0
        self.end = 0
        self.eof = False

    def _fill(self) -> bool:
        """Hand the spent buffer on and read into a free one; False at the end."""
        if self.eof:
            return False
        self.close()
        buffer = self.buffers.acquire()
        view = memoryview(buffer)
        try:
            if self.readinto is not None:
                count = self.readinto(view)
            else:
                data = self.stream.read(len(buffer))
                count = len(data)
                view[:count] = data
        except BaseException:
            self.buffers.give_back(buffer)
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
                raise Malformed("unexpected end of data")
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
        """Give the buffer being read back (its consumer may still be using it)."""
        if self.buffer is not None:
            self.buffers.release(self.buffer)
            self.buffer = None


class Headers:
    """Reads one member's header records (pax headers, GNU long names) and applies them.

    Records are bounded before they are read (:data:`MAX_HEADER_RECORD`), at most
    :data:`MAX_HEADER_RECORDS` come before one member, and global pax headers (which hold for
    the rest of the archive) are kept here.
    """

    def __init__(self) -> None:
        # False once a global pax header was read: a resumed stream would start without it.
        self.resumable = True
        self.global_pax: dict[str, str] = {}
        self.global_bytes = 0  # bytes of global pax headers read so far

    def next(self, reader: Reader) -> Header | None:
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
                    raise Malformed("empty file")
                return None  # the stream ended where a header could begin
            if len(block) < tarfile.BLOCKSIZE:
                raise Malformed("truncated header")
            if block == NUL_BLOCK:
                return None  # the end-of-archive marker
            info = Header.parse(block, at)
            if info.size < 0:
                refuse_header(info, "declares a negative size")
            if info.type == tarfile.GNUTYPE_SPARSE:
                refuse_header(info, "is a sparse file")  # its map is read from any number of blocks
            kind = RECORD_KINDS.get(info.type)
            if kind is None:
                return self._apply(info, pax, long_names)
            if info.size > MAX_HEADER_RECORD:
                refuse_header(info, f"is a {kind} of {info.size} bytes, more than {MAX_HEADER_RECORD}")
            record = reader.take(info.size)
            if len(record) < info.size:
                raise Malformed("unexpected end of data")
            reader.skip(padded(info.size) - info.size)
            if info.type == tarfile.XGLTYPE:  # global headers add up for the whole archive
                self.resumable = False  # a resumed stream would start without them
                self.global_bytes += info.size
                if self.global_bytes > MAX_HEADER_RECORD:
                    refuse_header(info, f"brings global pax headers over {MAX_HEADER_RECORD} bytes")
                self.global_pax.update(pax_records(record))
            elif kind == "pax header":
                pax.update(pax_records(record))
            else:
                long_names[info.type] = record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        refuse_header(info, f"is one of more than {MAX_HEADER_RECORDS} header records in a row")

    def _apply(self, info: Header, pax: dict[str, str], long_names: dict[bytes, str]) -> Header:
        """Give ``info`` what the records before it say: long names, then pax (global, then its own)."""
        if tarfile.GNUTYPE_LONGNAME in long_names:
            info.name = long_names[tarfile.GNUTYPE_LONGNAME]
        if tarfile.GNUTYPE_LONGLINK in long_names:
            info.linkname = long_names[tarfile.GNUTYPE_LONGLINK]
        for headers in (self.global_pax, pax):
            for keyword, value in headers.items():
                if keyword.startswith("GNU.sparse."):
                    refuse_header(info, "is a sparse file")
                if keyword == "path":
                    info.name = value.rstrip("/")
                elif keyword == "linkpath":
                    info.linkname = value
                elif keyword == "size":
                    if not value.isdigit() or not value.isascii():
                        raise Malformed(f"pax size {echo(value)} is not a number of bytes")
                    info.size = int(value)
                elif keyword == "mtime":
                    with contextlib.suppress(ValueError):
                        info.mtime = float(value)
        return info


def refuse_header(info: Header, why: str) -> NoReturn:
    """Refuse a header record: an unsafe member, named by where it is in the tar."""
    raise UnsafeArchiveError(
        f"refusing the tar header {echo(info.name)} at byte {info.offset}: it {why}",
        member=shorten(info.name, PATH_MAX),
    )


def pax_records(record: bytes) -> Iterator[tuple[str, str]]:
    """The ``length keyword=value`` records of a pax header (values UTF-8, as tarfile reads them)."""
    pos = 0
    while pos < len(record) and record[pos] != 0:
        space = record.find(b" ", pos, pos + 21)
        equals = record.find(b"=", space)
        digits = record[pos:space]
        if space <= pos or not digits.isdigit():
            raise Malformed("invalid pax header record")
        length = int(digits)
        end = pos + length
        if length == 0 or equals == -1 or equals >= end or end > len(record) or record[end - 1] != 0x0A:
            raise Malformed("invalid pax header record")
        keyword = record[space + 1 : equals].decode("utf-8", "surrogateescape")
        yield keyword, record[equals + 1 : end - 1].decode("utf-8", "surrogateescape")
        pos = end
