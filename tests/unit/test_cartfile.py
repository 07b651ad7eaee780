from __future__ import annotations

from typing import Any

import pytest

from downloader_service import CartFile, CloudEvent, InvalidInputError, LocalStorageError
from downloader_service.cartfile import (
    MAX_DEPTH,
    MAX_PATH_BYTES,
    NAME_MAX,
    PROBLEMS_SHOWN,
    collect_files,
    join_cart_path,
)
from downloader_service.errors import ECHO_CHARS, MAX_MESSAGE_CHARS, echo
from tests.fakecartd import sha1

SUM = sha1(b"")


def entry(
    label: str, name: Any, subdir: Any = "", file_id: Any = 1
) -> tuple[str, Any, Any, Any, dict[str, Any]]:
    return label, file_id, name, subdir, {"hashtype": "sha1", "hashsum": SUM}


@pytest.mark.parametrize(
    ("subdir", "name"),
    [
        ("", "n" * NAME_MAX),
        ("d" * NAME_MAX, "n"),
        ("", "é" * (NAME_MAX // 2)),  # 254 bytes in UTF-8
        ("/".join(["d" * 200] * 15), "n" * (MAX_PATH_BYTES - 15 * 201)),  # exactly MAX_PATH_BYTES
        ("/".join("d" * (MAX_DEPTH - 1)), "n"),
        ("a", "tab\there"),  # legal in POSIX names; kept, and shown escaped in messages
    ],
)
def test_join_cart_path_takes_names_up_to_the_limits(subdir: str, name: str) -> None:
    path = join_cart_path(subdir, name)
    assert len(path.encode()) <= MAX_PATH_BYTES


@pytest.mark.parametrize(
    ("subdir", "name", "why"),
    [
        ("", "n" * (NAME_MAX + 45), "component of 300 bytes"),
        ("d" * 300, "n", "component of 300 bytes"),
        ("", "資" * 100, "component of 300 bytes"),  # 100 characters, 300 bytes
        ("/".join(["d" * 250] * 20), "n" * 10, "is 5030 bytes long"),
        ("/".join("d" * MAX_DEPTH), "n", f"{MAX_DEPTH + 1} components deep"),
        ("", "f\udc80", "not valid Unicode"),  # what os.fsdecode makes of the byte 0x80
        ("sub\ud800dir", "f", "not valid Unicode"),
    ],
    ids=[
        "300-byte-name",
        "300-byte-subdir",
        "300-byte-kanji-name",
        "5030-byte-path",
        "too-deep",
        "surrogate-name",
        "surrogate-subdir",
    ],
)
def test_join_cart_path_refuses_what_a_file_system_cannot_hold(subdir: str, name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        join_cart_path(subdir, name)


@pytest.mark.parametrize(
    "paths",
    [("a", "a/b"), ("a/b", "a"), ("x/a", "x/a/b/c"), ("x/a/b/c", "x/a")],
    ids=["file-first", "directory-first", "deep-file-first", "deep-directory-first"],
)
def test_collect_files_refuses_a_file_that_another_needs_as_a_directory(paths: tuple[str, str]) -> None:
    first, second = paths
    entries = [entry("data[1]", "ok.txt"), entry("data[2]", first), entry("data[3]", second, file_id=3)]
    with pytest.raises(InvalidInputError, match="as a directory, but it is the file of") as info:
        collect_files(entries, InvalidInputError, "event")
    inner, file = (second, first) if len(second) > len(first) else (first, second)
    assert f"{inner!r} needs {file!r} as a directory" in str(info.value)
    assert info.value.field == "path"
    assert info.value.object == ("data[3]" if inner == second else "data[2]")


def test_collect_files_takes_siblings_that_share_a_prefix() -> None:
    # "a" sorts before "a-b" and "a.txt" but is not their directory
    files = collect_files(
        [entry("0", "a"), entry("1", "a-b/c"), entry("2", "a.txt"), entry("3", "ab/c")],
        InvalidInputError,
        "x",
    )
    assert [file.path for file in files] == ["a", "a-b/c", "a.txt", "ab/c"]


def test_collect_files_message_is_bounded_for_100000_problems() -> None:
    entries = [entry(f"data[{i}]", "n" * 1000, file_id=i) for i in range(100_000)]
    with pytest.raises(InvalidInputError) as info:
        collect_files(entries, InvalidInputError, "event")
    message = str(info.value)
    assert len(message) <= MAX_MESSAGE_CHARS
    shown = message.count("more than NAME_MAX")
    assert 1 <= shown <= PROBLEMS_SHOWN
    assert message.endswith(f"; and {100_000 - shown} more problem(s)")
    assert info.value.problem_count == 100_000
    assert info.value.object == "data[0]"


@pytest.mark.parametrize(
    "field", ["_id", "name", "not a name", "subdir", "not a subdir", "hashtype", "hashsum"]
)
def test_collect_files_shortens_every_echoed_value(field: str) -> None:
    huge = "x" * 1_000_000
    label, file_id, name, subdir, obj = entry("data[0]", "f")
    if field == "_id":
        file_id = huge
    elif field == "name":
        name = huge
    elif field == "not a name":
        name = ["not a name", huge]
    elif field == "subdir":
        subdir = huge
    elif field == "not a subdir":
        subdir = {"not": huge}
    else:
        obj[field] = huge
    with pytest.raises(InvalidInputError) as info:
        collect_files([(label, file_id, name, subdir, obj)], InvalidInputError, "event")
    assert len(str(info.value)) < 3 * ECHO_CHARS


@pytest.mark.parametrize("path", ["n" * 300, "d/" * 2600 + "f", "f\udc80"])
def test_cart_file_from_cartd_applies_the_same_limits(path: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        CartFile.from_cartd({"id": "1", "path": path, "hashtype": "sha1", "hashsum": SUM})
    assert info.value.field == "path"
    assert len(str(info.value)) < 4 * ECHO_CHARS


def test_echo_keeps_short_values_and_elides_long_ones() -> None:
    assert echo("a/b.txt") == "'a/b.txt'"
    assert echo(34) == "34"
    long = echo("z" * 1_000_000)
    assert len(long) <= ECHO_CHARS and long.startswith("'zzz") and "..." in long
    assert len(echo({"k": ["v" * 10_000] * 10_000})) <= ECHO_CHARS


def test_error_message_is_capped_and_retryable_may_be_set_per_error() -> None:
    error = LocalStorageError("x" * 100_000, path="p", retryable=False)
    assert len(str(error)) == MAX_MESSAGE_CHARS
    assert str(error).endswith("more characters]")
    assert not error.retryable and LocalStorageError("y").retryable
    assert error.context == {"path": "p"}


@pytest.mark.parametrize(
    ("size", "kept"), [(12, 12), (0, 0), ("12", None), (-1, None), (True, None), (None, None)]
)
def test_a_files_size_is_kept_when_sane_and_ignored_otherwise(size: object, kept: int | None) -> None:
    obj = {"_id": 1, "name": "a.txt", "subdir": "", "hashtype": "sha1", "hashsum": "0" * 40, "size": size}
    [file] = CloudEvent.files({"id": "e", "data": [{"destinationTable": "Files", **obj}]})
    assert file.size == kept


def test_collect_files_reports_every_file_below_another_file_and_every_repeat() -> None:
    paths = ["a", "a/b", "a-b", "a/c", "a/d/e", "a", "z"]
    entries = [entry(f"data[{i}]", path, file_id=i) for i, path in enumerate(paths)]
    with pytest.raises(InvalidInputError) as info:
        collect_files(entries, InvalidInputError, "event")
    message = str(info.value)
    assert info.value.problem_count == 4
    for inner in ("a/b", "a/c", "a/d/e"):
        assert f"{inner!r} needs 'a' as a directory, but it is the file of data[0]" in message
    assert "data[5]: path 'a' repeats the path of data[0]" in message
    assert "'a-b'" not in message and "'z'" not in message


def test_collect_files_makes_labels_only_for_objects_with_a_problem() -> None:
    described: list[tuple[Any, str | None]] = []

    def describe(key: Any, file_id: str | None) -> str:
        described.append((key, file_id))
        return f"object {key}"

    entries = [entry(i, f"f{i}", file_id=i) for i in range(10_000)]
    entries[1234] = entry(1234, "bad\x00name", file_id=1234)
    entries[5678] = entry(5678, "f0", file_id=5678)  # repeats the path of object 0
    with pytest.raises(InvalidInputError) as info:
        collect_files(entries, InvalidInputError, lambda: "event e", describe)
    assert sorted(described) == [(0, "0"), (1234, "1234"), (5678, "5678")]
    assert str(info.value).startswith("invalid event e: object 1234: path ")
    assert "object 5678: path 'f0' repeats the path of object 0" in str(info.value)
    assert info.value.object == "object 1234"
