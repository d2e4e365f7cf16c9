"""A JSON upload read as it arrives: the same rows as the file parser, problems named by record
and line, and reading that stops at the first problem, the row cap or an unknown field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.datasets.reading import DatasetFormat
from service.datasets.rows import DatasetError, DatasetKind, Limits
from service.datasets.validation import check_json_body, parse_file, parse_json_body

FIXTURES = Path(__file__).parents[2] / "fixtures"
CLS = DatasetKind.CLASSIFICATION
ROWS = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]
# What follows in a body past the point reading must stop at: unreadable as JSON.
UNREADABLE = b", oops"


def chunked(body: bytes, size: int) -> Iterator[bytes]:
    return (body[i : i + size] for i in range(0, len(body), size))


def refused(body: bytes, **limits: int) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse_json_body(chunked(body, 16), Limits(**limits))
    return info.value


@pytest.mark.parametrize(
    ("fixture", "kind"),
    [
        ("rotten_tomatoes_small.jsonl", DatasetKind.CLASSIFICATION),
        ("rt_preference_small.jsonl", DatasetKind.PREFERENCE),
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 65536], ids=["1B", "7B", "64KiB"])
def test_streamed_records_give_the_file_parser_s_rows(
    fixture: str, kind: DatasetKind, chunk: int
) -> None:
    data = (FIXTURES / fixture).read_bytes()
    records = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    expected = parse_file(data, kind, DatasetFormat.JSONL)
    for body in (
        {"kind": kind.value, "name": "n", "records": records},
        # Records before kind are kept as text and checked once kind arrives.
        {"records": records, "name": "n", "kind": kind.value},
    ):
        for indent in (None, 2):
            text = json.dumps(body, indent=indent, ensure_ascii=chunk == 7).encode()
            parsed, name = parse_json_body(chunked(text, chunk))
            assert (parsed, name) == (expected, "n")


def test_bad_json_names_the_record_and_the_line() -> None:
    body = b'{"kind": "classification", "records": [\n{"text": "a", "label": "x"},\n{"text": tru}]}'
    error = refused(body)
    assert (error.param, error.code) == ("records.1", "invalid_json")
    assert error.message == "records[1]: invalid JSON (Expecting value at line 3 column 10)"


def test_a_record_s_problem_names_its_index_and_field() -> None:
    records: list[Any] = [*ROWS, {"text": "c", "label": None}]
    error = refused(json.dumps({"kind": "classification", "records": records}).encode())
    assert (error.param, error.code) == ("records.2.label", "missing_field")


def test_reading_stops_at_the_row_cap() -> None:
    # Rows past the cap are never read: the unreadable tail would be a JSON error otherwise.
    head = json.dumps({"kind": "classification", "records": ROWS * 3})[:-2].encode()
    error = refused(head + UNREADABLE, max_rows=5)
    assert (error.param, error.code) == ("records", "too_many_rows")
    assert "more than 5 rows" in error.message
    # Held as text before kind, they are counted all the same.
    head = json.dumps({"records": ROWS * 3})[:-2].encode()
    error = refused(head + UNREADABLE, max_rows=5)
    assert (error.param, error.code) == ("records", "too_many_rows")


def test_an_unknown_field_is_refused_before_its_value_is_read() -> None:
    error = refused(b'{"kind": "classification", "meta": [{}, {}' + UNREADABLE)
    assert (error.param, error.code) == ("meta", "extra_forbidden")


def test_a_record_longer_than_any_valid_one_is_refused_unread() -> None:
    limits = Limits(max_text_chars=10, max_label_chars=5)
    junk = b'{"text": "a", "label": "b", "meta": [' + b"{}, " * limits.max_record_chars
    error = refused(
        b'{"kind": "classification", "records": [' + junk, max_text_chars=10, max_label_chars=5
    )
    assert (error.param, error.code) == ("records.0", "record_too_large")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b'{"kind": "regression", "records": []}', "kind", "invalid_kind"),
        (b'{"kind": "classification"}', "records", "missing"),
        (b'{"records": []}', "kind", "missing"),
        (b'{"kind": "classification", "records": "x"}', "records", "invalid_type"),
        (b'{"kind": "classification", "name": "", "records": []}', "name", "invalid_name"),
        (b'{"kind": "classification", "name": "\\ud800", "records": []}', "name", "invalid_name"),
        (b'{"kind": "\\ud800", "records": []}', "kind", "invalid_kind"),
        (
            json.dumps({"kind": "classification", "records": ROWS}).encode() + b" []",
            None,
            "json_invalid",
        ),
        (b'{"kind": "classification", "kind": "preference"}', None, "json_invalid"),
        (b'{"kind": "caf\xe9"}', None, "json_invalid"),
    ],
    ids=[
        "kind",
        "no-records",
        "no-kind",
        "records-type",
        "name",
        "name-surrogate",
        "kind-surrogate",
        "extra-data",
        "dup",
        "utf8",
    ],
)
def test_body_shape_errors_name_the_field(body: bytes, param: str | None, code: str) -> None:
    error = refused(body)
    assert (error.param, error.code) == (param, code)


def test_dry_run_lists_problems_up_to_a_json_error() -> None:
    body = (
        b'{"kind": "classification", "records": [{"text": "a"}, 3, {"text": "b", "label": "c"}, x]}'
    )
    report = check_json_body(chunked(body, 5))
    assert [(p.param, p.code) for p in report.problems] == [
        ("records.0.label", "missing_field"),
        ("records.1", "invalid_type"),
        ("records.3", "invalid_json"),
    ]
