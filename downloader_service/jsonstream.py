"""A JSON document read a window at a time: large ones are never held whole.

Each value is decoded by ``json.JSONDecoder.raw_decode``, so it comes out exactly as
``json.loads`` makes it (numbers, escapes, lone surrogates alike); only the structure around
the values walked (an object's members, an array's items) is parsed here.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

DEFAULT_WINDOW = 1 << 16  # characters read at a time

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


class JsonWindow:
    """The JSON text ``read(size)`` returns (``str``, or UTF-8 ``bytes``), walked in order.

    Only the text not yet walked is held: a window of about :data:`DEFAULT_WINDOW` characters,
    or one value if it is larger. Malformed text raises ``ValueError`` naming the line and
    character, as ``json.loads`` does.
    """

    def __init__(self, read: Callable[[int], str | bytes], window: int = DEFAULT_WINDOW) -> None:
        self._read = read
        self._window = window
        self._decode: Callable[[bytes, bool], str] | None = None
        self._text = ""
        self._pos = 0
        self._eof = False
        self._dropped = 0  # characters before _text
        self._lines = 0  # newlines in them

    def peek(self) -> str:
        """The next character that is not white space; ``""`` at the end of the text."""
        while True:
            match = _SPACE.match(self._text, self._pos)
            self._pos = match.end() if match else self._pos
            if self._pos < len(self._text):
                return self._text[self._pos]
            if not self._more(self._window):
                return ""

    def value(self) -> Any:
        """Decode the next value whole (an object or array with everything in it)."""
        self.peek()
        size = self._window
        while True:
            dropped = self._dropped
            try:
                value, end = _DECODER.raw_decode(self._text, self._pos)
            except json.JSONDecodeError as exc:
                if self._more(size):  # the value may go on past the text read so far
                    size *= 2
                    continue
                raise self._error(exc.msg, dropped + exc.pos) from None
            except RecursionError:
                raise self._error("Nested too deeply", self._here()) from None
            if end == len(self._text) and self._more(size):  # a number may have more digits
                size *= 2
                continue
            self._pos = end
            return value

    def members(self) -> Iterator[str]:
        """Enter the object at hand and yield each key; the caller then takes its value."""
        self._expect("{", "Expecting '{'")
        if self.peek() == "}":
            self._pos += 1
            return
        while True:
            if self.peek() != '"':
                raise self._error("Expecting property name enclosed in double quotes", self._here())
            key: str = self.value()
            self._expect(":", "Expecting ':' delimiter")
            yield key
            if not self._next("}"):
                return

    def items(self) -> Iterator[int]:
        """Enter the array at hand and yield each item's index; the caller then takes the item."""
        self._expect("[", "Expecting '['")
        if self.peek() == "]":
            self._pos += 1
            return
        index = 0
        while True:
            yield index
            index += 1
            if not self._next("]"):
                return

    def end(self) -> None:
        """Check that nothing but white space follows."""
        if self.peek():
            raise self._error("Extra data", self._here())

    def _next(self, closing: str) -> bool:
        """After a member or item: ``True`` at a comma (another follows), ``False`` at ``closing``."""
        char = self.peek()
        if char == "," or char == closing:
            self._pos += 1
            return char == ","
        raise self._error("Expecting ',' delimiter", self._here())

    def _expect(self, char: str, message: str) -> None:
        if self.peek() != char:
            raise self._error(message, self._here())
        self._pos += 1

    def _more(self, size: int) -> bool:
        """Read about ``size`` more characters, dropping what was walked; ``False`` at the end."""
        if self._eof:
            return False
        if self._pos:
            self._lines += self._text.count("\n", 0, self._pos)
            self._dropped += self._pos
            self._text = self._text[self._pos :]
            self._pos = 0
        data = self._read(size)
        if isinstance(data, bytes):
            if self._decode is None:
                self._decode = codecs.getincrementaldecoder("utf-8-sig")().decode
            text = self._decode(data, not data)
        else:
            text = data
        self._eof = not data
        self._text += text
        return not self._eof or bool(text)

    def _here(self) -> int:
        return self._dropped + self._pos

    def _error(self, message: str, where: int) -> ValueError:
        """A ``ValueError`` at character ``where`` of the whole text (not before the window)."""
        line = self._lines + self._text.count("\n", 0, where - self._dropped) + 1
        return ValueError(f"{message}: line {line} (char {where})")


def reader(text: str | bytes) -> Callable[[int], str | bytes]:
    """A ``read(size)`` over ``text`` held already, each call a slice (for :class:`JsonWindow`)."""
    position = 0

    def read(size: int) -> str | bytes:
        nonlocal position
        piece = text[position : position + size]
        position += size
        return piece

    return read
