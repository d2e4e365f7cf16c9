"""A training checkpoint served as an adapter (core.training.checkpoint.adapter_from_checkpoint):
the adapter its job would have returned had it stopped at the checkpoint's step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.errors import AdapterFormatError
from core.training.checkpoint import (
    CheckpointError,
    adapter_from_checkpoint,
    pack,
    read_meta,
    unpack,
)
from core.training.trainer import ProgressEvent, Trainer, TrainerCallbacks, TrainResult
from tests.core.training.conftest import preference_rows, sentiment_rows
from tests.core.util import TEXTS

# No validation and no averaging of a reward model's epochs: the trainer's result is its last
# weights, those of the final checkpoint.
CFG = {
    "n_epochs": 2,
    "batch_size": 16,
    "learning_rate": 3e-2,
    "validation_fraction": 0.0,
    "average_epochs": False,
}


def train_with_final_checkpoint(
    trainer_cls: type[Trainer], base: Any, *args: Any, **kwargs: Any
) -> tuple[TrainResult, bytes]:
    """Train to the end; the checkpoint the trainer saves after its last step (its callback
    on_checkpoint saves none there: a finished job has its adapter)."""
    saved: list[bytes] = []

    def at_end(event: ProgressEvent) -> None:
        if event.step == event.total_steps:
            saved.append(trainer.save_checkpoint())

    trainer = trainer_cls(base, *args, callbacks=TrainerCallbacks(on_progress=at_end), **kwargs)
    result = trainer.train()
    (data,) = saved
    return result, data


def assert_same_adapter(a: Adapter, b: Adapter) -> None:
    """Configs, base and every tensor identical."""
    assert a.config_dict() | {"metrics": None} == b.config_dict() | {"metrics": None}
    for x, y in ((a.method_state, b.method_state), (a.head_state, b.head_state)):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


def encoder_outputs(adapter: Adapter, base: FrozenBase, pairs: bool) -> torch.Tensor:
    model = adapter.build(base)
    window = adapter.head.window(base.max_length - adapter.method.reserved_positions)
    batch = base.tokenize(TEXTS, TEXTS[::-1] if pairs else None, max_length=window)
    with torch.inference_mode():
        return model(batch)


@pytest.mark.parametrize(
    "method",
    [
        {"type": "lora", "r": 4},
        {"type": "adapter"},
        {"type": "prompt_tuning", "n_virtual_tokens": 4},
        {"type": "feature_extraction"},
        {"type": "full"},
        {"type": "scratch"},
    ],
)
@pytest.mark.parametrize("task", ["classification", "reward"])
def test_final_checkpoint_is_the_trained_adapter(
    tiny_base: FrozenBase, method: dict[str, Any], task: str
) -> None:
    rows = sentiment_rows(40) if task == "classification" else preference_rows(24)
    result, data = train_with_final_checkpoint(
        Trainer, tiny_base, method, {"task": task}, rows, None, CFG
    )
    adapter = adapter_from_checkpoint(data, tiny_base)
    assert_same_adapter(adapter, result.adapter)
    assert adapter.metrics == {"steps": result.steps}
    # Method and head on the base: the same numbers.
    pairs = task == "reward"
    expected = encoder_outputs(result.adapter, tiny_base, pairs)
    assert torch.equal(encoder_outputs(adapter, tiny_base, pairs), expected)


def test_a_checkpoint_is_its_step_s_weights_not_the_best_so_far(tiny_base: FrozenBase) -> None:
    """With validation the result is the best step's weights; a checkpoint is its own step's,
    with that step's last validation as its metrics."""
    rows, val = sentiment_rows(40), sentiment_rows(12, seed=1)
    cfg = {**CFG, "n_epochs": 3, "learning_rate": 0.5, "checkpoint_every_steps": 1,
           "eval_every_steps": 1}  # fmt: skip
    saved: dict[int, bytes] = {}
    cb = TrainerCallbacks(on_checkpoint=lambda data, step, *_: saved.setdefault(step, data))
    trainer = Trainer(tiny_base, {"type": "lora"}, {"task": "classification"}, rows, val, cfg, cb)
    result = trainer.train()
    step = next(s for s in sorted(saved) if s != result.best_step)
    adapter = adapter_from_checkpoint(saved[step], tiny_base)
    assert adapter.metrics["steps"] == step
    meta = read_meta(saved[step])
    assert adapter.metrics["val_loss"] == meta["state"]["last_val"]["loss"]
    # Resumed there and stopped at once, the trainer returns exactly these weights.
    assert not torch.equal(
        encoder_outputs(adapter, tiny_base, False),
        encoder_outputs(result.adapter, tiny_base, False),
    )
    resumed = Trainer.resume(saved[step], tiny_base, rows, val)
    assert_same_adapter(adapter, resumed._make_adapter({}))


def test_a_checkpoint_is_refused_on_another_base_and_when_malformed(
    tiny_base: FrozenBase,
) -> None:
    _, data = train_with_final_checkpoint(
        Trainer, tiny_base, {"type": "lora"}, {"task": "classification"}, sentiment_rows(16),
        None, {**CFG, "max_steps": 1},
    )  # fmt: skip
    meta, tensors = unpack(data)
    other = {**meta, "identity": {**meta["identity"], "base_fingerprint": "0" * 64}}
    with pytest.raises(AdapterFormatError, match="not on the loaded"):
        adapter_from_checkpoint(pack(other, tensors), tiny_base)
    # Saved before checkpoints recorded their adapter's head: not servable.
    older = {k: v for k, v in meta.items() if k != "adapter"}
    with pytest.raises(CheckpointError, match="does not describe its adapter"):
        adapter_from_checkpoint(pack(older, tensors), tiny_base)
    wrong = {k: v for k, v in tensors.items() if not k.endswith("lora_A.0")}
    with pytest.raises(CheckpointError, match="do not fit"):
        adapter_from_checkpoint(pack(meta, wrong), tiny_base)
    with pytest.raises(CheckpointError):
        adapter_from_checkpoint(data[:100], tiny_base)
