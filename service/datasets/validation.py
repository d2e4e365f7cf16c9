"""Parse and validate uploaded datasets. Pure: bytes or records in, normalised rows out.

Every problem raises :class:`DatasetError` naming where it is (line number for files, record
index for JSON bodies) and which field (``param``), so the API can answer a precise 422.
:func:`check_file` and :func:`check_records` apply the same rules but list every problem (up to
a bound) instead of stopping at the first: the dry run behind ``POST /v1/datasets/validate``.

Normalised rows:
- classification: ``{"text": str, "label": str}`` plus ``"text_pair": str`` when given;
  integer labels become strings, so ``1`` and ``"1"`` are one class.
- preference: ``{"chosen": str, "rejected": str}`` plus ``"prompt": str`` when given.
Unknown fields (ids, metadata columns) are dropped.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from service.errors import ServiceError


class DatasetKind(StrEnum):
    CLASSIFICATION = "classification"
    PREFERENCE = "preference"


class DatasetFormat(StrEnum):
    JSONL = "jsonl"
    CSV = "csv"


class DatasetError(ServiceError):
    default_code = "invalid_dataset"
    # The line of the uploaded file at fault, where there is one: reports list problems by line.
    line: int | None = None


@dataclass(frozen=True)
class Limits:
    max_rows: int = 200_000
    max_text_chars: int = 100_000
    max_label_chars: int = 256
    max_labels: int = 1_000


# A dry run lists at most this many problems: enough to fix a file in one pass, never a flood.
MAX_PROBLEMS = 100


@dataclass(frozen=True)
class ParsedDataset:
    kind: DatasetKind
    rows: list[dict[str, str]]
    # {label: count}, sorted by label; None for preference data.
    label_counts: dict[str, int] | None

    @property
    def row_count(self) -> int:
        return len(self.rows)


REQUIRED_FIELDS: dict[DatasetKind, tuple[str, ...]] = {
    DatasetKind.CLASSIFICATION: ("text", "label"),
    DatasetKind.PREFERENCE: ("chosen", "rejected"),
}
OPTIONAL_FIELDS: dict[DatasetKind, tuple[str, ...]] = {
    DatasetKind.CLASSIFICATION: ("text_pair",),
    DatasetKind.PREFERENCE: ("prompt",),
}


# --- where a problem is --------------------------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """A row of an uploaded file: messages say ``line N``, ``param`` is the bare field."""

    number: int

    def error(self, message: str, field: str | None, code: str) -> DatasetError:
        error = DatasetError(f"line {self.number}: {message}", param=field or "file", code=code)
        error.line = self.number
        return error


@dataclass(frozen=True)
class _Record:
    """An item of a JSON body's ``records``: ``param`` is the dotted path to the field."""

    index: int

    def error(self, message: str, field: str | None, code: str) -> DatasetError:
        path = f"records.{self.index}" + (f".{field}" if field else "")
        return DatasetError(f"records[{self.index}]: {message}", param=path, code=code)


_Where = _Line | _Record
# A row to check, or the problem that stopped it from being read at all (bad JSON, short CSV row).
_Item = tuple[_Where, Mapping[str, Any] | DatasetError]


# --- row normalisation -----------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "string",
        list: "array",
        dict: "object",
    }.get(type(value), type(value).__name__)


def _check_unicode(value: str, field: str, where: _Where) -> None:
    """JSON's ``\\ud800`` escapes parse to lone surrogates, which no UTF-8 store can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise where.error(
            f"field '{field}' is not valid Unicode (a lone surrogate at character {exc.start})",
            field,
            "invalid_unicode",
        ) from None


def _text(
    obj: Mapping[str, Any], field: str, where: _Where, limits: Limits, *, required: bool
) -> str | None:
    value = obj.get(field)
    if value is None or (not required and value == ""):
        if required:
            raise where.error(f"missing required field '{field}'", field, "missing_field")
        return None
    if not isinstance(value, str):
        raise where.error(
            f"field '{field}' must be a string, got {_type_name(value)}", field, "invalid_type"
        )
    if not value.strip():
        raise where.error(f"field '{field}' must not be empty", field, "empty_field")
    _check_unicode(value, field, where)
    if len(value) > limits.max_text_chars:
        raise where.error(
            f"field '{field}' is longer than {limits.max_text_chars} characters",
            field,
            "field_too_long",
        )
    return value


def _label(obj: Mapping[str, Any], where: _Where, limits: Limits) -> str:
    value = obj.get("label")
    if value is None:
        raise where.error("missing required field 'label'", "label", "missing_field")
    # bool is an int subclass, but True is no class name anyone means.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise where.error(
            f"field 'label' must be a string or an integer, got {_type_name(value)}",
            "label",
            "invalid_type",
        )
    label = value.strip()
    if not label:
        raise where.error("field 'label' must not be empty", "label", "empty_field")
    _check_unicode(label, "label", where)
    if len(label) > limits.max_label_chars:
        raise where.error(
            f"field 'label' is longer than {limits.max_label_chars} characters",
            "label",
            "field_too_long",
        )
    return label


def normalize_row(
    kind: DatasetKind, obj: Mapping[str, Any], where: _Where, limits: Limits
) -> dict[str, str]:
    if kind is DatasetKind.CLASSIFICATION:
        text = _text(obj, "text", where, limits, required=True)
        assert text is not None
        row = {"text": text, "label": _label(obj, where, limits)}
        pair = _text(obj, "text_pair", where, limits, required=False)
        if pair is not None:
            row["text_pair"] = pair
        return row
    chosen = _text(obj, "chosen", where, limits, required=True)
    rejected = _text(obj, "rejected", where, limits, required=True)
    assert chosen is not None and rejected is not None
    if chosen == rejected:
        # Identical answers carry no preference signal (and a zero gradient).
        raise where.error("'chosen' and 'rejected' are identical", "rejected", "identical_pair")
    row = {"chosen": chosen, "rejected": rejected}
    prompt = _text(obj, "prompt", where, limits, required=False)
    if prompt is not None:
        row["prompt"] = prompt
    return row


@dataclass(frozen=True)
class _Scan:
    rows: list[dict[str, str]]
    problems: list[DatasetError]
    # Reading stopped before the end: at the problem bound, or at a problem nothing follows
    # (a bad CSV header, too many rows).
    stopped: bool


def _scan(
    kind: DatasetKind,
    items: Iterable[_Item],
    limits: Limits,
    *,
    max_problems: int,
    empty_param: str,
) -> _Scan:
    """Normalise rows until the end or until ``max_problems`` problems are found."""
    rows: list[dict[str, str]] = []
    problems: list[DatasetError] = []
    for where, item in items:
        if len(rows) >= limits.max_rows:
            problems.append(
                DatasetError(
                    f"dataset has more than {limits.max_rows} rows",
                    param=empty_param,
                    code="too_many_rows",
                )
            )
            return _Scan(rows, problems, stopped=True)
        if isinstance(item, DatasetError):
            problems.append(item)
        else:
            try:
                rows.append(normalize_row(kind, item, where, limits))
            except DatasetError as exc:
                problems.append(exc)
        if len(problems) >= max_problems:
            return _Scan(rows, problems, stopped=True)
    return _Scan(rows, problems, stopped=False)


def _label_counts(
    kind: DatasetKind, rows: Sequence[Mapping[str, str]], limits: Limits, *, empty_param: str
) -> dict[str, int] | None:
    """The whole-dataset rules, once every row is valid: not empty, enough and not too many
    classes. Returns the label counts (None for preference data)."""
    if not rows:
        raise DatasetError("dataset is empty: it has no rows", param=empty_param, code="empty_file")
    if kind is not DatasetKind.CLASSIFICATION:
        return None
    counts = Counter(row["label"] for row in rows)
    if len(counts) < 2:
        only = next(iter(counts))
        raise DatasetError(
            f"a classification dataset needs at least 2 classes; every row has label '{only}'",
            param="label",
            code="single_class",
        )
    if len(counts) > limits.max_labels:
        raise DatasetError(
            f"dataset has {len(counts)} distinct labels; at most {limits.max_labels} are supported",
            param="label",
            code="too_many_labels",
        )
    return dict(sorted(counts.items()))


def _collect(
    kind: DatasetKind, items: Iterable[_Item], limits: Limits, *, empty_param: str
) -> ParsedDataset:
    scan = _scan(kind, items, limits, max_problems=1, empty_param=empty_param)
    if scan.problems:
        raise scan.problems[0]
    label_counts = _label_counts(kind, scan.rows, limits, empty_param=empty_param)
    return ParsedDataset(kind=kind, rows=scan.rows, label_counts=label_counts)


@dataclass(frozen=True)
class DatasetReport:
    """Every problem of a dataset (up to a bound), or its summary when it has none."""

    kind: DatasetKind
    # Rows that passed; all of them when there are no problems.
    row_count: int
    # {label: count} of the rows that passed; None for preference data.
    label_counts: dict[str, int] | None
    problems: list[DatasetError]
    # More problems may follow the ones listed: checking stopped at the bound.
    truncated: bool

    @property
    def valid(self) -> bool:
        return not self.problems


def _report(
    kind: DatasetKind,
    items: Iterable[_Item],
    limits: Limits,
    max_problems: int,
    *,
    empty_param: str,
) -> DatasetReport:
    scan = _scan(kind, items, limits, max_problems=max_problems, empty_param=empty_param)
    problems = scan.problems
    if not problems:
        # The whole-dataset rules only mean something once every row is readable.
        try:
            _label_counts(kind, scan.rows, limits, empty_param=empty_param)
        except DatasetError as exc:
            problems = [exc]
    counts = None
    if kind is DatasetKind.CLASSIFICATION:
        counts = dict(sorted(Counter(row["label"] for row in scan.rows).items()))
    return DatasetReport(
        kind=kind,
        row_count=len(scan.rows),
        label_counts=counts,
        problems=problems,
        truncated=scan.stopped and len(scan.problems) >= max_problems,
    )


# --- files -----------------------------------------------------------------------------------


def decode_utf8(data: bytes) -> str:
    """Strict UTF-8 (a leading BOM is dropped); the error names the offending line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _Line(line).error(
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


def _jsonl_items(text: str) -> Iterator[_Item]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which
    # json.dumps leaves unescaped inside strings.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        where = _Line(number)
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
                    f"expected a JSON object, got {_type_name(obj)} (JSON Lines holds one object "
                    "per line)",
                    "file",
                    "invalid_json",
                ),
            )
            continue
        yield where, obj


def _csv_items(text: str, kind: DatasetKind) -> Iterator[_Item]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    try:
        for cells in reader:
            where = _Line(reader.line_num)
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
        line = _Line(reader.line_num)
        yield line, line.error(f"malformed CSV ({exc})", "file", "invalid_csv")


def _csv_header(cells: Sequence[str], kind: DatasetKind, where: _Line) -> list[str]:
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


def _file_text(data: bytes) -> str:
    if not data.strip():
        raise DatasetError("file is empty", param="file", code="empty_file")
    return decode_utf8(data)


def parse_file(
    data: bytes, kind: DatasetKind, fmt: DatasetFormat, limits: Limits = Limits()
) -> ParsedDataset:
    """Validate an uploaded JSONL or CSV file."""
    text = _file_text(data)
    items = _jsonl_items(text) if fmt is DatasetFormat.JSONL else _csv_items(text, kind)
    return _collect(kind, items, limits, empty_param="file")


def _record_items(records: Sequence[Any]) -> Iterator[_Item]:
    for index, obj in enumerate(records):
        where = _Record(index)
        if not isinstance(obj, dict):
            yield (
                where,
                where.error(f"expected an object, got {_type_name(obj)}", None, "invalid_type"),
            )
            continue
        yield where, obj


def parse_records(
    records: Sequence[Any], kind: DatasetKind, limits: Limits = Limits()
) -> ParsedDataset:
    """Validate rows sent inline as ``{"records": [...]}``."""
    return _collect(kind, _record_items(records), limits, empty_param="records")


def check_file(
    data: bytes,
    kind: DatasetKind,
    fmt: DatasetFormat,
    limits: Limits = Limits(),
    max_problems: int = MAX_PROBLEMS,
) -> DatasetReport:
    """What :func:`parse_file` would say, listing every problem up to ``max_problems``."""
    try:
        text = _file_text(data)
    except DatasetError as exc:
        return DatasetReport(kind, 0, None, [exc], truncated=False)
    items = _jsonl_items(text) if fmt is DatasetFormat.JSONL else _csv_items(text, kind)
    return _report(kind, items, limits, max_problems, empty_param="file")


def check_records(
    records: Sequence[Any],
    kind: DatasetKind,
    limits: Limits = Limits(),
    max_problems: int = MAX_PROBLEMS,
) -> DatasetReport:
    """What :func:`parse_records` would say, listing every problem up to ``max_problems``."""
    return _report(kind, _record_items(records), limits, max_problems, empty_param="records")
