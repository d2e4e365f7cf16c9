"""The pure dataset parser: every rejection names its line (or record) and field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from service.datasets import codec
from service.datasets.reading import DatasetFormat, detect_format
from service.datasets.rows import DatasetError, DatasetKind, Limits
from service.datasets.validation import parse_file, parse_json_body

CLS = DatasetKind.CLASSIFICATION
PREF = DatasetKind.PREFERENCE
JSONL = DatasetFormat.JSONL
CSV = DatasetFormat.CSV


def fails(
    data: bytes, kind: DatasetKind = CLS, fmt: DatasetFormat = JSONL, **limits: int
) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse_file(data, kind, fmt, Limits(**limits))
    return info.value


def test_jsonl_classification_normalises_rows() -> None:
    data = (
        b'{"text": "good", "label": "pos", "id": 7}\n'
        b"\n"  # blank lines are skipped
        b'{"text": "bad", "label": 0, "text_pair": "ctx"}\r\n'
        b'{"text": "fine", "label": " pos "}\n'
    )
    parsed = parse_file(data, CLS, JSONL)
    assert parsed.rows == [
        {"text": "good", "label": "pos"},
        {"text": "bad", "label": "0", "text_pair": "ctx"},
        {"text": "fine", "label": "pos"},
    ]
    assert parsed.label_counts == {"0": 1, "pos": 2}
    assert parsed.row_count == 3


def test_bad_json_names_the_line() -> None:
    err = fails(b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": oops}\n')
    assert err.message.startswith("line 3: invalid JSON")
    assert (err.param, err.code) == ("file", "invalid_json")


def test_non_object_line() -> None:
    err = fails(b'{"text": "a", "label": "x"}\n["text", "label"]\n')
    assert err.message.startswith("line 2: expected a JSON object, got array")


def test_nan_is_not_json() -> None:
    err = fails(b'{"text": "a", "label": "x"}\n{"text": "b", "label": NaN}\n')
    assert err.message.startswith("line 2:") and err.code == "invalid_json"


@pytest.mark.parametrize(
    ("line", "param", "code", "fragment"),
    [
        (b'{"label": "x"}', "text", "missing_field", "missing required field 'text'"),
        (b'{"text": "   ", "label": "x"}', "text", "empty_field", "'text' must not be empty"),
        (b'{"text": 5, "label": "x"}', "text", "invalid_type", "must be a string, got integer"),
        (b'{"text": "a"}', "label", "missing_field", "missing required field 'label'"),
        (b'{"text": "a", "label": true}', "label", "invalid_type", "got boolean"),
        (b'{"text": "a", "label": 1.5}', "label", "invalid_type", "got number"),
        (b'{"text": "a", "label": ""}', "label", "empty_field", "must not be empty"),
        # An integer label is held to the label length too (JSON allows 4,300 digits).
        (
            b'{"text": "a", "label": 1' + b"0" * 300 + b"}",
            "label",
            "field_too_long",
            "longer than 256 characters",
        ),
        (
            b'{"text": "a", "label": "x", "text_pair": 3}',
            "text_pair",
            "invalid_type",
            "got integer",
        ),
    ],
)
def test_bad_classification_row(line: bytes, param: str, code: str, fragment: str) -> None:
    err = fails(b'{"text": "ok", "label": "y"}\n' + line + b"\n")
    assert err.message.startswith("line 2: ")
    assert fragment in err.message
    assert (err.param, err.code) == (param, code)


def test_invalid_utf8_names_the_line() -> None:
    err = fails(b'{"text": "ok", "label": "y"}\n{"text": "caf\xe9", "label": "x"}\n')
    assert err.message.startswith("line 2: file is not valid UTF-8")
    assert (err.param, err.code) == ("file", "invalid_utf8")


def test_utf8_bom_is_accepted() -> None:
    parsed = parse_file(
        '\ufeff{"text": "é", "label": "a"}\n{"text": "b", "label": "b"}'.encode(), CLS, JSONL
    )
    assert parsed.rows[0]["text"] == "é"


@pytest.mark.parametrize("data", [b"", b"\n\n  \n"])
def test_empty_file(data: bytes) -> None:
    err = fails(data)
    assert (err.param, err.code) == ("file", "empty_file")


def test_csv_with_only_a_header_is_empty() -> None:
    assert fails(b"text,label\n", fmt=CSV).code == "empty_file"


def test_one_class_only() -> None:
    err = fails(b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    assert (err.param, err.code) == ("label", "single_class")
    assert "'x'" in err.message


def test_int_and_string_labels_are_one_class() -> None:
    assert fails(b'{"text": "a", "label": 1}\n{"text": "b", "label": "1"}\n').code == "single_class"


def test_row_limit() -> None:
    data = b"".join(b'{"text": "t%d", "label": "%d"}\n' % (i, i % 2) for i in range(11))
    assert parse_file(data, CLS, JSONL, Limits(max_rows=11)).row_count == 11
    err = fails(data, max_rows=10)
    assert err.code == "too_many_rows"


def test_text_length_limit() -> None:
    err = fails(b'{"text": "' + b"a" * 50 + b'", "label": "x"}\n', max_text_chars=10)
    assert (err.param, err.code) == ("text", "field_too_long")


def test_csv_classification() -> None:
    data = b'Text,Label,extra\n"hello, world",pos,1\n"multi\nline",neg,2\nplain,pos,3\n'
    parsed = parse_file(data, CLS, CSV)
    assert parsed.rows == [
        {"text": "hello, world", "label": "pos"},
        {"text": "multi\nline", "label": "neg"},
        {"text": "plain", "label": "pos"},
    ]


def test_csv_bad_row_names_the_line() -> None:
    err = fails(b"text,label\ngood,pos\nbad,neg,surplus\n", fmt=CSV)
    assert err.message.startswith("line 3: expected 2 fields")
    assert err.code == "invalid_csv"


def test_csv_empty_cell_names_line_and_field() -> None:
    err = fails(b"text,label\ngood,pos\n,neg\n", fmt=CSV)
    assert err.message.startswith("line 3: ")
    assert (err.param, err.code) == ("text", "empty_field")


def test_csv_missing_column() -> None:
    err = fails(b"sentence,label\ngood,pos\n", fmt=CSV)
    assert err.message.startswith("line 1: header has no 'text' column")
    assert (err.param, err.code) == ("text", "missing_column")


def test_csv_unterminated_quote() -> None:
    err = fails(b'text,label\ngood,pos\n"never closed,neg\n', fmt=CSV)
    assert err.code == "invalid_csv" and err.message.startswith("line ")


def test_preference_rows() -> None:
    data = (
        b'{"prompt": "Q?", "chosen": "good answer", "rejected": "bad answer"}\n'
        b'{"chosen": "yes", "rejected": "no", "prompt": ""}\n'
    )
    parsed = parse_file(data, PREF, JSONL)
    assert parsed.rows == [
        {"chosen": "good answer", "rejected": "bad answer", "prompt": "Q?"},
        {"chosen": "yes", "rejected": "no"},
    ]
    assert parsed.label_counts is None


def test_preference_errors() -> None:
    err = fails(b'{"chosen": "a"}\n', kind=PREF)
    assert (err.param, err.code) == ("rejected", "missing_field")
    err = fails(b'{"chosen": "a", "rejected": "a"}\n', kind=PREF)
    assert err.code == "identical_pair"
    err = fails(b"prompt,chosen\nq,a\n", kind=PREF, fmt=CSV)
    assert (err.param, err.code) == ("rejected", "missing_column")


def parse_records(records: list[Any], kind: DatasetKind) -> None:
    parse_json_body([json.dumps({"kind": kind.value, "records": records}).encode()])


def test_records_errors_use_dotted_paths() -> None:
    with pytest.raises(DatasetError) as info:
        parse_records([{"text": "a", "label": "x"}, {"text": "", "label": "y"}], CLS)
    assert info.value.param == "records.1.text"
    assert info.value.message.startswith("records[1]: ")
    with pytest.raises(DatasetError) as info:
        parse_records(["just a string"], CLS)
    assert info.value.param == "records.0"
    with pytest.raises(DatasetError) as info:
        parse_records([], CLS)
    assert (info.value.param, info.value.code) == ("records", "empty_file")


@pytest.mark.parametrize(
    ("filename", "ctype", "data", "expected"),
    [
        ("train.csv", None, b"{", CSV),
        ("train.jsonl", "text/csv", b"text", JSONL),
        (None, "text/csv", b"{", CSV),
        ("blob", None, b'  {"text": 1}', JSONL),
        ("blob", None, b"text,label", CSV),
    ],
)
def test_detect_format(
    filename: str | None, ctype: str | None, data: bytes, expected: DatasetFormat
) -> None:
    assert detect_format(filename, ctype, data) is expected


def test_codec_round_trip() -> None:
    rows = [{"text": "line\nbreak \u2028 é", "label": "a"}, {"text": "b", "label": "b"}]
    blob = codec.encode_rows(rows)
    assert codec.decode_rows(blob) == rows
    assert codec.encode_rows(rows) == blob  # deterministic


def test_a_jsonl_line_longer_than_any_row_is_refused_unparsed() -> None:
    longest = Limits().max_record_chars
    junk = b'{"text": "a", "label": "b", "meta": [' + b"{}," * (longest // 3) + b"{}]}\n"
    err = fails(b'{"text": "ok", "label": "pos"}\n' + junk)
    assert (err.line, err.param, err.code) == (2, "file", "record_too_large")


def test_the_line_cap_follows_the_limits_given() -> None:
    # Smaller limits make a smaller record: a line past it is refused, not parsed.
    limits = {"max_text_chars": 10, "max_label_chars": 5}
    longest = Limits(**limits).max_record_chars
    line = b'{"text": "a", "label": "b", "meta": "' + b"x" * longest + b'"}\n'
    err = fails(b'{"text": "ok", "label": "pos"}\n' + line, **limits)
    assert (err.line, err.param, err.code) == (2, "file", "record_too_large")
    assert f"longer than {longest} characters" in err.message


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            b'{"text": "a\x01", "label": "x"}',
            "line 1: invalid JSON (Invalid control character at column 12)",
        ),
        (
            b'{"text": "a", "label": 1e400}',
            "line 1: invalid JSON (Number out of range at column 1)",
        ),
        (
            b'{"text": "a", "label": ' + b"7" * 5000 + b"}",
            "line 1: invalid JSON (Number has too many digits at column 1)",
        ),
    ],
    ids=["control", "inf", "digits"],
)
def test_a_line_that_is_not_json_gets_a_fixed_message(line: bytes, message: str) -> None:
    err = fails(line + b"\n")
    assert (err.code, err.message) == ("invalid_json", message)
