"""Validate a whole dataset. Pure: bytes or records in, normalised rows out.

:func:`parse_file` and :func:`parse_json_body` stop at the first problem, a :class:`DatasetError`
that names the line or record and the field. :func:`check_file` and :func:`check_json_body` apply
the same rules but list every problem (up to a bound) instead of stopping at the first: the dry
run behind ``POST /v1/datasets/validate``. Records are read in ``reading.py`` and each checked
in ``rows.py``; the rules over the whole dataset (not empty, how many classes) are here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.datasets.messages import normalize_messages_row
from service.datasets.pairs import pair_report
from service.datasets.reading import (
    DatasetFormat,
    Item,
    file_items,
    file_text,
    read_records_body,
)
from service.datasets.rows import (
    MESSAGE_KINDS,
    DatasetError,
    DatasetKind,
    Limits,
    Where,
    normalize_row,
)

# Limits is frozen, so every call may share one default.
_DEFAULT_LIMITS = Limits()
# A dry run lists at most this many problems: enough to fix a file in one pass, never a flood.
MAX_PROBLEMS = 100


@dataclass(frozen=True)
class ParsedDataset:
    kind: DatasetKind
    rows: list[dict[str, Any]]
    # {label: count}, sorted by label; None for other kinds.
    label_counts: dict[str, int] | None
    # Preference data: what training will make of the pairs (service.datasets.pairs).
    pair_report: dict[str, int] | None = None

    @property
    def row_count(self) -> int:
        return len(self.rows)


def _normalize(
    kind: DatasetKind, obj: Mapping[str, Any], where: Where, limits: Limits
) -> dict[str, Any]:
    if kind in MESSAGE_KINDS:
        return normalize_messages_row(kind, obj, where, limits)
    return normalize_row(kind, obj, where, limits)


@dataclass(frozen=True)
class _Scan:
    rows: list[dict[str, Any]]
    problems: list[DatasetError]
    # Reading stopped before the end: at the problem bound, or at a problem nothing follows
    # (a bad CSV header, too many rows).
    stopped: bool


def _scan(
    kind: DatasetKind,
    items: Iterable[Item],
    limits: Limits,
    *,
    max_problems: int,
    empty_param: str,
) -> _Scan:
    """Normalise rows until the end or until ``max_problems`` problems are found."""
    rows: list[dict[str, Any]] = []
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
                rows.append(_normalize(kind, item, where, limits))
            except DatasetError as exc:
                problems.append(exc)
        if len(problems) >= max_problems:
            return _Scan(rows, problems, stopped=True)
    return _Scan(rows, problems, stopped=False)


def _label_counts(kind: DatasetKind, rows: Sequence[Mapping[str, Any]]) -> dict[str, int] | None:
    """{label: count}, sorted by label; None for other kinds."""
    if kind is not DatasetKind.CLASSIFICATION:
        return None
    return dict(sorted(Counter(row["label"] for row in rows).items()))


def _pair_report(kind: DatasetKind, rows: Sequence[Mapping[str, Any]]) -> dict[str, int] | None:
    return pair_report(rows) if kind is DatasetKind.PREFERENCE else None


def _check_whole(
    rows: Sequence[Mapping[str, Any]],
    label_counts: dict[str, int] | None,
    limits: Limits,
    *,
    empty_param: str,
) -> None:
    """The whole-dataset rules, once every row is valid: not empty, enough and not too many
    classes."""
    if not rows:
        raise DatasetError("dataset is empty: it has no rows", param=empty_param, code="empty_file")
    if label_counts is None:
        return
    if len(label_counts) < 2:
        only = next(iter(label_counts))
        raise DatasetError(
            f"a classification dataset needs at least 2 classes; every row has label '{only}'",
            param="label",
            code="single_class",
        )
    if len(label_counts) > limits.max_labels:
        raise DatasetError(
            f"dataset has {len(label_counts)} distinct labels; at most {limits.max_labels} are "
            "supported",
            param="label",
            code="too_many_labels",
        )


def _collect(
    kind: DatasetKind, items: Iterable[Item], limits: Limits, *, empty_param: str
) -> ParsedDataset:
    scan = _scan(kind, items, limits, max_problems=1, empty_param=empty_param)
    if scan.problems:
        raise scan.problems[0]
    label_counts = _label_counts(kind, scan.rows)
    _check_whole(scan.rows, label_counts, limits, empty_param=empty_param)
    return ParsedDataset(kind, scan.rows, label_counts, _pair_report(kind, scan.rows))


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
    # Preference data: what training will make of the pairs that passed.
    pair_report: dict[str, int] | None = None

    @property
    def valid(self) -> bool:
        return not self.problems


def _report(
    kind: DatasetKind,
    items: Iterable[Item],
    limits: Limits,
    max_problems: int,
    *,
    empty_param: str,
) -> DatasetReport:
    scan = _scan(kind, items, limits, max_problems=max_problems, empty_param=empty_param)
    problems = scan.problems
    label_counts = _label_counts(kind, scan.rows)
    if not problems:
        # The whole-dataset rules only mean something once every row is readable.
        try:
            _check_whole(scan.rows, label_counts, limits, empty_param=empty_param)
        except DatasetError as exc:
            problems = [exc]
    return DatasetReport(
        kind=kind,
        row_count=len(scan.rows),
        label_counts=label_counts,
        problems=problems,
        truncated=scan.stopped and len(scan.problems) >= max_problems,
        pair_report=_pair_report(kind, scan.rows),
    )


def parse_file(
    data: bytes, kind: DatasetKind, fmt: DatasetFormat, limits: Limits = _DEFAULT_LIMITS
) -> ParsedDataset:
    """Validate an uploaded JSONL or CSV file."""
    text = file_text(data)
    items = file_items(text, kind, fmt, limits)
    return _collect(kind, items, limits, empty_param="file")


def parse_json_body(
    chunks: Iterable[bytes], limits: Limits = _DEFAULT_LIMITS
) -> tuple[ParsedDataset, str | None]:
    """Validate a JSON upload ``{"kind", "records", "name"}`` read from ``chunks`` as they
    arrive (rows are checked as they are parsed); the dataset and the name sent."""

    def collect(kind: DatasetKind, items: Iterator[Item]) -> ParsedDataset:
        return _collect(kind, items, limits, empty_param="records")

    return read_records_body(chunks, limits, collect)


def check_file(
    data: bytes,
    kind: DatasetKind,
    fmt: DatasetFormat,
    limits: Limits = _DEFAULT_LIMITS,
    max_problems: int = MAX_PROBLEMS,
) -> DatasetReport:
    """What :func:`parse_file` would say, listing every problem up to ``max_problems``."""
    try:
        text = file_text(data)
    except DatasetError as exc:
        return DatasetReport(kind, 0, None, [exc], truncated=False)
    items = file_items(text, kind, fmt, limits)
    return _report(kind, items, limits, max_problems, empty_param="file")


def check_json_body(
    chunks: Iterable[bytes],
    limits: Limits = _DEFAULT_LIMITS,
    max_problems: int = MAX_PROBLEMS,
) -> DatasetReport:
    """What :func:`parse_json_body` would say, listing every problem of the records up to
    ``max_problems`` (a body that is no upload at all, such as one without ``kind``, is
    refused as the upload would be)."""

    def report(kind: DatasetKind, items: Iterator[Item]) -> DatasetReport:
        return _report(kind, items, limits, max_problems, empty_param="records")

    return read_records_body(chunks, limits, report)[0]
