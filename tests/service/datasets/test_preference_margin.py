"""A preference row's own ``margin``: checked at upload, stored, and trained on.

``GET /v1/methods`` says of the ``margin`` hyperparameter "A row's own margin wins"; the upload
used to drop the row's, so every pair trained with the job's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.base import FrozenBase
from core.training.config import parse_training_config
from core.training.data import PreferenceExample
from core.training.inputs import prepare_inputs
from core.training.trainer import Trainer
from service.datasets import codec
from service.datasets.reading import DatasetFormat
from service.datasets.rows import MAX_ABS_MARGIN, DatasetError, DatasetKind
from service.datasets.validation import check_file, parse_file, parse_json_body

PREF = DatasetKind.PREFERENCE
JSONL = DatasetFormat.JSONL
CSV = DatasetFormat.CSV


def _fails(data: bytes, fmt: DatasetFormat = JSONL) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        parse_file(data, PREF, fmt)
    return info.value


def test_a_rows_margin_is_kept_as_a_float() -> None:
    data = (
        b'{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2.5}\n'
        b'{"chosen": "c", "rejected": "d"}\n'
        b'{"chosen": "e", "rejected": "f", "margin": -3}\n'
        b'{"chosen": "g", "rejected": "h", "margin": null}\n'
    )
    assert parse_file(data, PREF, JSONL).rows == [
        {"chosen": "a", "rejected": "b", "prompt": "p", "margin": 2.5},
        {"chosen": "c", "rejected": "d"},
        {"chosen": "e", "rejected": "f", "margin": -3.0},
        {"chosen": "g", "rejected": "h"},
    ]


def test_a_csv_margin_column_is_read_as_a_number() -> None:
    data = b"prompt,chosen,rejected,margin\np,a,b,2.5\n,c,d,\n,e,f, -1e2 \n"
    assert parse_file(data, PREF, CSV).rows == [
        {"chosen": "a", "rejected": "b", "prompt": "p", "margin": 2.5},
        {"chosen": "c", "rejected": "d"},  # an empty cell is no margin
        {"chosen": "e", "rejected": "f", "margin": -100.0},
    ]


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ('"big"', "invalid_type"),
        ('"2.5"', "invalid_type"),  # JSON has numbers: a string is not one
        ("true", "invalid_type"),
        ("[1]", "invalid_type"),
        ("1000.5", "out_of_range"),
        ("-1e300", "out_of_range"),
        ("1" + "0" * 400, "out_of_range"),
    ],
)
def test_a_bad_jsonl_margin_names_the_line_and_field(value: str, code: str) -> None:
    bad = '{"chosen": "a", "rejected": "b", "margin": ' + value + "}"
    data = f'{{"chosen": "a", "rejected": "b"}}\n{bad}\n'.encode()
    err = _fails(data)
    assert (err.param, err.code, err.line) == ("margin", code, 2)
    assert err.message.startswith("line 2: field 'margin' must be ")


def test_nan_in_jsonl_is_refused_as_json() -> None:
    """The JSON reader refuses NaN, Infinity and 1e999 itself, naming the line."""
    for value in (b"NaN", b"Infinity", b"1e999"):
        err = _fails(b'{"chosen": "a", "rejected": "b", "margin": ' + value + b"}\n")
        assert err.message.startswith("line 1: invalid JSON") and err.code == "invalid_json"


@pytest.mark.parametrize(
    ("cell", "code"),
    [
        ("big", "invalid_type"),
        ("true", "invalid_type"),
        ("nan", "out_of_range"),
        ("inf", "out_of_range"),
        ("-Infinity", "out_of_range"),
        ("1e999", "out_of_range"),
        ("1001", "out_of_range"),
    ],
)
def test_a_bad_csv_margin_names_the_line_and_field(cell: str, code: str) -> None:
    err = _fails(f"chosen,rejected,margin\na,b,1\nc,d,{cell}\n".encode(), CSV)
    assert (err.param, err.code, err.line) == ("margin", code, 3)
    assert err.message.startswith("line 3: field 'margin' must be ")


def test_the_bound_is_inclusive() -> None:
    rows = [
        {"chosen": "a", "rejected": "b", "margin": MAX_ABS_MARGIN},
        {"chosen": "c", "rejected": "d", "margin": -MAX_ABS_MARGIN},
    ]
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    assert [r["margin"] for r in parse_file(data, PREF, JSONL).rows] == [1000.0, -1000.0]


def test_a_json_body_record_names_its_margin() -> None:
    body = b'{"kind": "preference", "records": [{"chosen": "a", "rejected": "b", "margin": 1}, '
    body += b'{"chosen": "a", "rejected": "b", "margin": false}]}'
    with pytest.raises(DatasetError) as info:
        parse_json_body([body])
    assert (info.value.param, info.value.code) == ("records.1.margin", "invalid_type")


def test_the_dry_run_lists_every_bad_margin() -> None:
    data = b"chosen,rejected,margin\na,b,x\nc,d,2\ne,f,1e9\n"
    report = check_file(data, PREF, CSV)
    assert [(p.line, p.param, p.code) for p in report.problems] == [
        (2, "margin", "invalid_type"),
        (4, "margin", "out_of_range"),
    ]
    assert report.row_count == 1


def test_the_trainer_gets_each_rows_margin_from_the_stored_rows(tiny_base: FrozenBase) -> None:
    """The worker's path: the stored blob decoded (``codec.decode_rows``) and handed to the
    Trainer as rows; a row's margin wins over the job's ``margin``."""
    data = (
        b'{"prompt": "p", "chosen": "a good answer", "rejected": "a bad one", "margin": 2.5}\n'
        b'{"chosen": "yes it is", "rejected": "no it is not"}\n'
        b"\n"
    )
    stored = codec.encode_rows(parse_file(data, PREF, JSONL).rows)
    rows: list[dict[str, Any]] = codec.decode_rows(stored)
    hyper = {"validation_fraction": 0, "margin": 0.5, "n_epochs": 1}
    inputs = prepare_inputs({"task": "reward"}, rows, None, parse_training_config(hyper))
    assert [e.margin for e in inputs.train if isinstance(e, PreferenceExample)] == [2.5, None]
    trainer = Trainer(tiny_base, {"type": "lora"}, {"task": "reward"}, rows, None, hyper)
    trainer.setup()
    assert trainer.train_data.margins is not None
    assert trainer.train_data.margins.tolist() == [2.5, 0.5]
