"""A dataset row: the kinds, their fields and limits, and the checks that turn one record (a
JSON Lines object, a CSV row, an item of a JSON body) into a normalised row.

Every problem raises :class:`DatasetError` naming where it is (line number for files, record
index for JSON bodies) and which field (``param``), so the API can answer a precise 422.

Normalised rows:
- classification: ``{"text": str, "label": str}`` plus ``"text_pair": str`` when given;
  integer labels become strings, so ``1`` and ``"1"`` are one class.
- preference: ``{"chosen": str, "rejected": str}`` plus ``"prompt": str`` and ``"margin":
  float`` when given (a row's margin overrides the job's ``margin`` hyperparameter).
- chat and dpo: OpenAI's fine-tuning rows for a decoder base (``service.datasets.messages``).
Unknown fields (ids, metadata columns) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from core.training.config import MAX_ABS_MARGIN
from service.errors import ServiceError


class DatasetKind(StrEnum):
    CLASSIFICATION = "classification"
    PREFERENCE = "preference"
    CHAT = "chat"
    DPO = "dpo"


# The core task each kind of dataset trains: a classifier, or a reward model that learns from
# preference pairs (an encoder's heads); chat SFT or DPO (a decoder's language model).
TASKS: dict[DatasetKind, str] = {
    DatasetKind.CLASSIFICATION: "classification",
    DatasetKind.PREFERENCE: "reward",
    DatasetKind.CHAT: "chat",
    DatasetKind.DPO: "dpo",
}
# Kinds whose rows are OpenAI message lists: JSON only (no CSV), normalised by
# service.datasets.messages.
MESSAGE_KINDS: frozenset[DatasetKind] = frozenset({DatasetKind.CHAT, DatasetKind.DPO})


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
    # Messages in one chat row or one DPO input.
    max_messages: int = 256

    @property
    def max_record_chars(self) -> int:
        """The JSON text one record of a body may take: three texts (a preference row's) and
        a label, every character at its longest spelling (12: an escaped surrogate pair), and
        room for keys and for fields that are dropped. A chat or DPO row's contents share the
        same three texts' budget (their keys fit in the room left)."""
        return 12 * (3 * self.max_text_chars + self.max_label_chars) + 64 * 1024


REQUIRED_FIELDS: dict[DatasetKind, tuple[str, ...]] = {
    DatasetKind.CLASSIFICATION: ("text", "label"),
    DatasetKind.PREFERENCE: ("chosen", "rejected"),
    DatasetKind.CHAT: ("messages",),
    DatasetKind.DPO: ("input", "preferred_output", "non_preferred_output"),
}


# --- where a problem is --------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """A row of an uploaded file: messages say ``line N``, ``param`` is the bare field."""

    number: int

    def error(self, message: str, field: str | None, code: str) -> DatasetError:
        error = DatasetError(f"line {self.number}: {message}", param=field or "file", code=code)
        error.line = self.number
        return error


@dataclass(frozen=True)
class Record:
    """An item of a JSON body's ``records``: ``param`` is the dotted path to the field."""

    index: int

    def error(self, message: str, field: str | None, code: str) -> DatasetError:
        path = f"records.{self.index}" + (f".{field}" if field else "")
        return DatasetError(f"records[{self.index}]: {message}", param=path, code=code)


Where = Line | Record


class CsvRow(dict[str, str]):
    """A CSV row's cells by column name: every value is text, so a number field (a
    preference row's ``margin``) is read from its cell, which JSON would hold as a number."""


# --- row normalisation -----------------------------------------------------------------------


def type_name(value: Any) -> str:
    """A value's type as JSON names it, for messages about what was sent."""
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


def check_unicode(value: str, field: str, where: Where) -> None:
    """JSON's ``\\ud800`` escapes parse to lone surrogates, which no UTF-8 store can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise where.error(
            f"field '{field}' is not valid Unicode (a lone surrogate at character {exc.start})",
            field,
            "invalid_unicode",
        ) from None


def check_text(value: str, field: str, where: Where, limits: Limits) -> None:
    """A row's text ``field``: storable Unicode, at most ``limits.max_text_chars`` long."""
    check_unicode(value, field, where)
    if len(value) > limits.max_text_chars:
        raise where.error(
            f"field '{field}' is longer than {limits.max_text_chars} characters",
            field,
            "field_too_long",
        )


def _text(
    obj: Mapping[str, Any], field: str, where: Where, limits: Limits, *, required: bool
) -> str | None:
    value = obj.get(field)
    if value is None or (not required and value == ""):
        if required:
            raise where.error(f"missing required field '{field}'", field, "missing_field")
        return None
    if not isinstance(value, str):
        raise where.error(
            f"field '{field}' must be a string, got {type_name(value)}", field, "invalid_type"
        )
    if not value.strip():
        raise where.error(f"field '{field}' must not be empty", field, "empty_field")
    check_text(value, field, where, limits)
    return value


def _label(obj: Mapping[str, Any], where: Where, limits: Limits) -> str:
    value = obj.get("label")
    if value is None:
        raise where.error("missing required field 'label'", "label", "missing_field")
    # bool is an int subclass, but True is no class name anyone means. An integer is its
    # digits, held to the same length as any other label (JSON allows thousands of them).
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise where.error(
            f"field 'label' must be a string or an integer, got {type_name(value)}",
            "label",
            "invalid_type",
        )
    label = value.strip()
    if not label:
        raise where.error("field 'label' must not be empty", "label", "empty_field")
    check_unicode(label, "label", where)
    if len(label) > limits.max_label_chars:
        raise where.error(
            f"field 'label' is longer than {limits.max_label_chars} characters",
            "label",
            "field_too_long",
        )
    return label


def _margin(obj: Mapping[str, Any], where: Where) -> float | None:
    """A preference row's ``margin``: a finite number within ``MAX_ABS_MARGIN`` of 0, or None
    where it has none (an empty CSV cell is none)."""
    value = obj.get("margin")
    if isinstance(obj, CsvRow) and isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise where.error(
                f"field 'margin' must be a number, got {value.strip()[:32]!r}",
                "margin",
                "invalid_type",
            ) from None
    if value is None:
        return None
    # bool is an int subclass, but true is no margin anyone means.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise where.error(
            f"field 'margin' must be a number, got {type_name(value)}", "margin", "invalid_type"
        )
    # Compared before float(): a JSON integer may have thousands of digits. NaN compares
    # false, so it fails here too (a CSV cell "nan" parses as one).
    if not -MAX_ABS_MARGIN <= value <= MAX_ABS_MARGIN:
        # An integer may be past a float's range (JSON allows thousands of digits).
        big = isinstance(value, int) and abs(value) >= 10**15
        shown = f"an integer of {len(str(abs(value)))} digits" if big else f"{value:g}"
        raise where.error(
            f"field 'margin' must be a finite number from {-MAX_ABS_MARGIN:g} to "
            f"{MAX_ABS_MARGIN:g}, got {shown}",
            "margin",
            "out_of_range",
        )
    return float(value)


def normalize_row(
    kind: DatasetKind, obj: Mapping[str, Any], where: Where, limits: Limits
) -> dict[str, Any]:
    if kind is DatasetKind.CLASSIFICATION:
        text = _text(obj, "text", where, limits, required=True)
        assert text is not None
        row: dict[str, Any] = {"text": text, "label": _label(obj, where, limits)}
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
    margin = _margin(obj, where)
    if margin is not None:
        row["margin"] = margin
    return row
