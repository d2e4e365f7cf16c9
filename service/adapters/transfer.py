"""Adapter export and import: stored rows ⇄ PEFT folders or loraplex's own archive format.

Blocking and torch-bound (core is imported inside the functions): call from a thread. Every
refusal is a :class:`TransferError` carrying the ``code`` and ``param`` of a 422.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.adapters.archive import (
    LORAPLEX_CONFIG_FILE,
    LORAPLEX_WEIGHTS_FILE,
    PEFT_METHODS,
    archive_format,
)
from service.adapters.store import adapter_from_row
from service.datasets.rows import Limits
from service.db.models import AdapterRow
from service.errors import ServiceError
from service.jsonstream import is_unicode

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase
    from core.heads import HeadConfig


class TransferError(ServiceError):
    default_code = "invalid_adapter"
    default_param = "file"


@dataclass(frozen=True)
class HeadSpec:
    """The head an imported PEFT adapter gets when its archive carries none (form fields)."""

    task: str
    label_names: list[str]
    text_pair: bool = False


# An imported head's labels are held to what a dataset here may train: as many and as long
# (every /predict returns one score per label, and the row keeps them all).
_LABEL_LIMITS = Limits()
# A loraplex archive's metrics as the trainer writes them: scalars (finite numbers, booleans,
# null, a short text such as imported_from) and a classifier's per-class table of six numbers
# a label (metrics -> val_per_class -> label -> f1: three objects deep). The bounds leave room
# for that table at the most labels, each of the longest name, and refuse more: every GET of
# the adapter returns them.
_METRICS_DEPTH = 3
_METRICS_ENTRIES = 8 * _LABEL_LIMITS.max_labels
_METRICS_CHARS = 2 * _LABEL_LIMITS.max_labels * _LABEL_LIMITS.max_label_chars


def _format_error_code(message: str) -> str:
    # core raises one AdapterFormatError type; its base checks say "the loaded <base>" and its
    # shape checks "does not fit base". Only the code is refined: the message is core's.
    if "the loaded" in message or "does not fit base" in message:
        return "base_model_mismatch"
    return "invalid_adapter"


# --- export ----------------------------------------------------------------------------------


def default_export_format(row: AdapterRow, base: FrozenBase | DecoderBase | None) -> str:
    """``peft`` where PEFT has a layout for ``row`` on its ``base`` (loaded by the caller for
    the PEFT methods only, else None), ``loraplex`` otherwise."""
    if base is None:
        return "loraplex"
    from core.io.peft import peft_export_refusal

    return "peft" if peft_export_refusal(row.method, base) is None else "loraplex"


def export_files(
    row: AdapterRow, fmt: str, base: FrozenBase | DecoderBase | None
) -> dict[str, bytes]:
    """The files of ``row`` in ``fmt`` (``peft`` needs the adapter's own base, loaded;
    ``loraplex`` not)."""
    if fmt == "loraplex":
        return {
            LORAPLEX_CONFIG_FILE: json.dumps(row.config, indent=2, sort_keys=True).encode(),
            LORAPLEX_WEIGHTS_FILE: row.weights,
        }
    if row.method not in PEFT_METHODS:
        raise TransferError(
            f"method {row.method!r} has no PEFT format (PEFT has {' and '.join(PEFT_METHODS)}); "
            "export it with format=loraplex",
            code="no_peft_format",
            param="format",
        )
    assert base is not None
    from core.errors import CoreError
    from core.io.peft import export_peft, peft_export_refusal

    refusal = peft_export_refusal(row.method, base)
    if refusal is not None:
        raise TransferError(
            f"{refusal}; export it with format=loraplex", code="no_peft_format", param="format"
        )
    try:
        return export_peft(adapter_from_row(row), base)
    except CoreError as exc:
        raise TransferError(str(exc), code=_format_error_code(str(exc)), param="name") from None


# --- import ----------------------------------------------------------------------------------


def _check_labels(labels: list[str], param: str) -> None:
    """Label names within a dataset's limits, storable; ``param`` names where they came from."""
    limits = _LABEL_LIMITS
    if len(labels) > limits.max_labels:
        raise TransferError(
            f"{len(labels)} label names; at most {limits.max_labels} are supported",
            code="too_many_labels",
            param=param,
        )
    for i, label in enumerate(labels):
        # As a dataset's labels are read (service.datasets.rows): stripped, never empty.
        if not label.strip():
            raise TransferError(f"label name {i} is empty", code="empty_field", param=param)
        if label != label.strip():
            raise TransferError(
                f"label name {i} ({label!r}) has spaces around it; a dataset's labels have none",
                code="invalid_value",
                param=param,
            )
        if len(label) > limits.max_label_chars:
            raise TransferError(
                f"label name {i} is longer than {limits.max_label_chars} characters",
                code="field_too_long",
                param=param,
            )
        if not is_unicode(label):
            raise TransferError(
                f"label name {i} is not valid Unicode (a lone surrogate)",
                code="invalid_unicode",
                param=param,
            )


def _check_metrics(metrics: dict[str, Any]) -> None:
    """An archive's metrics within the bounds above (see ``_METRICS_DEPTH``), numbers finite
    (PostgreSQL's JSON has no NaN)."""
    entries = chars = 0

    def text(value: str, where: str) -> None:
        nonlocal chars
        chars += len(value)
        if len(value) > _LABEL_LIMITS.max_label_chars:
            raise TransferError(
                f"{LORAPLEX_CONFIG_FILE}: {where} is longer than "
                f"{_LABEL_LIMITS.max_label_chars} characters"
            )

    def walk(obj: dict[str, Any], path: str, depth: int) -> None:
        nonlocal entries
        if depth > _METRICS_DEPTH:
            raise TransferError(
                f"{LORAPLEX_CONFIG_FILE}: {path} nests objects more than {_METRICS_DEPTH} deep"
            )
        for key, value in obj.items():
            entries += 1
            text(key, f"a key of {path}")
            where = f"{path}.{key[:64]}"
            if isinstance(value, dict):
                walk(value, where, depth + 1)
            elif isinstance(value, str):
                text(value, where)
            elif isinstance(value, float) and not math.isfinite(value):
                raise TransferError(f"{LORAPLEX_CONFIG_FILE}: {where} must be a finite number")
            elif isinstance(value, int) and not -(2**63) <= value < 2**63:
                raise TransferError(f"{LORAPLEX_CONFIG_FILE}: {where} must be a 64-bit integer")
            elif not (value is None or isinstance(value, int | float)):
                raise TransferError(
                    f"{LORAPLEX_CONFIG_FILE}: {where} must be a number, true, false, null, "
                    "text or an object"
                )

    walk(metrics, "metrics", 1)
    if entries > _METRICS_ENTRIES or chars > _METRICS_CHARS:
        raise TransferError(
            f"{LORAPLEX_CONFIG_FILE}: metrics hold more than {_METRICS_ENTRIES} entries or "
            f"{_METRICS_CHARS} characters of names and text"
        )


def _check_metadata(adapter: Adapter) -> None:
    """What an archive says besides its weights (an export's own head, its metrics) held to
    what this service writes itself: the row keeps it and every GET returns it."""
    _check_labels(adapter.head.label_names, "file")
    _check_metrics(adapter.metrics)
    if not is_unicode(json.dumps(adapter.config_dict(), ensure_ascii=False)):
        raise TransferError(
            "the archive's config holds text that is not valid Unicode (a lone surrogate)",
            code="invalid_unicode",
        )


def _head_config(spec: HeadSpec, base: FrozenBase | DecoderBase) -> HeadConfig:
    """The head ``spec`` asks for, as it runs on ``base``'s kind."""
    from pydantic import ValidationError

    from core.adapter import base_kind_of
    from core.heads import LANGUAGE_MODEL_TASKS, HeadConfig

    decoder = base_kind_of(base) == "decoder"
    if spec.task in LANGUAGE_MODEL_TASKS:
        if not decoder:
            raise TransferError(
                f"task {spec.task!r} is a decoder's adapter (the base's own language-model "
                "head): send model naming the decoder base",
                code="invalid_head",
                param="task",
            )
        if spec.label_names or spec.text_pair:
            raise TransferError(
                f"a {spec.task} adapter has no head of its own: leave label_names and "
                "text_pair out",
                code="invalid_head",
                param="label_names" if spec.label_names else "text_pair",
            )
    _check_labels(spec.label_names, "label_names")
    # A decoder's heads read the last real token's state, the only pooling there (as
    # training gives them); an encoder's new head keeps the base's own pooling.
    pooling = "last_token" if decoder and spec.task not in LANGUAGE_MODEL_TASKS else "base"
    try:
        return HeadConfig(
            task=spec.task,  # type: ignore[arg-type]
            label_names=spec.label_names,
            text_pair=spec.text_pair,
            pooling=pooling,
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        param = loc[0] if loc else "label_names"  # model-level checks are about the labels
        raise TransferError(
            f"{param}: {str(err['msg']).removeprefix('Value error, ')}",
            code="invalid_head",
            param=param,
        ) from None


def _peft_carries_head(files: dict[str, bytes]) -> bool:
    """Whether a PEFT folder is a loraplex export (our head config and head weights); True
    where it is no PEFT folder at all (a file missing, a config that is no JSON object), for
    core to name what is wrong rather than ask for a head."""
    from core.io.peft import CONFIG_FILE, EXTRA_KEY, HEAD_FILE, WEIGHTS_FILE

    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        return True
    try:
        cfg = json.loads(files[CONFIG_FILE])
    except (ValueError, UnicodeDecodeError):
        return True
    if not isinstance(cfg, dict):
        return True
    extra = cfg.get(EXTRA_KEY)
    return HEAD_FILE in files and isinstance(extra, dict) and extra.get("head") is not None


def _import_loraplex(
    files: dict[str, bytes], base: FrozenBase | DecoderBase, head: HeadConfig | None
) -> Adapter:
    from core.io.peft import check_servable
    from core.io.serialization import adapter_from_bytes

    if LORAPLEX_WEIGHTS_FILE not in files:
        raise TransferError(f"{LORAPLEX_WEIGHTS_FILE} is missing from the archive")
    try:
        config: Any = json.loads(files[LORAPLEX_CONFIG_FILE])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TransferError(f"{LORAPLEX_CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise TransferError(f"{LORAPLEX_CONFIG_FILE} must hold a JSON object")
    adapter = adapter_from_bytes(config, files[LORAPLEX_WEIGHTS_FILE])
    _check_metadata(adapter)  # before building it: prompt tuning tokenizes its init_text
    if head is not None and head != adapter.head:
        raise TransferError(
            "a loraplex export carries its trained head; leave task and label_names out "
            "(they are for PEFT adapters without one)",
            code="head_not_allowed",
            param="task",
        )
    adapter.check_base(base)
    check_servable(adapter, base)
    # The row records the base the adapter was checked against, as a PEFT import's does: the
    # archive's base_name is free text (its fingerprint, where it has one, has matched).
    adapter.base_name, adapter.base_fingerprint = base.name, base.fingerprint
    adapter.metrics = {**adapter.metrics, "imported_from": "loraplex"}
    return adapter


def recorded_base(files: dict[str, bytes]) -> str | None:
    """The base an archive says it was made on (a loraplex export's ``base_name``, a PEFT
    config's ``base_model_name_or_path``), or None where it says none readably. A claim
    only, to pick the base it is checked against: the check itself is the import's."""
    name = LORAPLEX_CONFIG_FILE if LORAPLEX_CONFIG_FILE in files else "adapter_config.json"
    try:
        config = json.loads(files.get(name, b""))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None  # the import names what is wrong with it
    key = "base_name" if name == LORAPLEX_CONFIG_FILE else "base_model_name_or_path"
    value = config.get(key) if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def import_files(
    files: dict[str, bytes], base: FrozenBase | DecoderBase, head: HeadSpec | None = None
) -> Adapter:
    """A core ``Adapter`` for ``base`` from an archive's files (see ``read_archive``)."""
    from core.adapter import base_kind_of
    from core.errors import CoreError
    from core.io.peft import import_peft

    fmt = archive_format(files)
    head_cfg = _head_config(head, base) if head is not None else None
    try:
        if fmt == "loraplex":
            return _import_loraplex(files, base, head_cfg)
        # Without a head, a decoder's LoRA is a chat adapter (import_peft); an encoder's
        # adapter needs one to predict anything.
        encoder = base_kind_of(base) == "encoder"
        if head_cfg is None and encoder and not _peft_carries_head(files):
            raise TransferError(
                "this PEFT adapter has no loraplex head: send task (classification or "
                "reward) and, for classification, label_names; a decoder's LoRA imports as "
                "a chat adapter with model naming the decoder base",
                code="head_required",
                param="task",
            )
        adapter = import_peft(files, base, head_cfg)
        _check_metadata(adapter)  # the head of our own export, labels and all
        return adapter
    except CoreError as exc:
        raise TransferError(str(exc), code=_format_error_code(str(exc))) from None
    except RecursionError:  # json.loads on a config nested thousands of levels deep
        raise TransferError(
            "A JSON file in the archive is nested too deeply.", code="invalid_value"
        ) from None
