from __future__ import annotations

import io
import json
import re
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from downloader_service.jsonstream import JsonWindow

DOCUMENT = {
    "id": "e-1",
    "n": [0, -12345678901234567890, 3.25e-7, 1e400, True, False, None],
    "text": 'caf\u00e9 \u2603 "quoted" \\ \U0001f600 \udc80 tab\there',
    "deep": [[[{"a": {"b": []}}]]],
    "": {},
    "data": [{"k": i, "s": "x" * i} for i in range(40)],
}


def walk(window: JsonWindow) -> dict[str, Any]:
    """Rebuild a top-level object by members, and its ``data`` item by item."""
    out: dict[str, Any] = {}
    for key in window.members():
        if key == "data":
            out[key] = [window.value() for _index in window.items()]
        else:
            out[key] = window.value()
    window.end()
    return out


def reader(data: str | bytes, step: int) -> Callable[[int], str | bytes]:
    """A ``read`` that gives at most ``step`` characters or bytes, whatever is asked."""
    source: io.StringIO | io.BytesIO = io.StringIO(data) if isinstance(data, str) else io.BytesIO(data)
    return lambda _size: source.read(step)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1 << 20])
@pytest.mark.parametrize("encode", [False, True], ids=["text", "utf8-bytes"])
@pytest.mark.parametrize("indent", [None, 2])
def test_values_come_out_as_json_loads_makes_them_whatever_the_window(
    step: int, encode: bool, indent: int | None
) -> None:
    # raw multi-byte characters, and the lone surrogate as the escape that is its only JSON form
    text = json.dumps(DOCUMENT, indent=indent, ensure_ascii=False).replace("\udc80", "\\udc80")
    expected = json.loads(text)
    # a byte-wise read splits multi-byte characters, and small windows split every number,
    # string and escape somewhere
    got = walk(JsonWindow(reader(text.encode() if encode else text, step), window=4))
    assert json.dumps(got) == json.dumps(expected)  # 1e400 is inf, the lone surrogate is kept


def test_a_number_cut_by_the_window_is_read_whole() -> None:
    window = JsonWindow(reader("[1234567, 89]", 3), window=3)
    assert [window.value() for _ in window.items()] == [1234567, 89]


def test_a_utf8_byte_order_mark_is_skipped() -> None:
    window = JsonWindow(io.BytesIO(b'\xef\xbb\xbf{"a": 1}').read)
    assert walk(window) == {"a": 1}


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        '{"a": 1,}',
        '{"a" 1}',
        '{"a": 1 "b": 2}',
        '{"data": [1, 2,]}',
        '{"data": [1 2]}',
        '{"data": [{"x": tru}]}',
        '{"a": 1} x',
        '{"a": "unterminated}',
        "{'a': 1}",
        '{"data": [1, 2',
        '{\n "a": 1,\n "data": [1,\n  2,\n ]\n}',
    ],
)
def test_malformed_json_is_a_value_error_at_the_line_and_char_json_loads_names(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as reference:
        json.loads(text)
    for step in (1, 5, 1 << 16):
        with pytest.raises(ValueError, match=r"line \d+ \(char \d+\)") as info:
            walk(JsonWindow(reader(text, step), window=4))
        assert not isinstance(info.value, json.JSONDecodeError)
        match = re.search(r"line (\d+) \(char (\d+)\)", str(info.value))
        assert match is not None
        assert int(match[1]) == reference.value.lineno
        assert int(match[2]) == reference.value.pos, (text, step, str(info.value))


def test_bytes_that_are_not_utf8_raise_unicode_decode_error() -> None:
    with pytest.raises(UnicodeDecodeError):
        walk(JsonWindow(reader(b'{"a": "\xff\xfe"}', 2)))


def test_nesting_too_deep_for_the_decoder_is_a_value_error() -> None:
    text = '{"data": [' + "[" * 100_000 + "]" * 100_000 + "]}"
    with pytest.raises(ValueError, match="Nested too deeply"):
        walk(JsonWindow(reader(text, 1 << 16)))


def test_only_a_window_and_the_item_at_hand_are_held() -> None:
    items = [{"name": f"file-{i:06d}", "pad": "p" * 200} for i in range(20_000)]
    text = json.dumps({"data": items})  # 5 MB
    source = io.StringIO(text)
    tracemalloc.start()
    try:
        window = JsonWindow(source.read)
        count = 0
        for _index in window.members():
            for _item in window.items():
                window.value()
                count += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(items)
    assert len(text) > 4_500_000
    assert peak < 600_000  # a 64 Ki-character window (twice, while it is joined) and one item
