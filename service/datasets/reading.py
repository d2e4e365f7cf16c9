"""Reading a dataset's records: an uploaded JSON Lines or CSV file (its format detected, its
text strict UTF-8) or a JSON body's ``records``. Each record comes paired with where it is, or
as the problem that kept it from being read at all (bad JSON, a short CSV row)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Any

from service.datasets.rows import (
    REQUIRED_FIELDS,
    DatasetError,
    DatasetKind,
    Line,
    Record,
    Where,
    type_name,
)


class DatasetFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


# A row to check, or the problem that stopped it from being read at all (bad JSON, short CSV row).
Item = tuple[Where, Mapping[str, Any] | DatasetError]


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 (a leading BOM is dropped); the error names the offending line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise Line(line).error(
            f"file is not valid UTF-8 (bad byte at offset {exc.start})", "file", "invalid_utf8"
        ) from None


def detect_format(filename: str | None, content_type: str | None, data: bytes) -> DatasetFormat:
    name = (filename or "").lower()
    if name.endswith(".csv"):
        return DatasetFormat.CSV
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return DatasetFormat.JSONL
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype in ("text/csv", "application/csv"):
        return DatasetFormat.CSV
    if ctype in ("application/jsonl", "application/x-ndjson", "application/json"):
        return DatasetFormat.JSONL
    # Unknown name and type: a JSON Lines file starts with an object.
    return DatasetFormat.JSONL if data.lstrip()[:1] == b"{" else DatasetFormat.CSV


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _jsonl_items(text: str) -> Iterator[Item]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which
    # json.dumps leaves unescaped inside strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        where = Line(number)
        try:
            obj = json.loads(line, parse_constant=_reject_constant)
        except json.JSONDecodeError as exc:
            yield (
                where,
                where.error(
                    f"invalid JSON ({exc.msg} at column {exc.colno})", "file", "invalid_json"
                ),
            )
            continue
        except (ValueError, RecursionError) as exc:
            yield where, where.error(f"invalid JSON ({exc})", "file", "invalid_json")
            continue
        if not isinstance(obj, dict):
            yield (
                where,
                where.error(
                    f"expected a JSON object, got {type_name(obj)} (JSON Lines holds one object "
                    "per line)",
                    "file",
                    "invalid_json",
                ),
            )
            continue
        yield where, obj


def _csv_items(text: str, kind: DatasetKind) -> Iterator[Item]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    try:
        for cells in reader:
            where = Line(reader.line_num)
            if not cells or all(not c.strip() for c in cells):
                continue
            if header is None:
                try:
                    header = _csv_header(cells, kind, where)
                except DatasetError as exc:
                    yield where, exc  # no row can be read without its columns
                    return
                continue
            if len(cells) != len(header):
                yield (
                    where,
                    where.error(
                        f"expected {len(header)} fields as in the header, got {len(cells)}",
                        "file",
                        "invalid_csv",
                    ),
                )
                continue
            yield where, dict(zip(header, cells, strict=True))
    except csv.Error as exc:
        # The reader cannot go on past a broken quote.
        line = Line(reader.line_num)
        yield line, line.error(f"malformed CSV ({exc})", "file", "invalid_csv")


def _csv_header(cells: Sequence[str], kind: DatasetKind, where: Line) -> list[str]:
    header = [c.strip().lower() for c in cells]
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise where.error(f"duplicate column '{name}' in header", name, "invalid_csv")
        seen.add(name)
    for name in REQUIRED_FIELDS[kind]:
        if name not in seen:
            expected = ", ".join(REQUIRED_FIELDS[kind])
            raise where.error(
                f"header has no '{name}' column (a {kind} CSV needs: {expected})",
                name,
                "missing_column",
            )
    return header


def file_text(data: bytes) -> str:
    """An uploaded file's text; an empty file or one that is not UTF-8 is a DatasetError."""
    if not data.strip():
        raise DatasetError("file is empty", param="file", code="empty_file")
    return decode_utf8(data)


def file_items(text: str, kind: DatasetKind, fmt: DatasetFormat) -> Iterator[Item]:
    """A file's records, in order; a CSV's header must have ``kind``'s required columns."""
    return _jsonl_items(text) if fmt is DatasetFormat.JSONL else _csv_items(text, kind)


def record_items(records: Sequence[Any]) -> Iterator[Item]:
    """The records of a JSON body, each of which must be an object."""
    for index, obj in enumerate(records):
        where = Record(index)
        if not isinstance(obj, dict):
            yield (
                where,
                where.error(f"expected an object, got {type_name(obj)}", None, "invalid_type"),
            )
            continue
        yield where, obj
