from __future__ import annotations

import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from downloader_service import (
    CartFailedError,
    CartTimeoutError,
    CartUnavailableError,
    Downloader,
    DownloadInterruptedError,
    DownloadResult,
    HashMismatchError,
    InvalidEventError,
    LocalStorageError,
    NoFilesError,
    UnsafeArchiveError,
)
from tests.events import file_obj, make_event
from tests.fakecartd import Cart, FakeCartd, Member, build_tar, cart_tar, closed_port, cut_after, sha1

FOO = b"foo\n" * 5000
BAR = b"bar\n"


@pytest.fixture
def event(fake_cartd: FakeCartd) -> dict[str, Any]:
    fake_cartd.add(34, FOO)
    fake_cartd.add(35, BAR)
    return make_event([file_obj(34, "foo.txt", "a/b/", FOO), file_obj(35, "bar.txt", "", BAR)])


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_cloudevent_downloads_verified_files_and_deletes_cart(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    downloader = Downloader(tmp_path / "dl", fake_cartd.url)
    result = downloader.cloudevent(event)
    assert downloader.wait_for_deletes(5)
    assert isinstance(result, DownloadResult)
    assert (tmp_path / "dl/data/a/b/foo.txt").read_bytes() == FOO
    assert (tmp_path / "dl/data/bar.txt").read_bytes() == BAR
    assert listing(tmp_path / "dl") == ["data", "data/a", "data/a/b", "data/a/b/foo.txt", "data/bar.txt"]
    assert result.file_count == 2 and result.bytes == len(FOO) + len(BAR)
    assert result.root == tmp_path / "dl/data"
    uid = result.cart_url.rsplit("/", 1)[1]
    assert fake_cartd.deleted == [uid]
    assert result.as_dict()["files"] == [
        str(tmp_path / "dl/data/a/b/foo.txt"),
        str(tmp_path / "dl/data/bar.txt"),
    ]


def test_cloudevent_with_filename_puts_files_under_it(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    Downloader(tmp_path, fake_cartd.url).cloudevent(event, filename="run-7")
    assert (tmp_path / "run-7/bar.txt").read_bytes() == BAR
    assert [path for method, path in fake_cartd.requests if method == "GET"][-1].endswith("?filename=run-7")


def test_transactioninfo_downloads(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    fake_cartd.add(34, FOO)
    doc = {"files": {"34": {"name": "foo.txt", "subdir": "a", "hashtype": "sha1", "hashsum": sha1(FOO)}}}
    Downloader(tmp_path, fake_cartd.url).transactioninfo(doc)
    assert (tmp_path / "data/a/foo.txt").read_bytes() == FOO


def test_legacy_0_4_1_call_style_works(tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]) -> None:
    downloader = Downloader(fake_cartd.url)
    downloader.cloudevent(str(tmp_path / "one"), event)
    downloader.cloudevent(tmp_path / "two", event, "other")
    assert (tmp_path / "one/data/bar.txt").read_bytes() == BAR
    assert (tmp_path / "two/other/bar.txt").read_bytes() == BAR


def test_download_without_location_is_a_type_error(fake_cartd: FakeCartd, event: dict[str, Any]) -> None:
    with pytest.raises(TypeError, match="no location"):
        Downloader(cart_api_url=fake_cartd.url).cloudevent(event)


def test_keep_cart_when_asked(tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]) -> None:
    Downloader(tmp_path, fake_cartd.url, delete_cart=False).cloudevent(event)
    assert fake_cartd.deleted == []


def test_invalid_event_touches_neither_cartd_nor_disk(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    with pytest.raises(NoFilesError):
        Downloader(tmp_path / "dl", fake_cartd.url).cloudevent(make_event([]))
    assert fake_cartd.requests == []
    assert not (tmp_path / "dl").exists()


def test_download_from_url_without_files_is_unverified(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    fake_cartd.add(1, b"one")
    fake_cartd.carts["c1"] = Cart("c1", [{"id": "1", "path": "x/one.txt"}])
    downloader = Downloader(tmp_path, fake_cartd.url)
    result = downloader._download_from_url(f"{fake_cartd.url}/c1", "data")
    assert (tmp_path / "data/x/one.txt").read_bytes() == b"one"
    assert result.files == (tmp_path / "data/x/one.txt",)


def failing(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any], error: type[Exception], **kwargs: Any
) -> pytest.ExceptionInfo[Exception]:
    downloader = Downloader(tmp_path / "dl", fake_cartd.url, **kwargs)
    with pytest.raises(error) as info:
        downloader.cloudevent(event)
    assert downloader.wait_for_deletes(5)
    leftovers = listing(tmp_path / "dl") if (tmp_path / "dl").exists() else []
    assert leftovers == [], leftovers
    return info


def test_cart_error_is_reported_and_cart_deleted(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    fake_cartd.head = lambda cart: (500, "error", "archive interface said 404 for file 34")
    info = failing(tmp_path, fake_cartd, event, CartFailedError)
    assert "archive interface said 404" in str(info.value)
    assert len(fake_cartd.deleted) == 1


def test_cart_never_ready_times_out(tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]) -> None:
    fake_cartd.head = lambda cart: (202, "staging", "")
    failing(tmp_path, fake_cartd, event, CartTimeoutError, cart_timeout=0.3)
    assert len(fake_cartd.deleted) == 1


def test_cartd_down_is_unavailable(tmp_path: Path, event: dict[str, Any]) -> None:
    with pytest.raises(CartUnavailableError):
        Downloader(tmp_path / "dl", f"http://127.0.0.1:{closed_port()}").cloudevent(event)
    assert not (tmp_path / "dl").exists()


def test_connection_closed_mid_file_leaves_nothing(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    fake_cartd.body = lambda cart, name: cut_after(cart_tar(cart.fileids, fake_cartd.contents, name), 3000)
    info = failing(tmp_path, fake_cartd, event, DownloadInterruptedError)
    assert info.value.retryable


def test_clean_end_of_stream_mid_file_leaves_nothing(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    fake_cartd.body = lambda cart, name: [cart_tar(cart.fileids, fake_cartd.contents, name)[:5000]]
    failing(tmp_path, fake_cartd, event, DownloadInterruptedError)


def test_flipped_byte_is_caught(tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]) -> None:
    fake_cartd.contents["34"] = FOO[:-1] + b"X"
    info = failing(tmp_path, fake_cartd, event, HashMismatchError)
    assert info.value.path == "a/b/foo.txt"


def test_hostile_tar_from_cartd_is_refused(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    evil = build_tar(
        [Member("data/a", type=tarfile.SYMTYPE, linkname=str(tmp_path)), Member("data/a/x", b"x")]
    )
    fake_cartd.body = lambda cart, name: [evil]
    failing(tmp_path, fake_cartd, event, UnsafeArchiveError)
    assert not (tmp_path / "x").exists()


def test_invalid_names_are_refused_before_cartd_or_disk(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    event = make_event(
        [file_obj(1, "n" * 300, "", b"1"), file_obj(2, "a", "", b"2"), file_obj(3, "b", "a", b"3")]
    )
    with pytest.raises(InvalidEventError, match="component of 300 bytes") as info:
        Downloader(tmp_path / "dl", fake_cartd.url).cloudevent(event)
    assert "'a/b' needs 'a' as a directory" in str(info.value)
    assert fake_cartd.requests == []
    assert not (tmp_path / "dl").exists()


def test_a_location_too_deep_for_the_paths_is_refused_before_a_cart(
    tmp_path: Path, fake_cartd: FakeCartd
) -> None:
    event = make_event([file_obj(1, "f", "/".join(["d" * 250] * 12), b"1")])  # a 3,013-byte path
    deep = tmp_path.joinpath(*["l" * 250] * 4)
    with pytest.raises(LocalStorageError, match="PATH_MAX") as info:
        Downloader(deep, fake_cartd.url).cloudevent(event)
    assert not info.value.retryable
    assert fake_cartd.requests == []


def test_cloudevent_never_writes_through_a_link_planted_in_the_location(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    outside = tmp_path / "outside"
    (outside / "a").mkdir(parents=True)
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl/data").symlink_to(outside)
    downloader = Downloader(tmp_path / "dl", fake_cartd.url)
    with pytest.raises(LocalStorageError, match="symbolic link") as info:
        downloader.cloudevent(event)
    assert downloader.wait_for_deletes(5)
    assert not info.value.retryable
    assert listing(outside) == ["a"]
    assert listing(tmp_path / "dl") == ["data"]  # the link, and no staging leftovers
    assert len(fake_cartd.deleted) == 1


def test_cloudevent_again_into_the_same_location_keeps_only_changed_files(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    downloader = Downloader(tmp_path / "dl", fake_cartd.url)
    downloader.cloudevent(event)
    (tmp_path / "dl/data/bar.txt").write_bytes(b"edited by a scientist")
    result = downloader.cloudevent(event)
    # Only the changed file was asked of Cartd; the other was there with the right checksum.
    assert [obj["path"] for obj in list(fake_cartd.carts.values())[-1].fileids] == ["bar.txt"]
    assert result.skipped == 1
    assert listing(tmp_path / "dl") == [
        "data",
        "data/a",
        "data/a/b",
        "data/a/b/foo.txt",
        "data/bar.txt",
        "data/bar.txt.~1~",
    ]
    assert (tmp_path / "dl/data/bar.txt").read_bytes() == BAR
    assert (tmp_path / "dl/data/bar.txt.~1~").read_bytes() == b"edited by a scientist"
    assert result.files == (tmp_path / "dl/data/a/b/foo.txt", tmp_path / "dl/data/bar.txt")


def test_the_result_does_not_wait_for_cartds_delete(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    release = threading.Event()
    fake_cartd.before_delete = lambda: release.wait(10)  # Cartd revoking thousands of tasks
    downloader = Downloader(tmp_path / "dl", fake_cartd.url)
    started = time.monotonic()
    result = downloader.cloudevent(event)
    assert time.monotonic() - started < 2
    assert (tmp_path / "dl/data/bar.txt").read_bytes() == BAR
    assert not downloader.wait_for_deletes(0.1)  # still deleting
    release.set()
    assert downloader.wait_for_deletes(5)
    assert fake_cartd.deleted == [result.cart_url.rsplit("/", 1)[1]]


def test_delete_cart_wait_deletes_before_returning(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    result = Downloader(tmp_path / "dl", fake_cartd.url, delete_cart="wait").cloudevent(event)
    assert fake_cartd.deleted == [result.cart_url.rsplit("/", 1)[1]]


def test_staging_wait_scales_with_the_files_and_their_size(tmp_path: Path, fake_cartd: FakeCartd) -> None:
    from downloader_service.cartfile import CartFile

    files = [CartFile(str(n), f"f{n}", "sha1", "0" * 40, size=25_000_000) for n in range(4)]
    downloader = Downloader(tmp_path, fake_cartd.url, cart_timeout=10, cart_timeout_per_file=0.5)
    assert downloader.staging_timeout(files) == 10 + 4 * 0.5 + 100_000_000 / 50e6
    assert downloader.staging_timeout([CartFile("1", "a", "sha1", "0" * 40)]) == 10.5  # size unknown
    fixed = Downloader(tmp_path, fake_cartd.url, cart_timeout=7, cart_timeout_per_file=0, cart_timeout_rate=0)
    assert fixed.staging_timeout(files) == 7


def test_a_cart_still_staging_past_the_base_wait_is_not_abandoned_early(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    ready_at = time.monotonic() + 0.6
    fake_cartd.head = lambda cart: (204, "ready", "") if time.monotonic() > ready_at else (202, "staging", "")
    # 0.3 s of base wait alone would give up; the two files' allowance (0.25 s each) does not.
    downloader = Downloader(tmp_path / "dl", fake_cartd.url, cart_timeout=0.3, cart_timeout_per_file=0.25)
    downloader.cloudevent(event)
    assert (tmp_path / "dl/data/bar.txt").read_bytes() == BAR
    fake_cartd.head = lambda cart: (202, "staging", "")
    with pytest.raises(CartTimeoutError) as info:
        downloader.cloudevent(event, location=tmp_path / "elsewhere")
    assert info.value.timeout == pytest.approx(0.8, abs=0.01)  # and 20 kB at 50 MB/s


def test_a_rerun_with_everything_in_place_asks_cartd_for_nothing(
    tmp_path: Path, fake_cartd: FakeCartd, event: dict[str, Any]
) -> None:
    downloader = Downloader(tmp_path / "dl", fake_cartd.url)
    first = downloader.cloudevent(event)
    carts = len(fake_cartd.carts)
    again = downloader.cloudevent(event)
    assert len(fake_cartd.carts) == carts  # no cart at all
    assert (again.skipped, again.bytes, again.cart_url) == (2, 0, "")
    assert again.files == first.files
    everything = Downloader(tmp_path / "dl", fake_cartd.url, skip_present=False).cloudevent(event)
    assert everything.skipped == 0 and len(fake_cartd.carts) == carts + 1
