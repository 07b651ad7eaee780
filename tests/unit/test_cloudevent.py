from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from downloader_service import CartFile, CloudEvent, InvalidEventError, NoFilesError
from downloader_service.cartfile import join_cart_path
from tests.events import file_obj, make_event


@pytest.mark.parametrize(
    ("subdir", "name", "path"),
    [
        ("a/b/", "foo.txt", "a/b/foo.txt"),
        ("a/b", "foo.txt", "a/b/foo.txt"),
        ("", "foo.txt", "foo.txt"),
        ("a//b/./", "foo.txt", "a/b/foo.txt"),
        (
            "data/a/c",
            "パソコン資産管理台帳（S&T HK）_現地調達PC.xls",
            "data/a/c/パソコン資産管理台帳（S&T HK）_現地調達PC.xls",
        ),
        ("x", "dir/name.txt", "x/dir/name.txt"),
    ],
)
def test_join_cart_path_normalises(subdir: str, name: str, path: str) -> None:
    assert join_cart_path(subdir, name) == path


@pytest.mark.parametrize(
    ("subdir", "name", "why"),
    [
        ("../etc", "passwd", "'..'"),
        ("a", "..", "'..'"),
        ("a/../..", "x", "'..'"),
        ("/etc", "passwd", "absolute"),
        ("", "/etc/passwd", "absolute"),
        ("a", "b\x00c", "NUL"),
        ("./", ".", "empty"),
    ],
)
def test_join_cart_path_refuses_unsafe(subdir: str, name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        join_cart_path(subdir, name)


def test_yield_files_of_upstream_fixture_names_the_file_without_id(
    notifications_event: dict[str, Any],
) -> None:
    with pytest.raises(InvalidEventError) as info:
        CloudEvent.yield_files(notifications_event)
    assert info.value.object == "data[9]"
    assert info.value.field == "_id"
    assert "C234-1234-1234" in str(info.value)
    assert not info.value.retryable


def test_yield_files_of_fixture_with_ids_gives_normalised_cartd_objects(
    notifications_event: dict[str, Any],
) -> None:
    notifications_event["data"][9]["_id"] = 36
    files = list(CloudEvent.yield_files(notifications_event)())
    assert files == [
        {
            "id": "34",
            "path": "a/b/foo.txt",
            "hashtype": "sha1",
            "hashsum": "f1d2d2f924e986ac86fdf7b36c94bcdf32beec15",
        },
        {
            "id": "35",
            "path": "a/b/bar.txt",
            "hashtype": "sha1",
            "hashsum": "f1d2d2f924e986ac86fdf7b36c94bcdf32beec15",
        },
        {
            "id": "36",
            "path": "data/a/c/パソコン資産管理台帳（S&T HK）_現地調達PC.xls",
            "hashtype": "sha1",
            "hashsum": "f1d2d2f924e986ac86fdf7b36c94bcdf32beec15",
        },
    ]


def test_yield_files_takes_cloudevents_1_0_form() -> None:
    event = make_event([file_obj(7, "x.bin", "", b"x")], version="1.0")
    assert [f["path"] for f in CloudEvent.yield_files(event)()] == ["x.bin"]


def test_yield_files_can_be_called_twice() -> None:
    yield_files = CloudEvent.yield_files(make_event([file_obj(7, "x.bin", "d", b"x")]))
    assert list(yield_files()) == list(yield_files())


def test_files_reports_every_problem_at_once() -> None:
    bad = [
        file_obj(1, "ok.txt", "", b"1"),
        {**file_obj(2, "a.txt", "../up", b"2")},
        {**file_obj(3, "b.txt", "", b"3"), "hashtype": "crc32"},
        {**file_obj(4, "c.txt", "", b"4"), "hashsum": "abc"},
        {**file_obj(5, "", "", b"5")},
    ]
    with pytest.raises(InvalidEventError) as info:
        CloudEvent.files(make_event(bad))
    message = str(info.value)
    assert info.value.object == "data[2] (_id 2)"
    assert info.value.field == "path"
    for fragment in ("'..'", "crc32", "sha1 hex digest", "data[5] (_id 5): name is"):
        assert fragment in message


def test_files_refuses_two_files_on_one_path() -> None:
    with pytest.raises(InvalidEventError, match="repeats the path"):
        CloudEvent.files(make_event([file_obj(1, "a", "d/", b"1"), file_obj(2, "a", "d", b"2")]))


def test_files_without_files_is_its_own_error() -> None:
    with pytest.raises(NoFilesError) as info:
        CloudEvent.files(make_event([]))
    assert isinstance(info.value, InvalidEventError)
    assert "lists no files" in str(info.value)


@pytest.mark.parametrize("data", [None, "[]", {"a": 1}])
def test_files_refuses_data_that_is_not_a_list(data: object) -> None:
    event = make_event([])
    event["data"] = data
    with pytest.raises(InvalidEventError, match="data must be a list") as info:
        CloudEvent.files(event)
    assert info.value.field == "data"


def test_files_refuses_a_non_object() -> None:
    with pytest.raises(InvalidEventError, match="JSON object"):
        CloudEvent.files([1, 2])  # type: ignore[arg-type]


def test_files_accepts_uppercase_hashes_and_string_ids() -> None:
    obj = {**file_obj(9, "f", "", b"z"), "_id": "9"}
    obj["hashsum"] = obj["hashsum"].upper()
    obj["hashtype"] = "SHA1"
    (file,) = CloudEvent.files(make_event([obj]))
    assert file == CartFile("9", "f", "sha1", obj["hashsum"].lower())


@pytest.mark.parametrize("bad_id", [True, -1, "12/../3", 1.5, ""])
def test_files_refuses_ids_that_are_not_file_ids(bad_id: object) -> None:
    with pytest.raises(InvalidEventError, match="_id is not a file id"):
        CloudEvent.files(make_event([{**file_obj(1, "f", "", b"z"), "_id": bad_id}]))


@pytest.mark.parametrize(
    ("name", "subdir", "why"),
    [
        ("n" * 300, "", "component of 300 bytes"),
        ("f.txt", "d" * 300, "component of 300 bytes"),
        ("f.txt", "/".join(["d" * 250] * 20), "bytes long"),  # 5,020 bytes
        ("f\udc80", "", "not valid Unicode"),
        ("f.txt", "a\udfffb", "not valid Unicode"),
    ],
    ids=["300-byte-name", "300-byte-subdir", "5000-byte-path", "surrogate-name", "surrogate-subdir"],
)
def test_files_refuses_names_a_file_system_cannot_hold(name: str, subdir: str, why: str) -> None:
    event = make_event([file_obj(1, "ok.txt", "", b"1"), file_obj(2, name, subdir, b"2")])
    with pytest.raises(InvalidEventError, match=why) as info:
        CloudEvent.files(event)
    assert info.value.object == "data[2] (_id 2)"
    assert info.value.field == "path"
    assert not info.value.retryable
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("order", ["file-first", "directory-first"])
def test_files_refuses_a_file_that_another_file_needs_as_a_directory(order: str) -> None:
    file, inner = file_obj(1, "a", "", b"1"), file_obj(2, "b", "a", b"2")
    objs = [file, inner] if order == "file-first" else [inner, file]
    with pytest.raises(
        InvalidEventError, match="'a/b' needs 'a' as a directory, but it is the file of"
    ) as info:
        CloudEvent.files(make_event(objs))
    # the file that needs the directory is named, whichever comes first
    assert info.value.object == ("data[2] (_id 2)" if order == "file-first" else "data[1] (_id 2)")
    assert info.value.field == "path"


def test_files_error_for_100000_invalid_files_is_a_few_kilobytes() -> None:
    objs = [{**file_obj(i, f"f{i}", "", b""), "hashsum": "not hex " * 50} for i in range(100_000)]
    with pytest.raises(InvalidEventError) as info:
        CloudEvent.files(make_event(objs))
    assert len(str(info.value)) <= 4000
    assert str(info.value).endswith("more problem(s)")
    assert info.value.problem_count == 100_000


def test_files_shortens_a_huge_id_and_event_id_in_messages() -> None:
    event = make_event([{**file_obj(1, "f", "", b""), "_id": "9" * 100_000, "hashtype": "nope"}])
    event["eventID"] = "e" * 100_000
    with pytest.raises(InvalidEventError) as info:
        CloudEvent.files(event)
    assert len(str(info.value)) < 1000
    assert len(info.value.object) < 300


# -- CloudEvent.loads: a large event parsed lean ------------------------------------------

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "notifications-event-0.1.json"


def test_loads_gives_the_same_files_and_keeps_everything_but_files_objects_as_is() -> None:
    text = FIXTURE.read_text(encoding="utf-8")
    full, lean = json.loads(text), CloudEvent.loads(text)

    def refusal(event: Any) -> str:
        with pytest.raises(InvalidEventError) as info:
            CloudEvent.files(event)
        return str(info.value)

    assert refusal(lean) == refusal(full)  # the upstream fixture is refused alike (a file lacks _id)
    for index, obj in enumerate(full["data"]):
        if obj.get("destinationTable") == "Files":
            obj.setdefault("_id", 1000 + index)
    fixed = json.dumps(full)
    assert CloudEvent.files(CloudEvent.loads(fixed)) == CloudEvent.files(json.loads(fixed))
    others = [obj for obj in lean["data"] if obj.get("destinationTable") != "Files"]
    assert others == [obj for obj in json.loads(text)["data"] if obj.get("destinationTable") != "Files"]
    assert all(type(obj) is dict for obj in others)
    assert {k: v for k, v in lean.items() if k != "data"} == {k: v for k, v in full.items() if k != "data"}


def test_loads_file_objects_are_read_only_mappings_of_the_keys_a_download_reads() -> None:
    obj = file_obj(7, "x.bin", "a", b"x") | {"mimetype": "text/plain", "ctime": "yesterday"}
    lean = CloudEvent.loads(json.dumps({"data": [obj]}))["data"][0]
    assert dict(lean) == {
        k: obj[k] for k in ("_id", "destinationTable", "name", "subdir", "hashtype", "hashsum", "size")
    }
    assert lean.get("mimetype") is None and "ctime" not in lean and len(lean) == 7
    with pytest.raises(KeyError):
        lean["mimetype"]
    with pytest.raises(ValueError, match="Expecting value"):
        CloudEvent.loads('{"data": [')


def test_loads_holds_far_less_memory_than_json_loads_for_many_files() -> None:
    import tracemalloc

    files = [file_obj(i, f"file-{i}.dat", "run/1", str(i).encode()) for i in range(5000)]
    text = json.dumps(make_event(files))

    def held(loads: Any) -> int:
        """Bytes the parsed event holds (traced while it is alive)."""
        tracemalloc.start()
        try:
            event = loads(text)
            size: int = tracemalloc.get_traced_memory()[0]
            del event
            return size
        finally:
            tracemalloc.stop()

    assert held(CloudEvent.loads) < 0.6 * held(json.loads)  # 0.47 here: 330 bytes a file, not 690


# -- CloudEvent.read_files: an event read a window at a time ---------------------------------


def read_files(text: str, as_bytes: bool = True) -> list[CartFile]:
    return CloudEvent.read_files(io.BytesIO(text.encode()) if as_bytes else io.StringIO(text))


def refusal_of(call: Any) -> tuple[type, str, str | None, str | None]:
    with pytest.raises(InvalidEventError) as info:
        call()
    return type(info.value), str(info.value), getattr(info.value, "object", None), info.value.field


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "text"])
@pytest.mark.parametrize("version", ["0.1", "1.0"])
def test_read_files_gives_what_files_gives_for_the_parsed_event(as_bytes: bool, version: str) -> None:
    event = json.loads(FIXTURE.read_text(encoding="utf-8"))
    for index, obj in enumerate(event["data"]):
        if obj.get("destinationTable") == "Files":
            obj.setdefault("_id", 1000 + index)
    if version == "1.0":
        event = make_event([obj for obj in event["data"] if obj.get("destinationTable") == "Files"], "1.0")
    text = json.dumps(event, indent=2)
    files = read_files(text, as_bytes)
    assert files == CloudEvent.files(json.loads(text))
    assert [file.size for file in files] == [file.size for file in CloudEvent.files(json.loads(text))]
    assert len(files) >= 1


BAD_EVENTS = {
    "not-an-object": "[1, 2]",
    "a-string": '"event"',
    "no-data": '{"eventID": "e-9"}',
    "null-data": '{"data": null, "id": "e-9"}',
    "object-data": '{"id": "e-9", "data": {"a": 1}}',
    "no-files": json.dumps(make_event([])),
    "upstream-fixture": FIXTURE.read_text(encoding="utf-8"),  # a file lacks _id
    "every-problem": json.dumps(
        make_event(
            [
                file_obj(1, "ok.txt", "", b"1"),
                file_obj(2, "a.txt", "../up", b"2"),
                {**file_obj(3, "b.txt", "", b"3"), "hashtype": "crc32"},
                {**file_obj(4, "c.txt", "", b"4"), "hashsum": "abc"},
                file_obj(5, "", "", b"5"),
                file_obj(6, "ok.txt", "", b"6"),
                file_obj(7, "ok.txt/x", "", b"7"),
            ]
        )
    ),
    # the id after data, and in the 1.0 name: messages still name the event
    "id-last": '{"data": [{"destinationTable": "Files", "_id": "x"}], "id": "late"}',
}


@pytest.mark.parametrize("text", BAD_EVENTS.values(), ids=BAD_EVENTS.keys())
def test_read_files_refuses_what_files_refuses_with_the_same_error(text: str) -> None:
    assert refusal_of(lambda: read_files(text)) == refusal_of(lambda: CloudEvent.files(json.loads(text)))


def test_read_files_refuses_an_event_with_two_data_keys() -> None:
    first = json.dumps([file_obj(1, "a", "", b"1")])
    with pytest.raises(InvalidEventError, match="'e-2': data is given twice") as info:
        read_files(f'{{"id": "e-2", "data": {first}, "data": []}}')
    assert info.value.field == "data"


@pytest.mark.parametrize("text", ['{"data": [', '{"data": []} []', ""])
def test_read_files_of_malformed_json_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"line 1 \(char \d+\)") as info:
        read_files(text)
    assert not isinstance(info.value, InvalidEventError)


def test_read_files_holds_the_files_only_not_the_text_or_the_event() -> None:
    import tracemalloc

    objs = [file_obj(i, f"file-{i}.dat", "run/1", str(i).encode()) for i in range(5000)]
    text = json.dumps(make_event(objs)).encode()

    def held(read: Any) -> tuple[int, int]:
        """Bytes the files hold once read, and the most held while reading them."""
        tracemalloc.start()
        try:
            files = read()
            assert len(files) == 5000
            return tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    files, streamed = held(lambda: CloudEvent.read_files(io.BytesIO(text)))
    _files, parsed = held(lambda: CloudEvent.files(CloudEvent.loads(text)))
    # while reading, less than the text alone on top of the files (json.loads holds the text
    # twice, as bytes and str, and then every object of the event)
    assert streamed - files < len(text)
    assert streamed < 0.75 * parsed
