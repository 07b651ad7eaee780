from __future__ import annotations

import io
import os
import tarfile
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
from downloader_service.archive import extract_cart
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


def test_extract_cart_gzip_bomb_posing_as_tar_is_refused(tmp_path: Path) -> None:
    import gzip

    bomb = gzip.compress(b"\0" * (20 << 20))
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
    assert tree(target) == {"data/a/b/foo.txt": FOO, "data/bar.txt": BAR, "data/keep/mine.txt": b"mine"}


def test_extract_cart_refuses_filename_with_a_slash(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="single directory name"):
        extract_cart(io.BytesIO(build_tar(GOOD)), tmp_path, "../data", FILES)


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
