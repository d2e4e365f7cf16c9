"""service.jsonstream: an object read from byte chunks gives what one whole parse gives,
wherever the chunks are cut, and refuses what is not JSON with a fixed, clear message."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.jsonstream import JsonSyntaxError, ObjectReader


def read(chunks: list[bytes]) -> dict[str, Any]:
    reader = ObjectReader(chunks)
    return {key: reader.value(1024) for key in reader.members()}


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
