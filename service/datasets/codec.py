"""How normalised dataset rows are stored: gzip-compressed JSON Lines in one blob."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from typing import Any

ENCODING = "jsonl+gzip"


def encode_rows(rows: Iterable[dict[str, Any]]) -> bytes:
    text = "".join(
        json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n" for row in rows
    )
    # mtime=0 keeps the blob deterministic for identical rows.
    return gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0)


def iter_rows(blob: bytes, encoding: str = ENCODING) -> Iterator[dict[str, Any]]:
    if encoding != ENCODING:
        raise ValueError(f"unknown dataset row encoding {encoding!r}")
    for line in gzip.decompress(blob).decode("utf-8").split("\n"):
        if line:
            yield json.loads(line)


def decode_rows(blob: bytes, encoding: str = ENCODING) -> list[dict[str, Any]]:
    """All rows of a stored dataset, as validated at upload (what the worker trains on)."""
    return list(iter_rows(blob, encoding))
