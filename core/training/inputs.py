"""What a caller hands the trainer, made into typed configs and checked example lists.

Callers (the service worker, benchmarks, tests) pass configs as models or plain mappings and
rows as example objects or dicts. Everything here runs before a weight is built and raises
:class:`ConfigError` naming the field or :class:`DataError` naming the row, so a bad job fails
at once with a message its submitter can act on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from core.errors import ConfigError, DataError
from core.heads import HeadConfig
from core.methods import MethodConfig, parse_method_config
from core.targets import BaseKind
from core.training.config import TrainingConfig, hold_out_required
from core.training.data import (
    ClassificationExample,
    Example,
    check_classes,
    check_labels,
    coerce_examples,
    has_pairs,
    infer_label_names,
    split_dialogues,
    split_validation,
)


def method_config_of(
    cfg: MethodConfig | Mapping[str, Any], base_kind: BaseKind = "encoder"
) -> MethodConfig:
    """``cfg`` itself, or the method config ``{"type": ..., **params}`` describes for a base
    of ``base_kind``."""
    if isinstance(cfg, MethodConfig):
        return cfg
    params = dict(cfg)
    method_type = params.pop("type", None)
    if not isinstance(method_type, str):
        raise ConfigError("type", "method config needs a 'type'")
    return parse_method_config(method_type, params, base_kind)


@dataclass(frozen=True)
class Inputs:
    """The head config and examples a run trains on, checked against each other."""

    head: HeadConfig
    train: list[Example]
    val: list[Example] | None  # None: the run has no validation
    held_out: int  # training rows held out as ``val`` (0 when a validation set was given)
    # Preference rows (training and validation) whose shared dialogue became their prompt.
    split_rows: int = 0


def prepare_inputs(
    head_config: HeadConfig | Mapping[str, Any],
    train_rows: Sequence[Example | Mapping[str, Any]],
    val_rows: Sequence[Example | Mapping[str, Any]] | None,
    cfg: TrainingConfig,
) -> Inputs:
    """Coerce and check the rows, complete the head config from them, split off validation.

    ``head_config`` as a mapping may leave out ``label_names`` (then: the sorted distinct
    training labels), ``text_pair`` (then: whether any row carries a second text) and
    ``pooling`` (then: a reward head reads its response's tokens).
    ``val_rows`` None or empty: a seeded, stratified ``validation_fraction`` of the training
    rows is held out.
    """
    task = _task(head_config)
    train = coerce_examples(train_rows, task, "training")
    val = coerce_examples(val_rows, task, "validation") if val_rows else None
    split_rows = 0
    if task == "reward" and cfg.split_shared_prefix:
        train, n_train = split_dialogues(train)
        val, n_val = split_dialogues(val) if val is not None else (None, 0)
        split_rows = n_train + n_val
    head = _resolve_head(head_config, train, val)
    if task == "classification":
        check_labels(train, head.label_names, "training")
        check_classes(train)
    _check_pairs(head, train, "training")
    held_out = 0
    if val is None and cfg.validation_fraction > 0:
        train, held = split_validation(
            train, cfg.validation_fraction, cfg.seed, hold_out_required(cfg)
        )
        held_out, val = len(held), held or None
    elif val is not None:
        check_labels(val, head.label_names, "validation")
        _check_pairs(head, val, "validation")
    if task == "reward" and cfg.metric_for_best == "macro_f1":
        raise ConfigError("metric_for_best", "macro_f1 is a classification metric")
    return Inputs(head, train, val, held_out, split_rows)


def _task(head: HeadConfig | Mapping[str, Any]) -> str:
    task = head.task if isinstance(head, HeadConfig) else head.get("task")
    if task not in ("classification", "reward"):
        raise ConfigError("task", f"must be 'classification' or 'reward', not {task!r}")
    return str(task)


def _resolve_head(
    head: HeadConfig | Mapping[str, Any], train: list[Example], val: list[Example] | None
) -> HeadConfig:
    if isinstance(head, HeadConfig):
        return head
    params = dict(head)
    if params.get("task") == "classification" and not params.get("label_names"):
        check_classes(train)
        params["label_names"] = infer_label_names(train)
    if "text_pair" not in params:
        params["text_pair"] = has_pairs([*train, *(val or [])]) is not None
    if params.get("task") == "reward":
        params.setdefault("pooling", "response")  # see HeadConfig.pooling
    try:
        return HeadConfig(**params)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(str(err["loc"][0]) if err["loc"] else "head", err["msg"]) from None
    except TypeError as e:
        raise ConfigError("head", str(e)) from None


def _check_pairs(head: HeadConfig, examples: Sequence[Example], where: str) -> None:
    """Training must encode inputs as serving will: no second text unless the head says so."""
    if head.text_pair:
        return
    row = has_pairs(examples)
    if row is not None:
        fld = "text_pair" if isinstance(examples[row], ClassificationExample) else "prompt"
        raise DataError(
            f"{where} data: the head config has text_pair=false but this row has a {fld}",
            row,
            fld,
        )
