from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import pytest
import torch

from core.errors import Cancelled, ConfigError, DataError
from core.training.checkpoint import (
    MAGIC,
    CheckpointError,
    adapter_from_checkpoint,
    pack,
    unpack,
)
from core.training.data import coerce_examples, encode
from core.training.trainer import ProgressEvent, Trainer, TrainerCallbacks
from tests.core.training.conftest import preference_rows

CLS = {"task": "classification"}
FAST = {"n_epochs": 6, "batch_size": 16, "learning_rate": 3e-2}


def _base_digest(base) -> str:
    h = hashlib.sha256()
    for name, p in sorted(base.encoder.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _states_equal(a, b) -> bool:
    sa = {**a.method_state, **{f"h.{k}": v for k, v in a.head_state.items()}}
    sb = {**b.method_state, **{f"h.{k}": v for k, v in b.head_state.items()}}
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "lr"), [("lora", 3e-2), ("full", 3e-3), ("feature_extraction", 3e-2)]
)
def test_learns_easy_task(tiny_base, easy_rows, easy_val_rows, method: str, lr: float) -> None:
    events: list[ProgressEvent] = []
    evals: list[ProgressEvent] = []
    cb = TrainerCallbacks(on_progress=events.append, on_eval=evals.append)
    cfg = {**FAST, "learning_rate": lr}
    result = Trainer(tiny_base, {"type": method}, CLS, easy_rows, easy_val_rows, cfg, cb).train()
    first = sum(e.step_loss for e in events[:5]) / 5
    last = sum(e.step_loss for e in events[-5:]) / 5
    assert last < first - 0.05
    assert result.metrics["val_accuracy"] >= 0.7  # chance is 0.5
    assert [e.step for e in events] == list(range(1, result.steps + 1))
    assert result.steps == 6 * 8 and events[-1].total_steps == 48
    assert len(evals) == 6 and all(e.val_metrics is not None for e in evals)
    assert len(result.history) == 6
    assert result.adapter.head.label_names == ["neg", "pos"]
    assert result.adapter.metrics == result.metrics
    # The adapter reproduces the validation accuracy through the inference path.
    model = result.adapter.build(tiny_base)
    batch = tiny_base.tokenize([r["text"] for r in easy_val_rows], max_length=64)
    with torch.inference_mode():
        pred = model(batch).argmax(-1).tolist()
    acc = sum(
        model.head.config.label_names[p] == r["label"]
        for p, r in zip(pred, easy_val_rows, strict=True)
    ) / len(easy_val_rows)
    assert acc == pytest.approx(result.metrics["val_accuracy"])


def test_reward_model_learns(tiny_base) -> None:
    cfg = {
        "n_epochs": 4,
        "batch_size": 16,
        "learning_rate": 3e-2,
        "center_rewards_coefficient": 0.01,
    }
    result = Trainer(
        tiny_base,
        {"type": "lora"},
        {"task": "reward"},
        preference_rows(96),
        preference_rows(32, seed=1),
        cfg,
    ).train()
    m = result.metrics
    assert m["val_accuracy"] >= 0.8 and m["val_mean_margin"] > 0
    assert result.adapter.head.text_pair  # inferred: rows have prompts
    assert result.history[-1]["val"]["loss"] < result.history[0]["val"]["loss"]


def test_base_weights_never_change(tiny_base, easy_rows) -> None:
    before = _base_digest(tiny_base)
    for method in ("lora", "full", "adapter", "prompt_tuning"):
        Trainer(tiny_base, {"type": method}, CLS, easy_rows, None, {"n_epochs": 1}).train()
    assert _base_digest(tiny_base) == before


# --- determinism, checkpoints, resume --------------------------------------------------------


def _run(base, rows, val, cfg: dict[str, Any], cb: TrainerCallbacks | None = None):
    return Trainer(base, {"type": "lora", "dropout": 0.1}, CLS, rows, val, cfg, cb).train()


def test_same_seed_same_result(tiny_base, easy_rows) -> None:
    cfg = {"n_epochs": 2, "batch_size": 8, "learning_rate": 1e-2, "seed": 3}
    a = _run(tiny_base, easy_rows, None, cfg)
    torch.rand(10)  # global RNG use in between must not matter
    b = _run(tiny_base, easy_rows, None, cfg)
    c = _run(tiny_base, easy_rows, None, {**cfg, "seed": 4})
    assert _states_equal(a.adapter, b.adapter)
    assert a.history == [{**h, "elapsed": a.history[i]["elapsed"]} for i, h in enumerate(b.history)]
    assert not _states_equal(a.adapter, c.adapter)


def test_global_rng_left_alone(tiny_base, easy_rows) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _run(tiny_base, easy_rows[:40], None, {"n_epochs": 1, "batch_size": 8})
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize(
    ("extra", "cut"),
    [
        ({}, 4),  # mid-epoch (6 batches per epoch)
        ({}, 6),  # exactly at the epoch end
        ({"eval_every_steps": 3, "early_stopping_patience": 2, "lr_scheduler": "cosine"}, 9),
        ({"gradual_unfreezing": True}, 8),
    ],
)
def test_resume_equals_uninterrupted(tiny_base, easy_rows, extra: dict, cut: int) -> None:
    rows, val = easy_rows[:48], easy_rows[48:72]
    cfg = {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "checkpoint_every_steps": 1,
        **extra,
    }
    full = _run(tiny_base, rows, val, cfg)

    saved: dict[int, bytes] = {}
    cb = TrainerCallbacks(
        on_checkpoint=lambda data, step, epoch, metrics: saved.__setitem__(step, data),
        should_cancel=lambda: cut in saved,
    )
    with pytest.raises(Cancelled):
        _run(tiny_base, rows, val, cfg, cb)
    assert max(saved) == cut

    torch.rand(100)  # a different global RNG position must not matter either
    events: list[ProgressEvent] = []
    resumed = Trainer.resume(
        saved[cut], tiny_base, rows, val, callbacks=TrainerCallbacks(on_progress=events.append)
    )
    assert resumed.state.step == cut
    result = resumed.train()
    assert events[0].step == cut + 1
    assert _states_equal(full.adapter, result.adapter)
    assert result.best_step == full.best_step and result.steps == full.steps
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "elapsed"} for h in result.history] == strip
    # Tokens counted before the checkpoint are carried over, not counted again or lost.
    assert result.metrics["trained_tokens"] == full.metrics["trained_tokens"] > 0
    assert events[-1].trained_tokens == full.metrics["trained_tokens"]


def test_resume_full_finetune_with_layer_decay(tiny_base, easy_rows) -> None:
    rows, val = easy_rows[:40], easy_rows[40:60]
    cfg = {
        "n_epochs": 2,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "layerwise_lr_decay": 0.7,
        "checkpoint_every_steps": 3,
    }
    run = lambda cb=None: Trainer(tiny_base, {"type": "full"}, CLS, rows, val, cfg, cb).train()  # noqa: E731
    full = run()
    saved: list[bytes] = []
    with pytest.raises(Cancelled):
        run(
            TrainerCallbacks(
                on_checkpoint=lambda d, *_: saved.append(d), should_cancel=lambda: bool(saved)
            )
        )
    result = Trainer.resume(saved[0], tiny_base, rows, val).train()
    assert _states_equal(full.adapter, result.adapter)


def test_checkpoint_is_json_plus_safetensors(tiny_base, easy_rows) -> None:
    t = Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows, None, {"n_epochs": 1})
    t.setup()
    data = t.save_checkpoint()
    assert data.startswith(MAGIC) and b"\x80\x04" not in data[:2]  # no pickle protocol header
    meta, tensors = unpack(data)
    json.dumps(meta)  # plain JSON
    assert meta["position"] == {"step": 0, "epoch": 0, "batch": 0}
    assert any(k.startswith("model.method.lora_A") for k in tensors)
    for bad in (b"", b"garbage", data[:20], MAGIC + b"\xff" * 8 + b"{}"):
        with pytest.raises(CheckpointError):
            Trainer.resume(bad, tiny_base, easy_rows)
    import pickle

    with pytest.raises(CheckpointError):
        Trainer.resume(pickle.dumps({"a": 1}), tiny_base, easy_rows)


def test_checkpoint_refuses_other_data_or_config(tiny_base, easy_rows) -> None:
    t = Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows, None, {"n_epochs": 1})
    t.setup()
    data = t.save_checkpoint()
    with pytest.raises(CheckpointError, match="train_data"):
        Trainer.resume(data, tiny_base, easy_rows[:-1])
    with pytest.raises(CheckpointError, match="training"):
        Trainer.resume(data, tiny_base, easy_rows, config={"n_epochs": 2})
    with pytest.raises(CheckpointError, match="method"):
        Trainer.resume(data, tiny_base, easy_rows, method_config={"type": "lora", "r": 4})
    # Fields that do not change the trajectory may differ.
    Trainer.resume(data, tiny_base, easy_rows, config={"n_epochs": 1, "checkpoint_every_steps": 5})


def _without_average_epochs(data: bytes) -> bytes:
    """``data`` as a checkpoint saved before ``average_epochs`` existed."""
    meta, tensors = unpack(data)
    del meta["identity"]["training"]["average_epochs"], meta["config"]["average_epochs"]
    return pack(meta, tensors)


def test_a_checkpoint_from_before_a_setting_of_another_task_resumes(tiny_base, easy_rows) -> None:
    t = Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows, None, {"n_epochs": 1})
    t.setup()
    old = _without_average_epochs(t.save_checkpoint())
    # A classifier reads no average_epochs: its job resumes.
    Trainer.resume(old, tiny_base, easy_rows, config={"n_epochs": 1})
    with pytest.raises(CheckpointError, match="training"):  # what it does read still counts
        Trainer.resume(old, tiny_base, easy_rows, config={"n_epochs": 2})
    rows = preference_rows(16)
    t = Trainer(tiny_base, {"type": "lora"}, {"task": "reward"}, rows, None, {"n_epochs": 1})
    t.setup()
    # A reward model would average its epochs now, which it did not before: it starts over.
    with pytest.raises(CheckpointError, match="training"):
        Trainer.resume(_without_average_epochs(t.save_checkpoint()), tiny_base, rows)


def test_checkpoint_callback_schedule(tiny_base, easy_rows) -> None:
    calls: list[tuple[int, float]] = []
    cfg = {"n_epochs": 2, "batch_size": 16, "checkpoint_every_steps": 5}  # 108 rows: 7 / epoch
    _run(
        tiny_base,
        easy_rows,
        None,
        cfg,
        TrainerCallbacks(on_checkpoint=lambda d, s, e, m: calls.append((s, e))),
    )
    # Every 5 steps and at the first epoch's end; never after the final step. The epoch is
    # the epochs completed by then.
    assert calls == [(5, pytest.approx(5 / 7)), (7, 1.0), (10, pytest.approx(10 / 7))]


# --- cancel, early stopping, unfreezing ------------------------------------------------------


def test_cancel_within_one_step(tiny_base, easy_rows) -> None:
    steps: list[int] = []
    cancel = {"now": False}

    def progress(e: ProgressEvent) -> None:
        steps.append(e.step)
        if e.step == 3:
            cancel["now"] = True

    t = Trainer(
        tiny_base,
        {"type": "lora"},
        CLS,
        easy_rows,
        None,
        {"n_epochs": 5},
        TrainerCallbacks(on_progress=progress, should_cancel=lambda: cancel["now"]),
    )
    with pytest.raises(Cancelled):
        t.train()
    assert steps == [1, 2, 3]
    assert t.model is None and t.optimizer is None  # memory released


def test_early_stopping_restores_best(tiny_base, easy_rows, easy_val_rows) -> None:
    # An absurd learning rate diverges after the first evaluations; patience 2 stops it.
    cfg = {
        "n_epochs": 20,
        "batch_size": 16,
        "learning_rate": 0.5,
        "warmup_steps": 0,
        "eval_every_steps": 2,
        "early_stopping_patience": 2,
        "lr_scheduler": "constant",
        "metric_for_best": "loss",
    }
    r = Trainer(tiny_base, {"type": "full"}, CLS, easy_rows, easy_val_rows, cfg).train()
    assert r.stopped_early and r.steps < 20 * 7
    losses = {h["step"]: h["val"]["loss"] for h in r.history}
    assert r.best_step == min(losses, key=losses.get)
    assert r.metrics["val_loss"] == losses[r.best_step]
    # The adapter holds the best weights, not the last: re-evaluating gives the best loss.
    t = Trainer(tiny_base, {"type": "full"}, CLS, easy_rows, easy_val_rows, cfg)
    t.setup()
    t.model.method.load_saved_state(r.adapter.method_state)
    t.model.head.load_state_dict(r.adapter.head_state)
    assert t.evaluate()["loss"] == pytest.approx(losses[r.best_step], rel=1e-5)


def test_gradual_unfreezing_changes_trained_params(tiny_base, easy_rows) -> None:
    trainable: dict[int, set[str]] = {}  # epoch -> parameters that required grad in it
    moved: dict[int, set[str]] = {}  # epoch -> parameters whose values changed in it
    last: dict[str, torch.Tensor] = {}
    trainer: Trainer

    def progress(e: ProgressEvent) -> None:
        # e.epoch counts completed epochs (1.0 after the first): the step's 0-based epoch.
        epoch = math.ceil(e.epoch) - 1
        params = trainer.named_params
        trainable.setdefault(epoch, set()).update(n for n, p in params.items() if p.requires_grad)
        changed = {n for n, p in params.items() if not torch.equal(p.detach(), last[n])}
        moved.setdefault(epoch, set()).update(changed)
        last.update({n: params[n].detach().clone() for n in changed})

    cfg = {
        "n_epochs": 4,
        "batch_size": 32,
        "gradual_unfreezing": True,
        "learning_rate": 1e-3,
        "metric_for_best": "loss",
    }
    trainer = Trainer(
        tiny_base,
        {"type": "full"},
        CLS,
        easy_rows,
        None,
        cfg,
        TrainerCallbacks(on_progress=progress),
    )
    trainer.setup()
    last.update({n: p.detach().clone() for n, p in trainer.named_params.items()})
    result = trainer.train()

    def kinds(names: set[str]) -> set[str]:
        out = set()
        for n in names:
            if n.startswith("head."):
                out.add("head")
            elif ".embeddings." in n:
                out.add("emb")
            else:
                out.add(f"L{n.split('.layer.')[1].split('.')[0]}")
        return out

    # Epoch 0 trains the head; each later epoch adds the next layer down, then the embeddings.
    expected = [{"head"}, {"head", "L1"}, {"head", "L1", "L0"}, {"head", "L1", "L0", "emb"}]
    assert [kinds(trainable[e]) for e in range(4)] == expected
    assert [kinds(moved[e]) for e in range(4)] == expected
    # Nothing frozen drifted: every parameter that changed in an epoch was trainable in it.
    for e in range(4):
        assert moved[e] <= trainable[e], sorted(moved[e] - trainable[e])
    # The adapter holds the trained weights, the embeddings' included.
    emb = result.adapter.method_state["embeddings.word_embeddings.weight"]
    assert not torch.equal(emb, tiny_base.encoder.embeddings.word_embeddings.weight)


# --- what a run reports ----------------------------------------------------------------------


def test_epochs_are_completed_epochs_as_in_hf_trainer(tiny_base, easy_rows) -> None:
    """``epoch`` counts epochs completed (a float), so a finished 3-epoch run says 3.0."""
    events: list[ProgressEvent] = []
    cfg = {"n_epochs": 3, "batch_size": 16}
    cb = TrainerCallbacks(on_progress=events.append)
    # 58 training rows after the 10 % hold-out: 4 steps per epoch, a validation at each end.
    result = Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows[:64], None, cfg, cb).train()
    assert [e.epoch for e in events] == [s / 4 for s in range(1, 13)]
    assert events[-1].epoch == 3.0 and result.metrics["epochs"] == 3.0
    assert [h["epoch"] for h in result.history] == [1.0, 2.0, 3.0]


def test_trained_tokens_count_every_step_without_padding(tiny_base, easy_rows) -> None:
    rows = easy_rows[:40]
    events: list[ProgressEvent] = []
    cfg = {"n_epochs": 2, "batch_size": 8, "validation_fraction": 0}
    trainer = Trainer(
        tiny_base,
        {"type": "lora"},
        CLS,
        rows,
        None,
        cfg,
        TrainerCallbacks(on_progress=events.append),
    )
    trainer.setup()
    tok = tiny_base.tokenizer
    # [CLS] text [SEP] per row: the rows' own token counts, no padding to the batch's longest.
    per_epoch = sum(len(tok(r["text"])["input_ids"]) for r in rows)
    padded = sum(
        max(trainer.train_data.lengths[i] for i in b) * len(b) for b in trainer.sampler.batches(0)
    )
    assert per_epoch < padded  # the rows differ in length, so padding would be counted
    result = trainer.train()
    assert result.metrics["trained_tokens"] == events[-1].trained_tokens == 2 * per_epoch
    counts = [e.trained_tokens for e in events]
    assert counts == sorted(counts) and counts[0] > 0 and len(set(counts)) == len(counts)


def test_trained_tokens_of_preference_pairs_count_both_sequences(tiny_base) -> None:
    rows = preference_rows(12)
    reward = {"task": "reward"}
    cfg = {"n_epochs": 1, "batch_size": 4, "validation_fraction": 0}
    result = Trainer(tiny_base, {"type": "lora"}, reward, rows, None, cfg).train()
    tok = tiny_base.tokenizer
    expected = sum(
        len(tok(r["prompt"], r[side])["input_ids"]) for r in rows for side in ("chosen", "rejected")
    )
    assert result.metrics["trained_tokens"] == expected


def test_resolved_hyperparameters_say_what_the_run_uses(tiny_base, easy_rows) -> None:
    cfg = {"n_epochs": 2, "batch_size": 16, "max_seq_length": 4096, "warmup_ratio": 0.25}
    t = Trainer(
        tiny_base, {"type": "prompt_tuning", "n_virtual_tokens": 4}, CLS, easy_rows, None, cfg
    )
    t.setup()
    r = t.resolved_hyperparameters()
    # 10 % of 120 rows held out, stratified (6 per class); 108 rows = 7 batches of 16.
    assert r["validation"] == "held_out" and r["validation_fraction"] == 0.1
    assert r["held_out_examples"] == 12 and r["val_examples"] == 12 and r["train_examples"] == 108
    assert r["steps_per_epoch"] == 7 and r["total_steps"] == 14 and r["n_epochs"] == 2
    assert r["learning_rate"] == 3e-2  # "auto" for prompt tuning
    assert r["warmup_steps"] == 3  # int(0.25 * 14)
    assert r["batch_size"] == 16 and r["eval_batch_size"] == 32
    # Capped by the base model's positions, less the virtual tokens.
    assert r["max_seq_length"] == tiny_base.max_length - 4
    assert "num_threads" not in r
    json.dumps(r)  # stored as JSON by the service

    given = Trainer(
        tiny_base, {"type": "lora"}, CLS, easy_rows[:40], easy_rows[40:60], {"max_steps": 5}
    )
    given.setup()
    r = given.resolved_hyperparameters()
    assert r["validation"] == "validation_set" and r["held_out_examples"] == 0
    assert r["validation_fraction"] == 0.0 and r["val_examples"] == 20
    assert r["total_steps"] == 5 and r["n_epochs"] == 2  # 3 steps per epoch: 5 reach the 2nd
    assert r["learning_rate"] == 1e-3

    none = Trainer(
        tiny_base, {"type": "lora"}, CLS, easy_rows[:40], None, {"validation_fraction": 0}
    )
    none.setup()
    assert none.resolved_hyperparameters()["validation"] == "none"


# --- bad input -------------------------------------------------------------------------------


def test_bad_data_errors_name_the_row(tiny_base, easy_rows) -> None:
    rows = [*easy_rows[:10], {"text": "", "label": "pos"}]
    with pytest.raises(DataError) as e:
        Trainer(tiny_base, {"type": "lora"}, CLS, rows).setup()
    assert e.value.row == 10 and e.value.field == "text"

    one_class = [r for r in easy_rows if r["label"] == "pos"]
    with pytest.raises(DataError, match="one class"):
        Trainer(tiny_base, {"type": "lora"}, CLS, one_class).setup()

    val = [{"text": "good", "label": "pos"}, {"text": "meh", "label": "meh"}]
    with pytest.raises(DataError) as e:
        Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows, val).setup()
    assert e.value.row == 1 and "validation" in str(e.value)

    # A fraction asked for that holds out no row is an error; the default's trains every row
    # and validates none (a 4-row file failed its job).
    asked = {"validation_fraction": 0.1}
    with pytest.raises(DataError, match="too few rows"):
        Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows[:4], None, asked).setup()
    small = Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows[:4])
    small.setup()
    resolved = small.resolved_hyperparameters()
    assert (resolved["validation"], resolved["train_examples"]) == ("none", 4)
    Trainer(
        tiny_base, {"type": "lora"}, CLS, easy_rows[:4], None, {"validation_fraction": 0}
    ).setup()

    head = {"task": "classification", "label_names": ["neg", "pos"], "text_pair": False}
    paired = [*easy_rows[:10], {"text": "a", "text_pair": "b", "label": "pos"}]
    with pytest.raises(DataError) as e:
        Trainer(tiny_base, {"type": "lora"}, head, paired).setup()
    assert e.value.row == 10 and e.value.field == "text_pair"

    given = {"task": "classification", "label_names": ["neg", "other"]}
    with pytest.raises(DataError) as e:
        Trainer(tiny_base, {"type": "lora"}, given, easy_rows).setup()
    assert e.value.field == "label" and e.value.row == 0


def test_bad_configs(tiny_base, easy_rows) -> None:
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows, None, {"batch_size": -1})
    assert e.value.field == "batch_size"
    with pytest.raises(ConfigError) as e:
        Trainer(tiny_base, {"type": "lora", "r": 0}, CLS, easy_rows)
    assert e.value.field == "r"
    with pytest.raises(ConfigError) as e:
        Trainer(
            tiny_base,
            {"type": "lora"},
            {"task": "reward"},
            preference_rows(20),
            None,
            {"metric_for_best": "macro_f1"},
        ).setup()
    assert e.value.field == "metric_for_best"


def test_no_validation_returns_last_weights(tiny_base, easy_rows) -> None:
    cfg = {"n_epochs": 1, "validation_fraction": 0, "max_steps": 5}
    r = _run(tiny_base, easy_rows, None, cfg)
    assert r.best_step == r.steps == 5
    assert "val_loss" not in r.metrics and r.metrics["train_loss"] > 0


@pytest.mark.parametrize("method", ["feature_extraction", "lora"])
def test_resume_a_reward_model_equals_uninterrupted(tiny_base, method: str) -> None:
    # Cut mid-way through the second epoch: the first epoch's end is in the average by then.
    rows, val = preference_rows(40), preference_rows(16, seed=1)
    cfg = {
        "n_epochs": 3,
        "batch_size": 8,
        "learning_rate": 1e-2,
        "margin": 0.2,
        "checkpoint_every_steps": 1,
    }
    run = lambda cb=None: Trainer(  # noqa: E731
        tiny_base, {"type": method}, {"task": "reward"}, rows, val, cfg, cb
    ).train()
    full = run()
    saved: dict[int, bytes] = {}
    with pytest.raises(Cancelled):
        run(
            TrainerCallbacks(
                on_checkpoint=lambda data, step, *_: saved.__setitem__(step, data),
                should_cancel=lambda: 7 in saved,
            )
        )
    result = Trainer.resume(saved[7], tiny_base, rows, val).train()
    assert _states_equal(full.adapter, result.adapter)
    assert full.metrics == {**result.metrics} and full.metrics["averaged_epochs"] == 3
    assert (full.adapter.method_state == {}) == (method == "feature_extraction")


def _weights(adapter) -> dict[str, torch.Tensor]:
    """An adapter's tensors, the head's marked."""
    return {
        **{f"method.{k}": v for k, v in adapter.method_state.items()},
        **{f"head.{k}": v for k, v in adapter.head_state.items()},
    }


def _pair_accuracy(base, adapter, rows) -> float:
    """Share of ``rows`` whose chosen text ``adapter`` scores above the rejected one."""
    data = encode(coerce_examples(rows, "reward"), base.tokenizer, adapter.head.max_seq_length)
    with torch.inference_mode():
        out = adapter.build(base)(data.collate(list(range(len(data))), base.device))
    return float((out[: len(data)] > out[len(data) :]).float().mean())


def test_a_reward_model_is_the_mean_of_its_epoch_ends(tiny_base) -> None:
    rows, val = preference_rows(48), preference_rows(24, seed=1)
    cfg = {"n_epochs": 3, "batch_size": 8, "learning_rate": 1e-2}
    ends: list[dict[str, torch.Tensor]] = []
    on_epoch_end = TrainerCallbacks(
        on_checkpoint=lambda data, *_: ends.append(
            _weights(adapter_from_checkpoint(data, tiny_base))
        )
    )
    train = lambda config, val_rows, cb=None: Trainer(  # noqa: E731
        tiny_base, {"type": "lora"}, {"task": "reward"}, rows, val_rows, config, cb
    ).train()
    best = train({**cfg, "average_epochs": False}, val, on_epoch_end)
    # The last epoch's end is not checkpointed (its weights end the run); a run without
    # validation keeps them, and the same rows train the same way.
    last = train({**cfg, "average_epochs": False, "validation_fraction": 0.0}, None)
    ends.append(_weights(last.adapter))
    averaged = train(cfg, val)

    assert len(ends) == 3
    mean = {k: (ends[0][k] + ends[1][k] + ends[2][k]) / 3 for k in ends[0]}
    got = _weights(averaged.adapter)
    assert got.keys() == mean.keys() and all(torch.equal(got[k], mean[k]) for k in mean)
    assert not _states_equal(averaged.adapter, best.adapter)
    m = averaged.metrics
    assert m["averaged_epochs"] == 3 and m["best_step"] == m["steps"] == averaged.best_step == 18
    # Its validation metrics are the mean's, not an epoch's.
    assert m["val_accuracy"] == _pair_accuracy(tiny_base, averaged.adapter, val)
    assert m["val_loss"] not in [h["val"]["loss"] for h in averaged.history]
    # The epochs' own validation still shows in the history, as without averaging.
    assert averaged.history == [
        {**h, "elapsed": averaged.history[i]["elapsed"]} for i, h in enumerate(best.history)
    ]


def test_averaging_one_epoch_changes_nothing_and_a_cut_epoch_counts(tiny_base) -> None:
    rows, val = preference_rows(48), preference_rows(24, seed=1)
    cfg = {"n_epochs": 1, "batch_size": 8, "learning_rate": 1e-2}
    train = lambda config: Trainer(  # noqa: E731
        tiny_base, {"type": "lora"}, {"task": "reward"}, rows, val, config
    ).train()
    one, plain = train(cfg), train({**cfg, "average_epochs": False})
    assert _states_equal(one.adapter, plain.adapter)
    assert {**one.metrics, "averaged_epochs": None} == {**plain.metrics, "averaged_epochs": None}
    # max_steps ends the run within the second epoch (6 steps an epoch): its last weights are
    # the second sample.
    cut = train({**cfg, "n_epochs": 3, "max_steps": 9})
    assert cut.metrics["averaged_epochs"] == 2 and cut.best_step == 9


def test_closed_trainer_cannot_restart(tiny_base, easy_rows) -> None:
    t = Trainer(tiny_base, {"type": "lora"}, CLS, easy_rows, None, {"max_steps": 2})
    t.train()
    with pytest.raises(RuntimeError, match="closed"):
        t.train()


def test_checkpoint_taken_during_validation(tiny_base, easy_rows) -> None:
    """The worker saves from should_cancel on shutdown, which also runs between validation
    batches: resuming such a checkpoint replays the interrupted validation."""
    rows, val = easy_rows[:48], easy_rows[48:100]
    cfg = {
        "n_epochs": 3,
        "batch_size": 8,
        "eval_batch_size": 8,
        "learning_rate": 1e-2,
        "early_stopping_patience": 3,
    }
    full = _run(tiny_base, rows, val, cfg)

    saved: list[bytes] = []
    trainer: Trainer

    def should_cancel() -> bool:
        st = trainer.state
        if st.pending is not None and st.step == 12 and not saved:  # inside epoch 2's eval
            saved.append(trainer.save_checkpoint())
            return True
        return False

    trainer = Trainer(
        tiny_base,
        {"type": "lora", "dropout": 0.1},
        CLS,
        rows,
        val,
        cfg,
        TrainerCallbacks(should_cancel=should_cancel),
    )
    with pytest.raises(Cancelled):
        trainer.train()
    evals: list[ProgressEvent] = []
    result = Trainer.resume(
        saved[0], tiny_base, rows, val, callbacks=TrainerCallbacks(on_eval=evals.append)
    ).train()
    assert evals[0].step == 12  # the interrupted validation ran first
    assert _states_equal(full.adapter, result.adapter)
    strip = [{k: v for k, v in h.items() if k != "elapsed"} for h in full.history]
    assert [{k: v for k, v in h.items() if k != "elapsed"} for h in result.history] == strip


def _first_batch_losses(tiny_base, rows, method: dict, config: dict) -> tuple[Trainer, Any, Any]:
    """A set-up trainer, and its first 8 rows' loss as a training step computes it and with
    every dropout off (torch's generators seeded alike for both)."""
    trainer = Trainer(tiny_base, method, {"task": "reward"}, rows, None, {"seed": 0, **config})
    trainer.setup()
    idx, device = list(range(8)), tiny_base.device
    with torch.no_grad():
        torch.manual_seed(0)
        step, _ = trainer._part_loss(idx, idx)
        out = trainer.model(trainer.train_data.collate(idx, device), dropout=False)
        plain = trainer._loss(out, trainer.train_data.targets(idx, device))
    return trainer, step, plain


def test_a_reward_model_trains_without_dropout_unless_asked(tiny_base) -> None:
    rows = preference_rows(16)
    _, step, plain = _first_batch_losses(tiny_base, rows, {"type": "lora"}, {})
    assert torch.equal(step, plain)
    _, step, plain = _first_batch_losses(
        tiny_base, rows, {"type": "lora"}, {"disable_dropout": False}
    )
    assert not torch.equal(step, plain)  # the base's and head's dropout (0.1) are on


def test_a_reward_model_s_lora_adapts_every_linear_unless_told(tiny_base, easy_rows) -> None:
    from core.targets import TARGET_MODULES

    def pairs_trained(trainer: Trainer) -> int:  # one A (and one B) per adapted linear
        return sum(name.startswith("method.lora_A.") for name in trainer.named_params)

    rows, layers = preference_rows(16), tiny_base.num_layers
    trainer, _, _ = _first_batch_losses(tiny_base, rows, {"type": "lora"}, {})
    assert trainer.method_config.target_modules == list(TARGET_MODULES)
    assert pairs_trained(trainer) == layers * len(TARGET_MODULES)
    told = {"type": "lora", "target_modules": ["query"]}
    trainer, _, _ = _first_batch_losses(tiny_base, rows, told, {})
    assert trainer.method_config.target_modules == ["query"]
    assert pairs_trained(trainer) == layers
    # A classifier keeps LoRA's default, query and value.
    classifier = Trainer(tiny_base, {"type": "lora"}, {"task": "classification"}, easy_rows)
    classifier.setup()
    assert pairs_trained(classifier) == layers * 2
