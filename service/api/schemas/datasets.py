"""Dataset request and response bodies."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import CREATED_AT
from service.datasets.reading import DatasetFormat, DatasetName
from service.datasets.rows import DatasetError, DatasetKind
from service.datasets.validation import DatasetReport
from service.db.models import Dataset
from service.db.types import to_unix

KIND = (
    "`classification`: rows of `text`, `label` and optional `text_pair`; `preference`: rows "
    "of `chosen`, `rejected`, optional `prompt` and optional `margin` (a number within ±1000 "
    "that overrides the job's; trains a reward model); `chat`: OpenAI "
    "chat rows of `messages` (chat SFT on a decoder base); `dpo`: OpenAI DPO rows of `input`, "
    "`preferred_output` and `non_preferred_output` (DPO on a decoder base)."
)
LABEL_COUNTS = "Rows per label, sorted by label; null for the other kinds."


class PairReport(BaseModel):
    """What training will make of a preference dataset's pairs (counted at upload)."""

    split_rows: int = Field(
        description="Rows without a `prompt` whose `chosen` and `rejected` are one dialogue up "
        "to a turn boundary (`\\n\\nHuman:` / `\\n\\nAssistant:`, as in HH-RLHF): training "
        "uses the shared dialogue as the prompt and what follows as the two responses, unless "
        "the job sets `split_shared_prefix=false`."
    )
    identical_pairs: int = Field(
        description="Rows whose two responses differ only in case, accents or spacing, which "
        "the base model's uncased tokenizer does not see: they become one input and teach "
        "nothing. Pairs that differ only past `max_seq_length` are counted in the job's first "
        "event."
    )


PAIR_REPORT = "Preference data: what training will make of the pairs; null for the other kinds."


class DatasetCreateJSON(BaseModel):
    """The JSON form of a dataset upload; files go as multipart instead."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "kind": "classification",
                    "name": "reviews",
                    "records": [
                        {"text": "A delight from start to finish.", "label": "fresh"},
                        {"text": "Two hours I will never get back.", "label": "rotten"},
                    ],
                }
            ]
        },
    )

    kind: DatasetKind = Field(description=KIND)
    name: DatasetName | None = Field(default=None, description="A name to show; default: the id.")
    # Items are checked one by one by service.datasets.rows, which names the index.
    records: list[Any] = Field(
        description="The rows, one object each, at most `LORAPLEX_MAX_DATASET_ROWS` (200,000 by "
        "default): reading stops at the first past it (422 `too_many_rows`). Fields other than "
        "the kind's are dropped."
    )


class DatasetObject(BaseModel):
    """A stored, validated dataset."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "file-6f1c0e9a2b4d8c3e5a7f9b1d",
                    "object": "dataset",
                    "kind": "classification",
                    "name": "reviews.jsonl",
                    "row_count": 200,
                    "label_counts": {"fresh": 104, "rotten": 96},
                    "bytes": 24576,
                    "created_at": 1764950400,
                }
            ]
        }
    )

    id: str = Field(description="The dataset's id; the same id is its `/v1/files` id.")
    object: Literal["dataset"] = Field("dataset", description="Always `dataset`.")
    kind: DatasetKind = Field(description=KIND)
    name: str = Field(description="The name given at upload, else the file's name, else the id.")
    row_count: int = Field(description="Number of rows stored.")
    label_counts: dict[str, int] | None = Field(description=LABEL_COUNTS)
    pair_report: PairReport | None = Field(None, description=PAIR_REPORT)
    bytes: int = Field(description="Size of the upload as received, in bytes.")
    created_at: int = Field(description=CREATED_AT)

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetObject:
        return cls(
            id=row.id,
            kind=DatasetKind(row.kind),
            name=row.name,
            row_count=row.row_count,
            label_counts=row.label_counts,
            pair_report=PairReport(**row.pair_report) if row.pair_report else None,
            bytes=row.bytes,
            created_at=to_unix(row.created_at) or 0,
        )


class DatasetProblem(BaseModel):
    """One problem found by a dry run, as the upload would have answered it."""

    message: str = Field(
        description="What is wrong and where: `line N: ...` for files, `records[i]: ...` for "
        "JSON records."
    )
    line: int | None = Field(
        description="The line of the file at fault; null for JSON records and for problems "
        "of the whole dataset (too few classes, no rows)."
    )
    param: str | None = Field(
        description="The field at fault: a column such as `label`, `file` for the file as a "
        "whole, or a path such as `records.3.label`."
    )
    code: str | None = Field(
        description="Machine-readable reason, e.g. `missing_field`, `invalid_json`, "
        "`single_class`: the `code` the upload's 422 would carry."
    )


class DatasetValidation(BaseModel):
    """The result of a dry run: every problem the upload would be refused for (up to a bound),
    or the summary of the dataset it would store."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "object": "dataset.validation",
                    "valid": False,
                    "kind": "classification",
                    "format": "jsonl",
                    "row_count": 2,
                    "label_counts": {"fresh": 1, "rotten": 1},
                    "errors": [
                        {
                            "message": "line 2: invalid JSON (Expecting property name enclosed "
                            "in double quotes at column 2)",
                            "line": 2,
                            "param": "file",
                            "code": "invalid_json",
                        },
                        {
                            "message": "line 5: missing required field 'label'",
                            "line": 5,
                            "param": "label",
                            "code": "missing_field",
                        },
                    ],
                    "truncated": False,
                },
                {
                    "object": "dataset.validation",
                    "valid": True,
                    "kind": "classification",
                    "format": "csv",
                    "row_count": 200,
                    "label_counts": {"fresh": 104, "rotten": 96},
                    "errors": [],
                    "truncated": False,
                },
            ]
        }
    )

    object: Literal["dataset.validation"] = Field(
        "dataset.validation", description="Always `dataset.validation`."
    )
    valid: bool = Field(description="Whether the upload would be accepted as it is.")
    kind: DatasetKind | None = Field(
        description=f"The kind checked against: the one sent, else the one the first row "
        f"calls for; null when it could not be told. {KIND}"
    )
    format: DatasetFormat | None = Field(
        description="How the file was read (`jsonl` or `csv`); null for JSON records."
    )
    row_count: int = Field(
        description="Rows that passed: all the rows when `valid`, else those checked before "
        "reading stopped."
    )
    label_counts: dict[str, int] | None = Field(
        description="Rows per label among the rows that passed, sorted by label; null for "
        "preference data."
    )
    pair_report: PairReport | None = Field(
        None, description=f"{PAIR_REPORT} Of the rows that passed."
    )
    errors: list[DatasetProblem] = Field(
        description="Every problem found, in file order; empty when `valid`."
    )
    truncated: bool = Field(
        description="Checking stopped at the bound on listed problems: fix these and check "
        "again, more may follow."
    )

    @classmethod
    def from_report(cls, report: DatasetReport, fmt: DatasetFormat | None) -> DatasetValidation:
        return cls(
            valid=report.valid,
            kind=report.kind,
            format=fmt,
            row_count=report.row_count,
            label_counts=report.label_counts,
            pair_report=PairReport(**report.pair_report) if report.pair_report else None,
            errors=[_problem(e) for e in report.problems],
            truncated=report.truncated,
        )

    @classmethod
    def refused(
        cls, error: DatasetError, kind: DatasetKind | None, fmt: DatasetFormat | None
    ) -> DatasetValidation:
        """A dataset that could not be checked at all (e.g. its kind cannot be told)."""
        return cls(
            valid=False,
            kind=kind,
            format=fmt,
            row_count=0,
            label_counts=None,
            errors=[_problem(error)],
            truncated=False,
        )


def _problem(error: DatasetError) -> DatasetProblem:
    return DatasetProblem(
        message=error.message, line=error.line, param=error.param, code=error.code
    )
