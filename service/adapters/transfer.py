"""Adapter export and import: stored rows ⇄ PEFT folders or loraplex's own archive format.

Blocking and torch-bound (core is imported inside the functions): call from a thread. Every
refusal is a :class:`TransferError` carrying the ``code`` and ``param`` of a 422.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service.adapters.archive import (
    LORAPLEX_CONFIG_FILE,
    LORAPLEX_WEIGHTS_FILE,
    PEFT_METHODS,
    archive_format,
)
from service.adapters.store import adapter_from_row
from service.db.models import AdapterRow
from service.errors import ServiceError

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


def _format_error_code(message: str) -> str:
    # core raises one AdapterFormatError type; its base checks say "the loaded <base>" and its
    # shape checks "does not fit base". Only the code is refined: the message is core's.
    if "the loaded" in message or "does not fit base" in message:
        return "base_model_mismatch"
    return "invalid_adapter"


# --- export ----------------------------------------------------------------------------------


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
    from core.io.peft import export_peft

    try:
        return export_peft(adapter_from_row(row), base)
    except CoreError as exc:
        raise TransferError(str(exc), code=_format_error_code(str(exc)), param="name") from None


# --- import ----------------------------------------------------------------------------------


def _head_config(spec: HeadSpec) -> HeadConfig:
    from pydantic import ValidationError

    from core.heads import HeadConfig

    try:
        return HeadConfig(task=spec.task, label_names=spec.label_names, text_pair=spec.text_pair)  # type: ignore[arg-type]
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
    """Whether a PEFT folder is a loraplex export (our head config and head weights)."""
    from core.io.peft import CONFIG_FILE, EXTRA_KEY, HEAD_FILE

    try:
        cfg = json.loads(files[CONFIG_FILE])
    except (ValueError, UnicodeDecodeError):
        return True  # let core report the broken JSON precisely
    extra = cfg.get(EXTRA_KEY) if isinstance(cfg, dict) else None
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
    if head is not None and head != adapter.head:
        raise TransferError(
            "a loraplex export carries its trained head; leave task and label_names out "
            "(they are for PEFT adapters without one)",
            code="head_not_allowed",
            param="task",
        )
    adapter.check_base(base)
    check_servable(adapter, base)
    adapter.metrics = {**adapter.metrics, "imported_from": "loraplex"}
    return adapter


def import_files(
    files: dict[str, bytes], base: FrozenBase | DecoderBase, head: HeadSpec | None = None
) -> Adapter:
    """A core ``Adapter`` for ``base`` from an archive's files (see ``read_archive``)."""
    from core.errors import CoreError
    from core.io.peft import import_peft

    fmt = archive_format(files)
    head_cfg = _head_config(head) if head is not None else None
    try:
        if fmt == "loraplex":
            return _import_loraplex(files, base, head_cfg)
        if head_cfg is None and not _peft_carries_head(files):
            raise TransferError(
                "this PEFT adapter has no loraplex head: send task (classification or "
                "reward) and, for classification, label_names",
                code="head_required",
                param="task",
            )
        return import_peft(files, base, head_cfg)
    except CoreError as exc:
        raise TransferError(str(exc), code=_format_error_code(str(exc))) from None
    except RecursionError:  # json.loads on a config nested thousands of levels deep
        raise TransferError(
            "A JSON file in the archive is nested too deeply.", code="invalid_value"
        ) from None
