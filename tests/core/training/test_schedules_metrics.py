from __future__ import annotations

import math

import pytest
import torch

from core.training.metrics import ClassificationMetrics, RewardMetrics, reward_loss
from core.training.schedules import layer_lr_scale, lr_lambda, unfreeze_epoch
from core.training.trainer import Trainer
from tests.core.training.conftest import sentiment_rows

# --- lr schedules ----------------------------------------------------------------------------


def test_linear_warmup_then_decay() -> None:
    f = lr_lambda("linear", warmup_steps=10, total_steps=110)
    assert [f(s) for s in (0, 5, 10, 60, 110, 200)] == [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_cosine_values() -> None:
    f = lr_lambda("cosine", warmup_steps=4, total_steps=104)
    assert f(2) == 0.5
    assert f(4) == 1.0
    assert f(54) == pytest.approx(0.5)  # half-way: cos(pi/2)
    assert f(29) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert f(104) == pytest.approx(0.0)


def test_constant_with_warmup() -> None:
    f = lr_lambda("constant", 2, 10)
    assert [f(s) for s in (0, 1, 2, 9)] == [0.0, 0.5, 1.0, 1.0]


def test_layer_scales() -> None:
    # 6 layers, decay 0.5: head/top layer 1, layer 0 at 0.5^5, embeddings one step lower.
    assert layer_lr_scale(None, 6, 0.5) == 1.0
    assert layer_lr_scale(5, 6, 0.5) == 1.0
    assert layer_lr_scale(0, 6, 0.5) == 0.5**5
    assert layer_lr_scale(-1, 6, 0.5) == 0.5**6


def test_unfreeze_plan() -> None:
    # 4 layers, one per epoch: head, 3, 2, 1, 0, then embeddings.
    assert [unfreeze_epoch(x, 4, 1) for x in (None, 3, 2, 1, 0, -1)] == [0, 1, 2, 3, 4, 5]
    # Two layers per epoch.
    assert [unfreeze_epoch(x, 4, 2) for x in (None, 3, 2, 1, 0, -1)] == [0, 1, 1, 2, 2, 3]
    assert unfreeze_epoch(-1, 4, 0) == 0


def _groups(trainer: Trainer) -> dict[str, tuple[float, float]]:
    out = {}
    for g in trainer.optimizer.param_groups:
        for name in g["names"]:
            out[name] = (g["lr"], g["weight_decay"])
    return out


def test_layerwise_lr_groups_full(tiny_base) -> None:
    cfg = {"learning_rate": 1e-3, "layerwise_lr_decay": 0.5, "warmup_steps": 0}
    t = Trainer(
        tiny_base, {"type": "full"}, {"task": "classification"}, sentiment_rows(40), config=cfg
    )
    t.setup()
    g = _groups(t)
    assert g["head.out.weight"] == (1e-3, 0.01)
    assert g["head.out.bias"] == (1e-3, 0.0)
    assert g["method.bert.encoder.layer.1.attention.self.query.weight"] == (1e-3, 0.01)
    assert g["method.bert.encoder.layer.0.attention.self.query.weight"] == (5e-4, 0.01)
    assert g["method.bert.encoder.layer.0.output.LayerNorm.weight"] == (5e-4, 0.0)
    assert g["method.bert.embeddings.word_embeddings.weight"] == (2.5e-4, 0.01)
    assert len(g) == len(list(t.model.method.parameters())) + 2


def test_layerwise_lr_groups_lora(tiny_base) -> None:
    cfg = {"learning_rate": 2e-3, "layerwise_lr_decay": 0.8, "warmup_steps": 0}
    t = Trainer(
        tiny_base, {"type": "lora"}, {"task": "classification"}, sentiment_rows(40), config=cfg
    )
    t.setup()
    groups = _groups(t)
    lrs: dict[int, set[float]] = {}
    for i, (layer, _) in enumerate(t.model.method.sites):
        for which in ("A", "B"):
            lrs.setdefault(layer, set()).add(round(groups[f"method.lora_{which}.{i}"][0], 12))
    assert lrs == {1: {2e-3}, 0: {1.6e-3}}


# --- metrics ---------------------------------------------------------------------------------


def test_reward_loss_hand_computed() -> None:
    rc, rr = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    base = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert reward_loss(rc, rr).item() == pytest.approx(base, abs=1e-6)
    assert reward_loss(rc, rr, center_rewards_coefficient=0.01).item() == pytest.approx(
        base + 0.01 * (9 + 1) / 2, abs=1e-6
    )
    with_margin = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2
    assert reward_loss(rc, rr, 0.5).item() == pytest.approx(with_margin, abs=1e-6)
    per_row = torch.tensor([0.5, 0.5])
    assert reward_loss(rc, rr, per_row).item() == pytest.approx(with_margin, abs=1e-6)


def test_reward_metrics_accumulate() -> None:
    m = RewardMetrics()
    m.update(torch.tensor([2.0]), torch.tensor([1.0]))
    m.update(torch.tensor([0.0, 3.0]), torch.tensor([1.0, 3.0]))  # a loss and a tie
    out = m.compute()
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["mean_margin"] == pytest.approx(0.0)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1)) + math.log(2)) / 3
    assert out["loss"] == pytest.approx(expected, abs=1e-6)
    assert out["count"] == 3


def test_classification_metrics_hand_computed() -> None:
    m = ClassificationMetrics(["a", "b", "c", "d"])
    labels = torch.tensor([0, 0, 1, 2])
    preds = torch.tensor([0, 1, 1, 1])
    logits = torch.nn.functional.one_hot(preds, 4).float() * 5
    m.update(logits[:2], labels[:2])
    m.update(logits[2:], labels[2:])
    out = m.compute()
    assert out["accuracy"] == 0.5
    # F1: a 2/3, b 1/2, c 0; d (no support, never predicted) is left out of the average.
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert out["per_class"]["b"] == {
        "support": 1,
        "predicted": 3,
        "correct": 1,
        "precision": 1 / 3,
        "recall": 1.0,
        "f1": 0.5,
    }
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
