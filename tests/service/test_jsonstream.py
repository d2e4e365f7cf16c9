"""service.jsonstream: an object read from byte chunks gives what one whole parse gives,
wherever the chunks are cut, and refuses what is not JSON with a fixed, clear message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.jsonstream import JsonSyntaxError, ObjectReader, loads


def read(chunks: list[bytes]) -> dict[str, Any]:
    reader = ObjectReader(chunks)
    return {key: reader.value(10_000) for key in reader.members()}


def splits(body: bytes) -> list[list[bytes]]:
    """``body`` whole and cut in two at every point."""
    return [[body]] + [[body[:i], body[i:]] for i in range(1, len(body))]


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1.5}',
        b'{"a": -0.25e+10, "b": 12345}',
        b'{"a": [12345, -0.25E-10], "b": 1e5}',
        b'{"a": 12345}',
    ],
)
def test_a_number_cut_by_a_chunk_boundary_reads_as_sent(body: bytes) -> None:
    expected = json.loads(body)
    for chunks in splits(body):
        assert read(chunks) == expected, chunks


def test_a_key_that_is_no_unicode_is_refused_at_its_position() -> None:
    with pytest.raises(JsonSyntaxError) as info:
        read([b'{"a": 1,\n "\\ud800": 2}'])
    assert str(info.value) == (
        "Property name is not valid Unicode (a lone surrogate) at line 2 column 2"
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a": "x\x01"}', "Invalid control character at line 1 column 9"),
        (b'{"a": "abc', "Unterminated string starting at line 1 column 7"),
        (b'{"a": ' + b"1" * 5000 + b"}", "Number has too many digits at line 1 column 7"),
        (b'{"a": 1e400}', "Number out of range at line 1 column 7"),
        (b'{"a": [0, -1E+400]}', "Number out of range at line 1 column 7"),
        (b'{"a": NaN}', "NaN is not valid JSON at line 1 column 7"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON at line 1 column 7"),
    ],
    ids=["control", "unterminated", "digits", "inf", "nested-inf", "nan", "infinity"],
)
def test_a_value_that_is_not_json_gets_a_fixed_message(body: bytes, message: str) -> None:
    for chunks in [[body], [body[i : i + 7] for i in range(0, len(body), 7)]]:
        with pytest.raises(JsonSyntaxError) as info:
            read(chunks)
        assert str(info.value) == message
    # A line of a file, parsed whole, gets the same words.
    with pytest.raises(JsonSyntaxError) as info:
        loads(body.decode())
    assert info.value.reason == message.split(" at line ")[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"a":\n "caf\xe9"}', "not valid UTF-8 (bad byte at offset 11) at line 2 column 6"),
        (
            b'\xef\xbb\xbf{"a": "\xe2\x82"}',
            "not valid UTF-8 (bad byte at offset 10) at line 1 column 8",
        ),
        (b'{"a": "\xe2\x82', "not valid UTF-8 (bad byte at offset 7) at line 1 column 8"),
    ],
    ids=["latin-1", "cut-character", "cut-at-the-end"],
)
def test_bad_utf8_is_named_where_it_is_wherever_the_chunks_are_cut(
    body: bytes, message: str
) -> None:
    for chunks in splits(body):
        with pytest.raises(JsonSyntaxError) as info:
            read(chunks)
        assert str(info.value) == message, chunks


def test_a_leading_bom_is_dropped_wherever_the_chunks_are_cut() -> None:
    for chunks in splits(b'\xef\xbb\xbf{"a": "\xc3\xa9"}'):
        assert read(chunks) == {"a": "é"}
