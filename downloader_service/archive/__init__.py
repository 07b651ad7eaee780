"""The cart's tar: streamed member by member onto disk, refused if unsafe, verified by hash.

One thread reads the network into a few reusable buffers and checks headers, a second hashes
and writes the data, so both cores work. Nothing is held in memory beyond those buffers and
one member's headers: a header record (pax header, GNU long name) larger than
:data:`MAX_HEADER_RECORD` is refused before it is read. Files are written into a private
staging directory beside the target and only moved into place once *every* requested file
has arrived and matched its checksum, so a failed or interrupted download leaves nothing
that looks complete, and never touches files already at the target.

The package, along its seams (each imports only the ones above it)::

    tarstream.py   header blocks, header records, the buffered Reader   (reads, writes nothing)
    writer.py      the Writer thread: hashes and writes; its Ledger      (uses tarstream.Buffers)
    commit.py      moving the verified tree into place, or undoing it
    extract.py     extract_cart: one cart through all three
"""

from .extract import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_RESUMES,
    MAX_FILENAME_BYTES,
    ExtractResult,
    PathList,
    check_destination,
    check_filename,
    extract_cart,
)
from .tarstream import MAX_HEADER_RECORD, MAX_HEADER_RECORDS, RangeReadable, Readable, Resume

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_RESUMES",
    "MAX_FILENAME_BYTES",
    "MAX_HEADER_RECORD",
    "MAX_HEADER_RECORDS",
    "ExtractResult",
    "PathList",
    "RangeReadable",
    "Readable",
    "Resume",
    "check_destination",
    "check_filename",
    "extract_cart",
]
