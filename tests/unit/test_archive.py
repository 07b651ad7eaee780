from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterable
from pathlib import Path

import pytest

from downloader_service import (
    CartFile,
    DownloadInterruptedError,
    HashMismatchError,
    InvalidInputError,
    LocalStorageError,
    MissingFileError,
    UnsafeArchiveError,
)
from downloader_service.archive import MAX_HEADER_RECORD, extract_cart
from downloader_service.archive.commit import merge
from downloader_service.progress import DownloadProgress
from tests.fakecartd import Member, build_tar, sha1

FOO = b"foo\n" * 1000
BAR = b"bar\n"
FILES = [
    CartFile("1", "a/b/foo.txt", "sha1", sha1(FOO)),
    CartFile("2", "bar.txt", "sha1", sha1(BAR)),
]
DIRS = [Member("data", type=tarfile.DIRTYPE), Member("data/a", type=tarfile.DIRTYPE)]
GOOD = [
    *DIRS,
    Member("data/a/b", type=tarfile.DIRTYPE),
    Member("data/a/b/foo.txt", FOO),
    Member("data/bar.txt", BAR),
]


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (relative path -> bytes); fails on anything else."""
    found: dict[str, bytes] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            assert path.is_file() and not path.is_symlink(), path
            found[str(path.relative_to(root))] = path.read_bytes()
    return found


def extract(tmp_path: Path, data: bytes, files: list[CartFile] | None = FILES, **kwargs: object) -> Path:
    target = tmp_path / "dest"
    extract_cart(io.BytesIO(data), target, "data", files, **kwargs)  # type: ignore[arg-type]
    return target


def test_extract_cart_writes_verified_files_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "dest"
    result = extract_cart(io.BytesIO(build_tar(GOOD)), target, "data", FILES, chunk_size=1000)
    assert tree(target) == {"data/a/b/foo.txt": FOO, "data/bar.txt": BAR}
    assert result.root == target / "data"
    assert result.files == (target / "data/a/b/foo.txt", target / "data/bar.txt")
    assert result.bytes == len(FOO) + len(BAR)
    assert (target / "data/bar.txt").stat().st_mtime == 1_500_000_000


def test_extract_cart_creates_parents_missing_from_the_tar(tmp_path: Path) -> None:
    target = extract(tmp_path, build_tar([Member("data/a/b/foo.txt", FOO), Member("data/bar.txt", BAR)]))
    assert tree(target) == {"data/a/b/foo.txt": FOO, "data/bar.txt": BAR}


def test_extract_cart_reports_progress(tmp_path: Path) -> None:
    events: list[tuple[str, object]] = []

    class Recorder(DownloadProgress):
        def file_started(self, path: str, size: int) -> None:
            events.append(("start", (path, size)))

        def file_advanced(self, nbytes: int) -> None:
            events.append(("advance", nbytes))

        def file_finished(self, path: str) -> None:
            events.append(("done", path))

    extract(tmp_path, build_tar(GOOD), progress=Recorder(), chunk_size=1024)
    assert events[0] == ("start", ("a/b/foo.txt", len(FOO)))
    assert sum(n for kind, n in events if kind == "advance") == len(FOO) + len(BAR)  # type: ignore[misc]
    assert [e for e in events if e[0] == "done"] == [("done", "a/b/foo.txt"), ("done", "bar.txt")]


HOSTILE = {
    "parent traversal": ([Member("data/../evil.txt", b"x")], "'..'"),
    "deep traversal": ([Member("data/a/../../../evil.txt", b"x")], "'..'"),
    "absolute path": ([Member("/tmp/evil.txt", b"x")], "absolute"),
    "symlink": ([Member("data/a/b/foo.txt", type=tarfile.SYMTYPE, linkname="/etc/passwd")], "symbolic link"),
    "symlink then write-through": (
        [Member("data/a", type=tarfile.SYMTYPE, linkname="/tmp"), Member("data/a/b/foo.txt", FOO)],
        "symbolic link",
    ),
    "hardlink to a system file": (
        [Member("data/bar.txt", type=tarfile.LNKTYPE, linkname="/etc/passwd")],
        "hard link",
    ),
    "character device": ([Member("data/bar.txt", type=tarfile.CHRTYPE)], "device"),
    "block device": ([Member("data/bar.txt", type=tarfile.BLKTYPE)], "device"),
    "fifo": ([Member("data/bar.txt", type=tarfile.FIFOTYPE)], "fifo"),
    "outside filename": ([Member("other/bar.txt", BAR)], "outside 'data/'"),
    "unrequested file": ([Member("data/bar.txt", BAR), Member("data/extra.sh", b"#!")], "not requested"),
    "unrequested directory": ([Member("data/zzz", type=tarfile.DIRTYPE)], "no requested file"),
    "duplicate member": ([Member("data/bar.txt", BAR), Member("data/bar.txt", BAR)], "twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_extract_cart_refuses_hostile_member_and_writes_nothing(tmp_path: Path, case: str) -> None:
    members, why = HOSTILE[case]
    target = tmp_path / "dest"
    with pytest.raises(UnsafeArchiveError, match=why) as info:
        extract_cart(io.BytesIO(build_tar([*DIRS, *members])), target, "data", FILES)
    assert info.value.member == (members[0] if case == "symlink then write-through" else members[-1]).name
    assert not info.value.retryable
    assert list(target.iterdir()) == []  # the staging directory is gone too
    assert not (tmp_path / "evil.txt").exists()


def test_extract_cart_refuses_a_link_even_unverified(tmp_path: Path) -> None:
    data = build_tar([Member("data/x", type=tarfile.SYMTYPE, linkname="/etc")])
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        extract(tmp_path, data, files=None)


def test_extract_cart_unverified_takes_any_regular_file_under_filename(tmp_path: Path) -> None:
    target = extract(
        tmp_path, build_tar([Member("data/z/any.bin", b"zz"), Member("data/y", b"y")]), files=None
    )
    assert tree(target) == {"data/z/any.bin": b"zz", "data/y": b"y"}


def test_extract_cart_flipped_byte_is_hash_mismatch(tmp_path: Path) -> None:
    flipped = bytearray(FOO)
    flipped[1234] ^= 0x01
    members = [Member("data/a/b/foo.txt", bytes(flipped)), Member("data/bar.txt", BAR)]
    with pytest.raises(HashMismatchError) as info:
        extract(tmp_path, build_tar(members))
    assert info.value.path == "a/b/foo.txt"
    assert info.value.expected == sha1(FOO)
    assert info.value.actual == sha1(bytes(flipped))
    assert sha1(FOO) in str(info.value) and sha1(bytes(flipped)) in str(info.value)
    assert list((tmp_path / "dest").iterdir()) == []


# Files from _INLINE_BELOW (512 KiB) on are hashed and written by the writer thread while the
# reader reads on; smaller ones by the reader itself. A mix takes turns between the two.
BIG = [os.urandom(700_000), os.urandom(3 << 20), b"small\n", os.urandom(600_000)]
BIG_FILES = [CartFile(str(i), f"big/{i}.bin", "sha1", sha1(data)) for i, data in enumerate(BIG)]
BIG_TAR = [Member("data", type=tarfile.DIRTYPE), *(Member(f"data/big/{i}.bin", d) for i, d in enumerate(BIG))]


def test_extract_cart_large_and_small_files_in_turn_land_verified_in_order(tmp_path: Path) -> None:
    events: list[tuple[str, str | int]] = []

    class Recorder(DownloadProgress):
        def file_started(self, path: str, size: int) -> None:
            events.append(("start", path))

        def file_advanced(self, nbytes: int) -> None:
            events.append(("advance", nbytes))

        def file_finished(self, path: str) -> None:
            events.append(("done", path))

    result = extract_cart(
        io.BytesIO(build_tar(BIG_TAR)), tmp_path, "data", BIG_FILES, Recorder(), chunk_size=64 << 10
    )
    assert tree(tmp_path / "data") == {f"big/{i}.bin": data for i, data in enumerate(BIG)}
    assert result.bytes == sum(map(len, BIG))
    # Each file is started, advanced and finished before the next starts, in the tar's order.
    order = [(kind, value) for kind, value in events if kind != "advance"]
    assert order == [(kind, f"big/{i}.bin") for i in range(len(BIG)) for kind in ("start", "done")]
    assert sum(int(n) for kind, n in events if kind == "advance") == sum(map(len, BIG))


@pytest.mark.parametrize("which", [0, 1, 3])
def test_extract_cart_writer_thread_mismatch_stops_everything_and_leaves_nothing(
    tmp_path: Path, which: int
) -> None:
    broken = list(BIG)
    broken[which] = bytes([broken[which][0] ^ 1]) + broken[which][1:]
    members = [BIG_TAR[0], *(Member(f"data/big/{i}.bin", d) for i, d in enumerate(broken))]
    with pytest.raises(HashMismatchError) as info:
        extract(tmp_path, build_tar(members), files=BIG_FILES, chunk_size=64 << 10)
    assert info.value.path == f"big/{which}.bin"
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("cut", [700_000 // 2, 700_000 + 1536 + (3 << 20) - 5, -2000])
def test_extract_cart_large_file_cut_short_is_an_error_and_leaves_nothing(tmp_path: Path, cut: int) -> None:
    data = build_tar(BIG_TAR)
    with pytest.raises(DownloadInterruptedError, match="cut short or malformed"):
        extract(tmp_path, data[:cut], files=BIG_FILES)
    assert list((tmp_path / "dest").iterdir()) == []


class _CutStream:
    """The tar up to ``cut`` bytes, then a broken connection; ``start`` is where it begins."""

    def __init__(self, data: bytes, cut: int, start: int = 0) -> None:
        self.data, self.cut, self.start, self.pos = data, cut, start, 0

    def read(self, size: int = -1) -> bytes:
        if self.pos >= self.cut:
            raise DownloadInterruptedError("the connection broke")
        chunk = self.data[self.pos : min(self.pos + (size if size >= 0 else self.cut), self.cut)]
        self.pos += len(chunk)
        return chunk


@pytest.mark.parametrize("size", [100_000, 3 << 20], ids=["written inline", "written by the thread"])
@pytest.mark.parametrize("changed", [False, True], ids=["same bytes", "other bytes after the cut"])
def test_extract_cart_resumed_inside_a_file_goes_on_and_still_verifies_it_whole(
    tmp_path: Path, size: int, changed: bool
) -> None:
    content = os.urandom(size)
    files = [CartFile("1", "f.bin", "sha1", sha1(content))]
    data = build_tar([Member("data", type=tarfile.DIRTYPE), Member("data/f.bin", content)])
    cut = len(data) // 2
    served = bytearray(data)
    if changed:
        served[cut + 10] ^= 1  # the resumed stream is not the tar the first one began
    offsets: list[int] = []

    def resume(offset: int) -> contextlib.AbstractContextManager[_CutStream]:
        offsets.append(offset)
        return contextlib.nullcontext(_CutStream(bytes(served[offset:]), len(served), start=offset))

    stream = _CutStream(data, cut)
    if changed:
        with pytest.raises(HashMismatchError):
            extract_cart(stream, tmp_path, "data", files, resume=resume)  # type: ignore[arg-type]
        assert list(tmp_path.iterdir()) == []
    else:
        extract_cart(stream, tmp_path, "data", files, resume=resume)  # type: ignore[arg-type]
        assert (tmp_path / "data/f.bin").read_bytes() == content
    assert offsets == [cut]  # on from the very byte, not from the file's header


def test_extract_cart_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"bar\.txt") as info:
        extract(tmp_path, build_tar([Member("data/a/b/foo.txt", FOO)]))
    assert info.value.missing == ["data/bar.txt"]
    assert info.value.retryable
    assert list((tmp_path / "dest").iterdir()) == []


@pytest.mark.parametrize("cut", [100, 512, 700, 4096 + 512 + 10, -1024 - 512 - 1])
def test_extract_cart_truncated_stream_is_never_a_success(tmp_path: Path, cut: int) -> None:
    data = build_tar(GOOD)
    with pytest.raises((DownloadInterruptedError, MissingFileError)):
        extract(tmp_path, data[:cut])
    assert list((tmp_path / "dest").iterdir()) == []


def test_extract_cart_huge_declared_size_is_refused_before_writing(tmp_path: Path) -> None:
    data = build_tar([Member("data/bar.txt", BAR, size=1 << 60)], end=False)
    with pytest.raises(LocalStorageError, match="declares 1152921504606846976 bytes"):
        extract(tmp_path, data)


# gzip writes its mtime into the header. With mtime 25215 the first 512 bytes, read as signed
# bytes, sum to -256: their checksum "matches" an empty checksum field (0), which tarfile
# accepted too, so one run in a few thousand saw a member named '\x1f\x8b\x08' instead.
@pytest.mark.parametrize("mtime", [0, 25215])
def test_extract_cart_gzip_bomb_posing_as_tar_is_refused(tmp_path: Path, mtime: int) -> None:
    import gzip

    bomb = gzip.compress(b"\0" * (20 << 20), mtime=mtime)
    with pytest.raises(DownloadInterruptedError, match="malformed"):
        extract(tmp_path, bomb)
    assert list((tmp_path / "dest").iterdir()) == []


def test_extract_cart_garbage_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadInterruptedError):
        extract(tmp_path, b"<html>502 Bad Gateway</html>" * 40)


def test_extract_cart_failure_keeps_existing_files_untouched(tmp_path: Path) -> None:
    target = tmp_path / "dest"
    (target / "data").mkdir(parents=True)
    (target / "data/bar.txt").write_bytes(b"precious")
    with pytest.raises(MissingFileError):
        extract(tmp_path, build_tar([Member("data/bar.txt", BAR)]))
    assert tree(target) == {"data/bar.txt": b"precious"}


def test_extract_cart_success_merges_into_an_existing_tree(tmp_path: Path) -> None:
    target = tmp_path / "dest"
    (target / "data/keep").mkdir(parents=True)
    (target / "data/keep/mine.txt").write_bytes(b"mine")
    (target / "data/bar.txt").write_bytes(b"old")
    extract(tmp_path, build_tar(GOOD))
    assert tree(target) == {
        "data/a/b/foo.txt": FOO,
        "data/bar.txt": BAR,
        "data/bar.txt.~1~": b"old",  # a file with other content is kept, never silently lost
        "data/keep/mine.txt": b"mine",
    }


def test_extract_cart_refuses_filename_with_a_slash(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="single directory name"):
        extract_cart(io.BytesIO(build_tar(GOOD)), tmp_path, "../data", FILES)


@pytest.mark.parametrize("filename", ["f" * 241, "d\udc80"], ids=["too-long-for-staging", "surrogate"])
def test_extract_cart_refuses_a_filename_the_disk_cannot_hold(tmp_path: Path, filename: str) -> None:
    # the staging directory is ".<filename>.part-XXXXXXXX": 241 bytes make it 256, over NAME_MAX
    with pytest.raises(InvalidInputError, match="filename"):
        extract_cart(io.BytesIO(build_tar(GOOD)), tmp_path, filename, FILES)
    assert list(tmp_path.iterdir()) == []


def test_extract_cart_unwritable_destination_is_local_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(LocalStorageError):
        extract_cart(io.BytesIO(build_tar(GOOD)), blocker / "sub", "data", FILES)


@pytest.mark.parametrize("size", ["lots", "-5", "1e400"])
def test_extract_cart_hostile_pax_size_is_an_error_not_a_crash(tmp_path: Path, size: str) -> None:
    info = tarfile.TarInfo("data/bar.txt")
    info.size = len(BAR)
    info.pax_headers = {"size": size}
    data = info.tobuf(tarfile.PAX_FORMAT) + BAR + b"\0" * (512 - len(BAR)) + b"\0" * 1024
    with pytest.raises((HashMismatchError, DownloadInterruptedError)):
        extract(tmp_path, data)
    assert list((tmp_path / "dest").iterdir()) == []


def test_extract_cart_absurd_mtime_still_writes_the_file(tmp_path: Path) -> None:
    info = tarfile.TarInfo("data/bar.txt")
    info.size = len(BAR)
    info.pax_headers = {"mtime": "1e300"}
    members = info.tobuf(tarfile.PAX_FORMAT) + BAR + b"\0" * (512 - len(BAR))
    foo = build_tar([Member("data/a/b/foo.txt", FOO)], end=True)
    target = extract(tmp_path, members + foo)
    assert tree(target) == {"data/a/b/foo.txt": FOO, "data/bar.txt": BAR}


# -- committing into a tree that is already there ------------------------------------------


def outside_and_target(tmp_path: Path) -> tuple[Path, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "dest"
    target.mkdir()
    return outside, target


@pytest.mark.parametrize(
    ("link", "points_to"),
    [("data", "."), ("data/a", "."), ("data/a/b", "."), ("data/bar.txt", "bar.txt")],
)
def test_extract_cart_never_writes_through_a_link_in_the_target(
    tmp_path: Path, link: str, points_to: str
) -> None:
    outside, target = outside_and_target(tmp_path)
    (outside / "bar.txt").write_bytes(b"theirs")
    (target / link).parent.mkdir(parents=True, exist_ok=True)
    (target / link).symlink_to(outside / points_to)
    before = tree(outside)
    with pytest.raises(LocalStorageError, match="symbolic link") as info:
        extract(tmp_path, build_tar(GOOD))
    assert info.value.path == link
    assert not info.value.retryable  # the link will still be there
    assert tree(outside) == before
    assert sorted(p.name for p in target.iterdir()) == ["data"]  # no staging leftovers


CONFLICTS = {
    # the first file sorts before the conflict, so a commit that moves as it goes replaces it
    "file where a directory must go": "data/b",
    "directory where a file must go": "data/b/y.txt/",
}


@pytest.mark.parametrize("case", sorted(CONFLICTS))
def test_extract_cart_conflict_is_found_before_anything_moves(tmp_path: Path, case: str) -> None:
    files = [CartFile("1", "a/x.txt", "sha1", sha1(FOO)), CartFile("2", "b/y.txt", "sha1", sha1(BAR))]
    target = tmp_path / "dest"
    (target / "data/a").mkdir(parents=True)
    (target / "data/a/x.txt").write_bytes(b"edited by hand")
    blocker = CONFLICTS[case]
    if blocker.endswith("/"):
        (target / blocker).mkdir(parents=True)
    else:
        (target / blocker).write_bytes(b"in the way")
    before = tree(target)
    tar = build_tar([Member("data/a/x.txt", FOO), Member("data/b/y.txt", BAR)])
    with pytest.raises(LocalStorageError, match="needs a") as info:
        extract(tmp_path, tar, files=files)
    assert info.value.path == blocker.rstrip("/")
    assert not info.value.retryable
    assert tree(target) == before
    assert sorted(p.name for p in target.iterdir()) == ["data"]


def test_extract_cart_keeps_a_changed_file_under_the_next_free_backup_name(tmp_path: Path) -> None:
    target = tmp_path / "dest"
    (target / "data").mkdir(parents=True)
    (target / "data/bar.txt").write_bytes(b"edited")
    (target / "data/bar.txt.~1~").write_bytes(b"an older backup")
    result = extract_cart(io.BytesIO(build_tar([*DIRS, *GOOD[2:]])), target, "data", FILES)
    assert tree(target) == {
        "data/a/b/foo.txt": FOO,
        "data/bar.txt": BAR,
        "data/bar.txt.~1~": b"an older backup",
        "data/bar.txt.~2~": b"edited",
    }
    assert result.files == (target / "data/a/b/foo.txt", target / "data/bar.txt")


def test_extract_cart_same_file_again_makes_no_backup(tmp_path: Path) -> None:
    extract(tmp_path, build_tar(GOOD))
    extract(tmp_path, build_tar(GOOD))
    assert tree(tmp_path / "dest") == {"data/a/b/foo.txt": FOO, "data/bar.txt": BAR}


def test_merge_undoes_every_move_when_one_fails(tmp_path: Path) -> None:
    target = tmp_path / "dest"
    (target / "data/a").mkdir(parents=True)
    (target / "data/a/x.txt").write_bytes(b"edited")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "x.txt").write_bytes(b"new")
    before = tree(target)
    # the plan finds no conflict; the second move fails (its staged file is gone) after the
    # first has made a backup, moved a file in and made a directory
    with pytest.raises(LocalStorageError, match="cannot put the cart into place"):
        merge(target, {"data/a/x.txt": staging / "x.txt", "data/new/y.txt": staging / "gone"})
    assert tree(target) == before
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*")) == ["data", "data/a", "data/a/x.txt"]
    assert (staging / "x.txt").read_bytes() == b"new"


# -- header records are bounded before they are read ---------------------------------------


def raw_header(name: str, type_: bytes, size: int) -> bytes:
    """One 512-byte header block announcing ``size`` bytes, whatever follows."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = type_, size, 1_500_000_000
    return info.tobuf(tarfile.GNU_FORMAT)


class LazyStream:
    """A tar stream made of byte strings and ``(filler, count)`` runs produced on demand."""

    def __init__(self, parts: Iterable[bytes | tuple[bytes, int]]) -> None:
        self.parts = list(parts)
        self.consumed = 0

    def read(self, size: int = -1) -> bytes:
        while self.parts:
            part = self.parts[0]
            if isinstance(part, bytes):
                self.parts[0] = part[size:] if size >= 0 else b""
                out = part[:size] if size >= 0 else part
            else:
                filler, count = part
                out = filler * min(count, size if size >= 0 else count, 1 << 16)
                self.parts[0] = (filler, count - len(out))
            if not out:
                self.parts.pop(0)
                continue
            self.consumed += len(out)
            return out
        return b""


def hostile_headers(kind: str) -> list[bytes | tuple[bytes, int]]:
    """A tar whose first member is preceded by a huge or endless header record."""
    member = [raw_header("data/bar.txt", tarfile.REGTYPE, len(BAR)), BAR + b"\0" * 508, b"\0" * 1024]
    if kind == "pax header of 64 MiB":
        size = 64 << 20
        record = f"{size} comment=".encode()
        return [
            raw_header("././@PaxHeader", tarfile.XHDTYPE, size),
            record,
            (b"a", size - len(record) - 1),
            b"\n",
            *member,
        ]
    if kind == "GNU long name of 16 MiB":
        size = 16 << 20
        return [raw_header("././@LongLink", tarfile.GNUTYPE_LONGNAME, size), (b"a", size), *member]
    if kind == "global pax headers of 64 KiB each":
        record = b"65536 comment=" + b"g" * (65536 - 15) + b"\n"
        return [
            p for _ in range(64) for p in (raw_header("pax_global_header", tarfile.XGLTYPE, 65536), record)
        ]
    if kind == "3000 pax headers in a row":
        record = b"12 comment=\n".ljust(512, b"\0")
        return [p for _ in range(3000) for p in (raw_header("././@PaxHeader", tarfile.XHDTYPE, 12), record)]
    if kind == "sparse member with endless map blocks":
        header = bytearray(raw_header("data/bar.txt", tarfile.GNUTYPE_SPARSE, 0))
        header[482] = 1  # isextended: a map block follows, which says another follows, ...
        header[148:156] = b"%06o\0 " % (sum(header[:148]) + 8 * 32 + sum(header[156:]))
        block = b"\0" * 504 + b"\1" + b"\0" * 7
        return [bytes(header), *[block] * 20000]
    raise AssertionError(kind)


HOSTILE_HEADERS = [
    "pax header of 64 MiB",
    "GNU long name of 16 MiB",
    "global pax headers of 64 KiB each",
    "3000 pax headers in a row",
    "sparse member with endless map blocks",
]


@pytest.mark.parametrize("kind", HOSTILE_HEADERS)
def test_extract_cart_refuses_hostile_header_records_before_reading_them(tmp_path: Path, kind: str) -> None:
    stream = LazyStream(hostile_headers(kind))
    with pytest.raises(UnsafeArchiveError, match="refusing the tar header") as info:
        extract_cart(stream, tmp_path / "dest", "data", FILES)  # type: ignore[arg-type]
    assert stream.consumed <= 2 * MAX_HEADER_RECORD + 64 * 1024  # one chunk past the limit at most
    assert len(str(info.value)) < 500
    assert list((tmp_path / "dest").iterdir()) == []


MEASURE = """
import resource, sys, tempfile
from pathlib import Path
from downloader_service import DownloaderError
from downloader_service.archive import extract_cart
from tests.unit.test_archive import FILES, LazyStream, hostile_headers
stream = LazyStream(hostile_headers(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as tmp:
    try:
        extract_cart(stream, Path(tmp), "data", FILES)
    except DownloaderError as exc:
        print(type(exc).__name__, len(str(exc)))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.parametrize("kind", ["pax header of 64 MiB", "GNU long name of 16 MiB"])
def test_extract_cart_hostile_header_records_leave_peak_memory_flat(kind: str) -> None:
    # Peak RSS belongs to a process, so it is measured in a fresh one (was +192 and +48 MiB).
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, kind],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\n")
    assert out[0].startswith("UnsafeArchiveError"), out
    assert int(out[1]) < 8, f"peak RSS grew by {out[1]} MiB"


def test_extract_cart_does_not_keep_every_member_in_memory(tmp_path: Path) -> None:
    import tracemalloc

    entries = [raw_header("data", tarfile.DIRTYPE, 0)] * 5000
    tracemalloc.start()
    try:
        stream = LazyStream([*entries, b"\0" * 1024])
        extract_cart(stream, tmp_path, "data", None, chunk_size=16 << 10)  # type: ignore[arg-type]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes"  # tarfile's list of members held ~2.4 MB (~480 B each)


def test_extract_cart_takes_cartd_pax_headers_for_long_paths(tmp_path: Path) -> None:
    path = "/".join(["d" * 250] * 12)  # 3,011 bytes: near MAX_PATH_BYTES, every part at NAME_MAX
    info = tarfile.TarInfo(f"data/{path}")
    info.size, info.mtime = len(BAR), 1_500_000_000.25  # Cartd's float mtimes: a pax header each
    data = info.tobuf(tarfile.PAX_FORMAT) + BAR + b"\0" * (512 - len(BAR)) + b"\0" * 1024
    target = extract(tmp_path, data, files=[CartFile("1", path, "sha1", sha1(BAR))])
    assert (target / "data" / path).read_bytes() == BAR


def test_extract_cart_refuses_a_negative_size(tmp_path: Path) -> None:
    data = raw_header("data/bar.txt", tarfile.REGTYPE, -5) + b"\0" * 1024
    with pytest.raises(UnsafeArchiveError, match="negative size"):
        extract(tmp_path, data)


def test_extract_cart_refuses_gnu_sparse_1_0_before_reading_its_map(tmp_path: Path) -> None:
    info = tarfile.TarInfo("data/bar.txt")
    info.size = 512
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "9"}
    data = info.tobuf(tarfile.PAX_FORMAT) + b"99999999999\n".ljust(512, b"1") + b"\0" * 1024
    with pytest.raises(UnsafeArchiveError, match="sparse"):
        extract(tmp_path, data)


def test_extract_cart_unverified_refuses_names_the_disk_cannot_hold(tmp_path: Path) -> None:
    for name, why in [("data/" + "n" * 300, "NAME_MAX"), ("data/f\udc80", "not valid Unicode")]:
        with pytest.raises(UnsafeArchiveError, match=why):
            extract(tmp_path, build_tar([Member(name, b"x")]), files=None)
    assert list((tmp_path / "dest").iterdir()) == []


def test_extract_cart_bounds_every_echoed_name(tmp_path: Path) -> None:
    name = "data/" + "z" * 60_000  # as long as a pax header may make it
    with pytest.raises(UnsafeArchiveError) as info:
        extract(tmp_path, build_tar([Member(name, b"x")]))
    assert len(str(info.value)) < 400
    assert len(info.value.member) <= 4096
