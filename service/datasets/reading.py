"""Reading a dataset's records: an uploaded JSON Lines or CSV file (its format detected, its
text strict UTF-8) or a JSON body's ``records``, read as the body arrives. Each record comes
paired with where it is, or as the problem that kept it from being read at all (bad JSON, a
short CSV row)."""

from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import StringConstraints, TypeAdapter, ValidationError

from service.datasets.rows import (
    MESSAGE_KINDS,
    REQUIRED_FIELDS,
    CsvRow,
    DatasetError,
    DatasetKind,
    Limits,
    Line,
    Record,
    Where,
    type_name,
)
from service.jsonstream import JsonSyntaxError, ObjectReader, ValueTooLongError, loads
from service.names import NoControlCharacters

T = TypeVar("T")


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


def _jsonl_items(text: str, limits: Limits) -> Iterator[Item]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which
    # json.dumps leaves unescaped inside strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        where = Line(number)
        # A line is one record: one longer than any valid record can be is refused before it
        # is parsed (a line of [{}, {}, ...] costs ~30 times its size as objects).
        if len(line) > limits.max_record_chars:
            message = f"line is longer than {limits.max_record_chars} characters, more than any row"
            yield where, where.error(message, "file", "record_too_large")
            continue
        try:
            obj = loads(line)
        except JsonSyntaxError as exc:
            message = f"invalid JSON ({exc.reason} at column {exc.column})"
            yield where, where.error(message, "file", "invalid_json")
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
            yield where, CsvRow(zip(header, cells, strict=True))
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


def file_items(text: str, kind: DatasetKind, fmt: DatasetFormat, limits: Limits) -> Iterator[Item]:
    """A file's records, in order; a CSV's header must have ``kind``'s required columns."""
    if fmt is DatasetFormat.JSONL:
        return _jsonl_items(text, limits)
    if kind in MESSAGE_KINDS:
        return iter([_no_csv(kind)])
    return _csv_items(text, kind)


def _no_csv(kind: DatasetKind) -> Item:
    """Message lists have no columns: a chat or DPO file is JSON Lines."""
    where = Line(1)
    message = f"a {kind} dataset is JSON Lines (one object per line), not CSV"
    return where, where.error(message, "format", "unsupported_format")


def record_items(records: Iterable[Any]) -> Iterator[Item]:
    """The records of a JSON body, each of which must be an object. A record the body's reader
    cannot read (bad JSON, too long) is the last: nothing after it can be found."""
    values = iter(records)
    for index in itertools.count():
        where = Record(index)
        try:
            obj = next(values)
        except StopIteration:
            return
        except (JsonSyntaxError, ValueTooLongError) as exc:
            yield where, _unreadable(where, exc)
            return
        if not isinstance(obj, dict):
            yield (
                where,
                where.error(f"expected an object, got {type_name(obj)}", None, "invalid_type"),
            )
            continue
        yield where, obj


def _unreadable(where: Record, exc: JsonSyntaxError | ValueTooLongError) -> DatasetError:
    if isinstance(exc, ValueTooLongError):
        message = f"record is longer than {exc.max_chars} characters of JSON"
        return where.error(message, None, "record_too_large")
    return where.error(f"invalid JSON ({exc})", None, "invalid_json")


# The longest JSON text of a body's kind or name (a name is at most 256 characters, each
# at most 12 characters of JSON when escaped as a surrogate pair).
_MAX_FIELD_CHARS = 4096
MAX_NAME_CHARS = 256
_BODY_FIELDS = "kind, name and records"

# A body's kind and name are checked by pydantic with the types DatasetCreateJSON declares
# them with (the model documents the body, this reader checks it): one definition, which also
# refuses a string that is not valid Unicode (a lone surrogate such as "\ud800").
DatasetName = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_NAME_CHARS), NoControlCharacters
]
_KIND: TypeAdapter[DatasetKind] = TypeAdapter(DatasetKind)
_NAME: TypeAdapter[str | None] = TypeAdapter(DatasetName | None)


class _Records:
    """A streamed body's records as items, noting whether the array was read to its end."""

    def __init__(self, values: Iterator[Any]) -> None:
        self._values = values
        self.complete = False

    def __iter__(self) -> Iterator[Item]:
        return record_items(self._until_end())

    def _until_end(self) -> Iterator[Any]:
        yield from self._values
        self.complete = True


def read_records_body(
    chunks: Iterable[bytes],
    limits: Limits,
    check: Callable[[DatasetKind, Iterator[Item]], T],
) -> tuple[T, str | None]:
    """A JSON upload ``{"kind", "name", "records"}`` read from ``chunks`` as they arrive:
    ``check``'s answer on the records and the name sent.

    What is held is bounded by the rows ``check`` keeps, not by the body: records are handed
    to ``check`` one at a time as they are parsed (each at most ``limits.max_record_chars`` of
    JSON), and reading stops once ``check`` stops (a problem, more than ``limits.max_rows``
    records). Records sent before ``kind`` cannot be checked yet: their JSON text is kept (at
    most the body's size, never its parsed objects) and checked once ``kind`` arrives. An
    unknown field is refused before its value is read.
    """
    reader = ObjectReader(chunks)
    kind: DatasetKind | None = None
    name: str | None = None
    held: list[str] | None = None
    checked: T | None = None
    try:
        for key in reader.members():
            if key == "kind":
                kind = _checked(_KIND, key, _field(reader, key), "invalid_kind")
            elif key == "name":
                name = _checked(_NAME, key, _field(reader, key), "invalid_name")
            elif key == "records":
                if not reader.is_array():
                    raise DatasetError(
                        "records must be an array of objects", param="records", code="invalid_type"
                    )
                if kind is None:
                    held = _hold(reader, limits)
                    continue
                records = _Records(reader.items(limits.max_record_chars))
                checked = check(kind, iter(records))
                if not records.complete:
                    return checked, name  # check stopped: the rest need not be read
            else:
                raise DatasetError(
                    f"unknown field {key!r}: a JSON upload has {_BODY_FIELDS}",
                    param=key[:64],
                    code="extra_forbidden",
                )
    except JsonSyntaxError as exc:
        raise DatasetError(
            f"Request body is not valid JSON: {exc}.", param=None, code="json_invalid"
        ) from None
    if kind is None:
        raise DatasetError("kind is required", param="kind", code="missing")
    if held is not None:
        checked = check(kind, record_items(loads(text) for text in held))
    if checked is None:
        raise DatasetError("records is required", param="records", code="missing")
    return checked, name


def _field(reader: ObjectReader, key: str) -> Any:
    try:
        return reader.value(_MAX_FIELD_CHARS)
    except ValueTooLongError:
        raise DatasetError(
            f"{key} is longer than {_MAX_FIELD_CHARS} characters of JSON",
            param=key,
            code="field_too_long",
        ) from None


def _hold(reader: ObjectReader, limits: Limits) -> list[str]:
    """The records' JSON texts, up to one past ``limits.max_rows``."""
    held: list[str] = []
    try:
        for text in itertools.islice(
            reader.item_texts(limits.max_record_chars), limits.max_rows + 1
        ):
            held.append(text)
    except (JsonSyntaxError, ValueTooLongError) as exc:
        raise _unreadable(Record(len(held)), exc) from None
    if len(held) > limits.max_rows:
        raise DatasetError(
            f"dataset has more than {limits.max_rows} rows", param="records", code="too_many_rows"
        )
    return held


def _checked(adapter: TypeAdapter[T], key: str, value: Any, code: str) -> T:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise DatasetError(f"{key}: {exc.errors()[0]['msg']}.", param=key, code=code) from None
