"""What a job's run writes about itself, as values: the plan's one-sentence summary, the torch
thread budget, validation metrics as flat ``val_*`` scalars, a checkpoint's metrics under
OpenAI's names, and JSON the database accepts.
Pure functions, kept apart from the run's flow in ``job_run.py``."""

from __future__ import annotations

import math
from typing import Any


def plan_summary(r: dict[str, Any]) -> str:
    """One sentence on what a run will do, from its resolved hyperparameters."""
    if r["validation"] == "held_out":
        rows = r["train_examples"] + r["held_out_examples"]
        split = (
            f"{rows} training rows, {r['held_out_examples']} of them held out for validation "
            f"(validation_fraction={r['validation_fraction']}; pass a validation_file or "
            "validation_fraction=0 to train on all)"
        )
    elif r["validation"] == "validation_set":
        split = f"{r['train_examples']} rows, validating on {r['val_examples']} rows"
    else:
        split = f"{r['train_examples']} rows, without validation"
    return (
        f"{split}; {r['total_steps']} steps ({r['n_epochs']} epochs of "
        f"{r['steps_per_epoch']}), batch_size {r['batch_size']}, "
        f"learning_rate {r['learning_rate']:.3g}, {r['warmup_steps']} warm-up steps"
    )


def pair_summary(pairs: dict[str, int] | None) -> str:
    """What encoding did to a preference dataset's pairs, as the end of the plan's sentence;
    empty for classification. Identical pairs teach nothing and count as ties: worth a word."""
    if pairs is None:
        return ""
    out = f"; {pairs['split_rows']} pairs split at their shared dialogue"
    n = pairs["identical_pairs"]
    if n:
        out += (
            f"; {n} pairs are the same input once tokenized and truncated (they teach "
            "nothing; their texts differ only in case, spacing or past max_seq_length)"
        )
    return out


def torch_threads() -> int:
    """The torch thread budget this worker trains with (``train_threads``), for the events."""
    import torch

    return int(torch.get_num_threads())


def json_safe(value: Any) -> Any:
    """NaN/inf are not JSON; PostgreSQL's json type rejects them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def val_metrics(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Flat ``val_*`` scalars of an evaluation (per-class tables stay in the final metrics)."""
    if not raw:
        return {}
    out: dict[str, Any] = {}
    for k, v in raw.items():
        if isinstance(v, int | float):
            out[k if k.startswith("val_") else f"val_{k}"] = v
    return out


def checkpoint_metrics(raw: dict[str, Any], step: int, task: str) -> dict[str, Any]:
    """A checkpoint's metrics (``raw``: the trainer's ``train_loss`` and its last validation,
    if any) under the names of OpenAI's checkpoint ``metrics``, where the values exist:
    ``step``, ``train_loss`` (the epoch's running mean, as in the job's final metrics),
    ``valid_loss`` and ``full_valid_loss`` (every validation here scores the whole set, so
    both are the same number) and a chat run's ``valid_`` / ``full_valid_mean_token_accuracy``
    (its validation accuracy is per token). The validation's ``val_*`` scalars, loraplex's
    names, stay beside them (``val_accuracy``, ``val_macro_f1``, ...)."""
    out: dict[str, Any] = {"step": float(step)}  # OpenAI's is a number, as in chat events
    train_loss = raw.get("train_loss")
    if isinstance(train_loss, int | float):
        out["train_loss"] = train_loss
    val = val_metrics({k: v for k, v in raw.items() if k != "train_loss"})
    if "val_loss" in val:
        for prefix in ("valid", "full_valid"):
            out[f"{prefix}_loss"] = val["val_loss"]
            if task == "chat" and "val_accuracy" in val:
                out[f"{prefix}_mean_token_accuracy"] = val["val_accuracy"]
    return {**out, **val}
