"""Reading one JSON object member by member from byte chunks, holding only the value being read.

``json.loads`` of a whole body builds every value before anything can be checked: a 40 MB
``[{}, {}, ...]`` under an unknown key costs ~10 million dicts (gigabytes, seconds of CPU)
before a model can say the key is not allowed. :class:`ObjectReader` reads the top-level
object's keys first, so a caller can refuse an unknown key before its value is read, and reads
an array's items one at a time (``json.JSONDecoder.raw_decode`` over a sliding buffer), so a
caller can check and keep or drop each item, and stop at a count. Every value read is bounded
by a number of characters; past it the reader stops with :class:`ValueTooLongError`.

HTTP-free: the API and the dataset readers turn :class:`JsonSyntaxError` into their own errors.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

_WHITESPACE_CHARS = " \t\n\r"
_WHITESPACE = re.compile(f"[{_WHITESPACE_CHARS}]*")
# A value that fails this close to the end of what has arrived may just be cut short (a
# literal, a number or an escape split between chunks): the longest such token is shorter.
_CUT_MARGIN = 32


class JsonSyntaxError(ValueError):
    """Not valid JSON (or not the shape asked for) at ``line``/``column`` of the text."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(f"{message} at line {line} column {column}")
        self.reason = message
        self.line = line
        self.column = column


class ValueTooLongError(ValueError):
    """A value ran past the characters allowed for it (it may also be invalid further on)."""

    def __init__(self, max_chars: int) -> None:
        super().__init__(f"a value is longer than {max_chars} characters")
        self.max_chars = max_chars


class _RefusedValueError(ValueError):
    """Valid to Python's parser, not JSON a caller can use: the message says why."""


def _reject_constant(name: str) -> Any:
    raise _RefusedValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e400: JSON has no infinity, and no model input is one
        raise _RefusedValueError("Number out of range")
    return value


# One decoder for every parse (stateless between calls, as json.loads's own): NaN, Infinity
# and numbers past a float's range are refused.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _reason(exc: ValueError | RecursionError) -> str:
    """Why a parse failed, in fixed words (never Python's advice to the server's operator)."""
    if isinstance(exc, json.JSONDecodeError):
        # "Invalid control character at", "Unterminated string starting at": the position
        # follows in JsonSyntaxError's own words.
        return exc.msg.removesuffix(" at")
    if isinstance(exc, RecursionError):
        return "Nested too deeply"
    if isinstance(exc, _RefusedValueError):
        return str(exc)
    # The one other ValueError: an integer past sys.get_int_max_str_digits() (4,300).
    return "Number has too many digits"


def loads(text: str) -> Any:
    """``text``, one JSON value, parsed whole by the reader's rules and messages."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise JsonSyntaxError(_reason(exc), exc.lineno, exc.colno) from None
    except (ValueError, RecursionError) as exc:  # named at the value's start
        raise JsonSyntaxError(_reason(exc), 1, 1) from None


def is_unicode(text: str) -> bool:
    """False for a string with a lone surrogate: JSON's "\\ud800" escape parses to one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ObjectReader:
    """One JSON object read from ``chunks`` (UTF-8 bytes, a leading BOM allowed).

    Protocol: iterate :meth:`members` (it yields their keys); after each key, read its value
    with :meth:`value`, :meth:`items` or :meth:`item_texts` before asking for the next key (or
    stop reading).
    Duplicate keys are a syntax error: which one would count is a guess between parsers.
    """

    def __init__(self, chunks: Iterable[bytes | memoryview], *, max_key_chars: int = 256) -> None:
        self._chunks = iter(chunks)
        # Plain UTF-8 (the BOM is dropped by hand): its errors' offsets are the body's.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        self._at_start = True  # no text decoded yet: a BOM may come
        self._buf = ""
        self._pos = 0  # the cursor in _buf
        self._eof = False
        self._bytes_read = 0
        # Where _buf starts in the whole text, for messages: lines before it, and the
        # characters since the last line break before it.
        self._line_base = 1
        self._column_base = 0
        self._max_key_chars = max_key_chars

    # --- reading -------------------------------------------------------------------------

    def _fill(self, min_chars: int) -> bool:
        """Read until ``min_chars`` characters are buffered past the cursor; False at the end."""
        if self._pos:
            dropped = self._buf[: self._pos]
            breaks = dropped.count("\n")
            if breaks:
                self._line_base += breaks
                self._column_base = len(dropped) - dropped.rfind("\n") - 1
            else:
                self._column_base += len(dropped)
            self._buf, self._pos = self._buf[self._pos :], 0
        parts = [self._buf]
        have = len(self._buf)
        while have < min_chars and not self._eof:
            chunk = next(self._chunks, None)
            data = chunk or b""
            pending = self._decoder.getstate()[0]  # the start of a character cut by a chunk
            try:
                text = self._start(self._decoder.decode(data, final=chunk is None))
            except UnicodeDecodeError as exc:
                # Named where the bad byte is, whichever chunk it came in.
                offset = self._bytes_read - len(pending) + exc.start
                good = (pending + bytes(data))[: exc.start].decode()
                self._buf = "".join(parts) + self._start(good)
                raise self._error(
                    f"not valid UTF-8 (bad byte at offset {offset})", len(self._buf)
                ) from None
            if chunk is None:
                self._eof = True
            else:
                self._bytes_read += len(chunk)
            parts.append(text)
            have += len(text)
        self._buf = "".join(parts)
        return have >= min_chars

    def _start(self, text: str) -> str:
        """``text`` without the BOM if it is the first text decoded."""
        if self._at_start and text:
            self._at_start = False
            return text.removeprefix("\ufeff")
        return text

    def _peek(self) -> str:
        """The next character that is not whitespace ('' at the end), not consumed."""
        while True:
            if self._pos < len(self._buf):
                char = self._buf[self._pos]
                if char not in _WHITESPACE_CHARS:  # most often: no regex call
                    return char
                self._pos = _WHITESPACE.match(self._buf, self._pos).end()
                if self._pos < len(self._buf):
                    return self._buf[self._pos]
            if not self._fill(1):
                return ""

    def _expect(self, char: str, what: str) -> None:
        if self._peek() != char:
            raise self._error(f"Expecting {what}", self._pos)
        self._pos += 1

    def _decode(self, max_chars: int) -> tuple[Any, int]:
        """The value at the cursor and where it started in ``_buf``; the cursor moves past it."""
        self._peek()
        want = min(max_chars, 64 * 1024)
        while True:
            start = self._pos
            try:
                value, end = _DECODER.raw_decode(self._buf, start)
            except json.JSONDecodeError as exc:
                cut = (
                    exc.msg.startswith("Unterminated string")
                    or exc.pos >= len(self._buf) - _CUT_MARGIN
                )
                if self._eof or not cut:
                    raise self._error(_reason(exc), exc.pos) from None
                extent = len(self._buf) - start
            except (ValueError, RecursionError) as exc:  # named at the value's start
                raise self._error(_reason(exc), start) from None
            else:
                # A number that ends near the end of what has arrived may go on in the next
                # chunk: "1." + "5" and "1e" + "5" each decode as 1 before "." or "e".
                if (
                    end < len(self._buf) - _CUT_MARGIN  # most often: decided here
                    or self._eof
                    or type(value) not in (int, float)
                ):
                    if end - start > max_chars:
                        raise ValueTooLongError(max_chars)
                    self._pos = end
                    return value, start
                extent = end - start
            if extent > max_chars:
                raise ValueTooLongError(max_chars)
            # Grow geometrically, so a value of n characters costs O(n) retries in all.
            want = min(max(want, 2 * (len(self._buf) - start)), max_chars + _CUT_MARGIN + 1)
            self._fill(want)

    # --- the object ----------------------------------------------------------------------

    def members(self) -> Iterator[str]:
        """The names of the object's members in order; read each one's value before the next."""
        self._expect("{", "'{'")
        seen: set[str] = set()
        if self._peek() == "}":
            self._pos += 1
        else:
            while True:
                if self._peek() != '"':
                    raise self._error(
                        "Expecting property name enclosed in double quotes", self._pos
                    )
                try:
                    key, start = self._decode(self._max_key_chars)
                except ValueTooLongError:
                    raise self._error("Property name too long", self._pos) from None
                if not is_unicode(key):
                    # Valid JSON, but no UTF-8 text holds it: not even an error naming the key.
                    raise self._error(
                        "Property name is not valid Unicode (a lone surrogate)", start
                    )
                if key in seen:
                    raise self._error(f"Duplicate property {key!r}", start)
                seen.add(key)
                self._expect(":", "':' delimiter")
                yield key
                if self._peek() == ",":
                    self._pos += 1
                    continue
                self._expect("}", "',' delimiter")
                break
        if self._peek() != "":
            raise self._error("Extra data", self._pos)

    def value(self, max_chars: int) -> Any:
        """The current key's value, parsed whole (at most ``max_chars`` characters of JSON)."""
        return self._decode(max_chars)[0]

    def is_array(self) -> bool:
        """Whether the current key's value is an array (nothing is consumed)."""
        return self._peek() == "["

    def items(self, max_item_chars: int) -> Iterator[Any]:
        """The current key's value, an array, one parsed item at a time."""
        for _ in self._items():
            yield self._decode(max_item_chars)[0]

    def item_texts(self, max_item_chars: int) -> Iterator[str]:
        """Like :meth:`items`, but each item's JSON text (checked as JSON) instead of its
        value: a caller that cannot judge an item yet keeps it at the size it was sent."""
        for _ in self._items():
            _, start = self._decode(max_item_chars)
            yield self._buf[start : self._pos]

    def _items(self) -> Iterator[None]:
        self._expect("[", "'['")
        if self._peek() == "]":
            self._pos += 1
            return
        while True:
            yield None  # the caller decodes one item here
            if self._peek() == ",":
                self._pos += 1
                continue
            self._expect("]", "',' delimiter")
            return

    # --- errors --------------------------------------------------------------------------

    def _error(self, message: str, pos: int) -> JsonSyntaxError:
        before = self._buf[:pos]
        breaks = before.count("\n")
        column = pos - before.rfind("\n") if breaks else self._column_base + pos + 1
        return JsonSyntaxError(message, self._line_base + breaks, column)
