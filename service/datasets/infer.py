"""Which kind of dataset an upload is, from its first row (for uploads that do not say).

OpenAI's Files API has no ``kind``: ``/v1/files`` infers it from the columns of the first row
(``chosen`` + ``rejected`` → preference, ``text`` + ``label`` → classification, ``messages`` →
chat, ``preferred_output`` / ``non_preferred_output`` → dpo: OpenAI's supervised and DPO
fine-tuning files). Pure: bytes in,
:class:`DatasetKind` out, or a :class:`DatasetError` that says what the rows should look like.
"""

from __future__ import annotations

import csv
import io
import json

from service.datasets.reading import DatasetFormat, decode_utf8
from service.datasets.rows import REQUIRED_FIELDS, DatasetError, DatasetKind, Limits, Line

# Enough to hold a CSV header; the full parse reads everything anyway. A JSON Lines file's
# first row is read whole (a chat row may pass a megabyte; a cut one would parse as nothing).
_PEEK_BYTES = 1024 * 1024
_LIMITS = Limits()

_EXPECTED = " or ".join(
    "{" + ", ".join(f'"{f}"' for f in REQUIRED_FIELDS[kind]) + "}" for kind in DatasetKind
)


def _first_row_fields(data: bytes, fmt: DatasetFormat) -> tuple[int, set[str]] | None:
    """(line number, field names) of the first non-blank row, or None for an empty file."""
    if fmt is DatasetFormat.JSONL:
        return _first_json_fields(data)
    head = data[:_PEEK_BYTES]
    try:
        text = decode_utf8(head)
    except DatasetError:
        # A multi-byte character cut by the peek window; the full parse reports real errors.
        text = head.decode("utf-8-sig", errors="ignore")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        for cells in reader:
            if cells and any(c.strip() for c in cells):
                return reader.line_num, {c.strip().lower() for c in cells}
    except csv.Error:
        return None  # the full parse names the line
    return None


def _first_json_fields(data: bytes) -> tuple[int, set[str]] | None:
    """The first non-blank line's fields, the line read whole; None where the full parse has
    an error to report instead (bad UTF-8 or JSON, too deep, longer than any record)."""
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        line = data[start:end]
        if line.strip():
            # A UTF-8 character is at most 4 bytes: past this, no record is this long.
            if len(line) > 4 * _LIMITS.max_record_chars:
                return None
            try:
                obj = json.loads(line.decode("utf-8-sig" if start == 0 else "utf-8"))
            except (ValueError, RecursionError):
                return None
            return number, set(obj) if isinstance(obj, dict) else set()
        start, number = end + 1, number + 1
    return None


def infer_kind(data: bytes, fmt: DatasetFormat) -> DatasetKind:
    """The dataset kind the first row's fields call for.

    An unreadable first row raises nothing here: classification is returned and the full
    parse reports the precise error (line, column) as it would for an explicit kind.
    """
    found = _first_row_fields(data, fmt)
    if found is None:
        return DatasetKind.CLASSIFICATION
    line, fields = found
    for kind in (DatasetKind.PREFERENCE, DatasetKind.CLASSIFICATION):
        if set(REQUIRED_FIELDS[kind]) <= fields:
            return kind
    # A DPO row with a field missing is still a DPO row: its full parse names the field.
    if fields & {"preferred_output", "non_preferred_output"}:
        return DatasetKind.DPO
    if "messages" in fields:
        return DatasetKind.CHAT
    shown = ", ".join(f"'{f}'" for f in sorted(fields)[:8]) or "none"
    raise Line(line).error(
        f"cannot tell the dataset kind from the fields ({shown}); rows need {_EXPECTED}, or "
        "send the kind explicitly",
        "kind",
        "unknown_dataset_kind",
    )
