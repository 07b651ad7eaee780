"""Bundled carts: when they are asked for, their uid top directory, and resuming a cut stream."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from downloader_service import CartAPI, Downloader, DownloadInterruptedError, UnsafeArchiveError
from downloader_service.archive import extract_cart
from downloader_service.cartfile import CartFile
from tests.fakecartd import FakeCartd, Member, build_tar, cart_tar, cut_after, sha1

UID = "0b7e4d1c-1f2a-4c55-9a0e-3d1b6f0e9a11"


def stored(fake: FakeCartd, count: int, size: int) -> tuple[list[CartFile], dict[str, bytes]]:
    """``count`` random files of ``size`` bytes in the fake, as cart files and by path."""
    files, contents = [], {}
    for index in range(count):
        data = os.urandom(size)
        fake.add(index + 1, data)
        path = f"d{index % 3}/f{index}.bin"
        files.append(CartFile(str(index + 1), path, "sha1", sha1(data), size))
        contents[path] = data
    return files, contents


def bundle_size(fake: FakeCartd, files: list[CartFile]) -> int:
    """The length of the bundle tar the fake serves for ``files``."""
    return len(cart_tar([file.as_cartd() for file in files], fake.contents, UID))


def assert_landed(root: Path, contents: dict[str, bytes]) -> None:
    for path, data in contents.items():
        assert (root / path).read_bytes() == data
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no staging left behind


def test_setup_cart_bundle_posts_the_bundle_flag(fake_cartd: FakeCartd) -> None:
    api = CartAPI(fake_cartd.url)
    obj = {**fake_cartd.add(1, b"x"), "path": "x"}
    bundled = api.setup_cart(lambda: iter([obj]), bundle=True)
    plain = api.setup_cart(lambda: iter([obj]))  # the upstream call
    assert fake_cartd.carts[bundled.rpartition("/")[2]].bundle
    assert not fake_cartd.carts[plain.rpartition("/")[2]].bundle


@pytest.mark.parametrize(("threshold", "bundled"), [(40_000, True), (40_001, False)])
def test_download_bundles_from_the_size_threshold(
    fake_cartd: FakeCartd, tmp_path: Path, threshold: int, bundled: bool
) -> None:
    files, contents = stored(fake_cartd, 4, 10_000)
    downloader = Downloader(tmp_path, fake_cartd.url, bundle_threshold=threshold)
    result = downloader.download(files)
    assert [cart.bundle for cart in fake_cartd.carts.values()] == [bundled]
    assert result.file_count == 4 and result.bytes == 40_000
    assert_landed(tmp_path / "data", contents)


@pytest.mark.parametrize("bundle", [True, False])
def test_download_bundle_setting_overrides_the_threshold(
    fake_cartd: FakeCartd, tmp_path: Path, bundle: bool
) -> None:
    files, contents = stored(fake_cartd, 2, 100)
    Downloader(
        tmp_path, fake_cartd.url, bundle=bundle, bundle_threshold=1 if not bundle else 10**12
    ).download(files)
    assert [cart.bundle for cart in fake_cartd.carts.values()] == [bundle]
    assert_landed(tmp_path / "data", contents)


def test_download_unknown_sizes_do_not_bundle(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    files, _ = stored(fake_cartd, 1, 100)
    Downloader(tmp_path, fake_cartd.url, bundle_threshold=0).download(files)  # 0 bytes >= 0
    unsized = [CartFile(f.id, f.path, f.hashtype, f.hashsum) for f in files]
    Downloader(tmp_path / "b", fake_cartd.url, bundle_threshold=1).download(unsized)
    assert [cart.bundle for cart in fake_cartd.carts.values()] == [True, False]


def test_downloader_refuses_an_unknown_bundle_setting() -> None:
    with pytest.raises(ValueError, match="bundle"):
        Downloader("/tmp", "http://127.0.0.1:1", bundle="yes")


def test_extract_cart_places_the_uid_top_directory_as_filename(tmp_path: Path) -> None:
    data = b"hello\n"
    files = [CartFile("1", "a/b.txt", "sha1", sha1(data))]
    tar = build_tar([Member(UID, type=tarfile.DIRTYPE), Member(f"{UID}/a", type=tarfile.DIRTYPE)])
    tar = tar[: -2 * tarfile.BLOCKSIZE] + build_tar([Member(f"{UID}/a/b.txt", data)])
    result = extract_cart(io.BytesIO(tar), tmp_path, "out", files, top=UID)
    assert result.root == tmp_path / "out"
    assert (tmp_path / "out/a/b.txt").read_bytes() == data
    assert not (tmp_path / UID).exists()


HOSTILE = [
    (Member(f"{UID}/../evil.txt", b"x"), "'[.][.]'"),
    (Member(f"{UID}/link", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "symbolic link"),
    (Member(f"{UID}/hard", type=tarfile.LNKTYPE, linkname=f"{UID}/a.txt"), "hard link"),
    (Member(f"{UID}/dev", type=tarfile.CHRTYPE), "device"),
    (Member(f"{UID}/extra.txt", b"x"), "not requested"),
    (Member("other-uid/a.txt", b"x"), "outside"),
    (Member(f"/{UID}/a.txt", b"x"), "absolute"),
    (Member("data/a.txt", b"a"), "twice"),  # the same file under filename/ and under uid/
]


@pytest.mark.parametrize(("member", "why"), HOSTILE, ids=[why for _, why in HOSTILE])
def test_extract_cart_bundle_still_refuses_hostile_members(tmp_path: Path, member: Member, why: str) -> None:
    files = [CartFile("1", "a.txt", "sha1", sha1(b"a"))]
    tar = build_tar([Member(f"{UID}/a.txt", b"a"), member])
    with pytest.raises(UnsafeArchiveError, match=why):
        extract_cart(io.BytesIO(tar), tmp_path, "data", files, top=UID)
    assert list(tmp_path.iterdir()) == []


def test_download_bundle_refuses_hostile_members_from_cartd(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    files, _ = stored(fake_cartd, 1, 100)
    fake_cartd.body = lambda cart, filename: [build_tar([Member(f"{cart.uid}/../../x", b"x")])]
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        Downloader(tmp_path, fake_cartd.url, bundle=True).download(files)
    assert list(tmp_path.iterdir()) == []


def test_download_bundle_cut_at_90_percent_resumes_with_range(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    files, contents = stored(fake_cartd, 20, 50_000)
    size = bundle_size(fake_cartd, files)
    fake_cartd.bundle_cuts = [size * 9 // 10]
    result = Downloader(tmp_path, fake_cartd.url, bundle=True).download(files)
    assert result.file_count == 20 and result.bytes == 20 * 50_000
    assert_landed(tmp_path / "data", contents)
    assert fake_cartd.ranges[0] == "" and fake_cartd.ranges[1].startswith("bytes=")
    assert len(fake_cartd.ranges) == 2
    # Resumed at the very byte where the stream broke, inside a file: nothing is fetched twice,
    # and the file cut midway is still verified whole (its hash went on from the bytes on disk).
    assert fake_cartd.ranges[1] == f"bytes={size * 9 // 10}-"
    assert fake_cartd.bytes_sent == size


def test_download_bundle_resumes_each_cut_from_the_last_byte_written(
    fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    files, contents = stored(fake_cartd, 3, 200_000)
    size = bundle_size(fake_cartd, files)
    # Inside the first file's data, in a header, then inside the last file's data.
    fake_cartd.bundle_cuts = [100_000, 200_000 + 3 * 512 + 600, size - 50_000]
    result = Downloader(tmp_path, fake_cartd.url, bundle=True).download(files)
    starts = [int(r[len("bytes=") : -1]) for r in fake_cartd.ranges[1:]]
    # Inside a file: on from the very byte. Inside a header: from that member's first header.
    assert starts[0] == 100_000 and starts[2] == size - 50_000
    assert 200_000 + 3 * 512 + 600 - 2048 <= starts[1] < 200_000 + 3 * 512 + 600
    assert fake_cartd.bytes_sent == size + (200_000 + 3 * 512 + 600 - starts[1])
    assert result.bytes == 600_000
    assert_landed(tmp_path / "data", contents)


def test_download_bundle_of_large_files_resumes_from_the_last_byte_the_writer_wrote(
    fake_cartd: FakeCartd, tmp_path: Path
) -> None:
    # 1 MiB files go through the writer thread; cuts inside the second and the last file.
    files, contents = stored(fake_cartd, 4, 1 << 20)
    size = bundle_size(fake_cartd, files)
    fake_cartd.bundle_cuts = [(1 << 20) + (1 << 19), size - 4096]
    result = Downloader(tmp_path, fake_cartd.url, bundle=True).download(files)
    assert fake_cartd.ranges[1:] == [f"bytes={(1 << 20) + (1 << 19)}-", f"bytes={size - 4096}-"]
    assert fake_cartd.bytes_sent == size  # each resume went on from the last byte written
    assert result.bytes == 4 << 20
    assert_landed(tmp_path / "data", contents)


def test_download_bundle_gives_up_after_max_resumes(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    files, _ = stored(fake_cartd, 1, 300_000)
    fake_cartd.bundle_cuts = [50_000 * n for n in range(1, 6)]
    with pytest.raises(DownloadInterruptedError) as caught:
        Downloader(tmp_path, fake_cartd.url, bundle=True, max_resumes=2).download(files)
    assert caught.value.retryable
    assert len(fake_cartd.ranges) == 3  # the first GET and two resumes
    assert list(tmp_path.iterdir()) == []


def test_download_bundle_server_ignoring_range_starts_over(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    files, contents = stored(fake_cartd, 10, 30_000)
    size = bundle_size(fake_cartd, files)
    fake_cartd.honour_range = False
    fake_cartd.bundle_cuts = [size * 9 // 10]
    result = Downloader(tmp_path, fake_cartd.url, bundle=True).download(files)
    assert fake_cartd.ranges[1].startswith("bytes=")  # asked for a range, got the whole tar
    assert result.file_count == 10 and result.bytes == 300_000
    assert_landed(tmp_path / "data", contents)
    assert fake_cartd.bytes_sent == size * 9 // 10 + size


def test_download_plain_cart_cut_is_not_resumed(fake_cartd: FakeCartd, tmp_path: Path) -> None:
    files, _ = stored(fake_cartd, 2, 100_000)
    data = cart_tar([file.as_cartd() for file in files], fake_cartd.contents, "data")
    fake_cartd.body = lambda cart, filename: cut_after(data, 150_000)
    with pytest.raises(DownloadInterruptedError):
        Downloader(tmp_path, fake_cartd.url, bundle=False).download(files)
    assert fake_cartd.ranges == [""]
    assert list(tmp_path.iterdir()) == []


def test_open_cart_with_offset_reads_from_there(fake_cartd: FakeCartd) -> None:
    files, _ = stored(fake_cartd, 1, 5_000)
    api = CartAPI(fake_cartd.url)
    bundled = api.setup_cart(lambda: iter([files[0].as_cartd()]), bundle=True)
    whole = cart_tar([files[0].as_cartd()], fake_cartd.contents, bundled.rpartition("/")[2])
    with api.open_cart(bundled) as stream:
        assert stream.resumable and stream.start == 0 and stream.length == len(whole)
    with api.open_cart(bundled, offset=1024) as stream:
        assert stream.start == 1024 and stream.read(100_000) == whole[1024:]
    fake_cartd.honour_range = False
    with api.open_cart(bundled, offset=1024) as stream:
        assert stream.start == 0
    plain = api.setup_cart(lambda: iter([files[0].as_cartd()]))
    with api.open_cart(plain) as stream:
        assert not stream.resumable and stream.length is None
