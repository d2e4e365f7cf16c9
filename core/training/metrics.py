"""Losses and validation metrics for classification and reward (preference) heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


def reward_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    margin: Tensor | float = 0.0,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Bradley-Terry loss with TRL ``RewardTrainer`` semantics.

    ``-logsigmoid(r_c - r_r - margin).mean()``, plus
    ``center_rewards_coefficient * mean((r_c + r_r) ** 2)``, which keeps rewards centred on 0
    (Eisenstein et al. 2023) so scores of different adapters are comparable.
    """
    loss = -F.logsigmoid(rewards_chosen - rewards_rejected - margin).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean(
            (rewards_chosen + rewards_rejected) ** 2
        )
    return loss


class ClassificationMetrics:
    """Accumulates over batches: mean loss, accuracy, macro-F1 and per-class counts."""

    def __init__(self, label_names: Sequence[str]) -> None:
        self.label_names = list(label_names)
        n = len(label_names)
        self.support = torch.zeros(n, dtype=torch.long)
        self.predicted = torch.zeros(n, dtype=torch.long)
        self.correct = torch.zeros(n, dtype=torch.long)
        self.loss_sum = 0.0
        self.count = 0

    def update(self, logits: Tensor, labels: Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.cpu()
        n = len(self.label_names)
        self.loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        self.count += labels.numel()
        pred = logits.argmax(-1)
        self.support += torch.bincount(labels, minlength=n)
        self.predicted += torch.bincount(pred, minlength=n)
        self.correct += torch.bincount(labels[pred == labels], minlength=n)

    def compute(self) -> dict[str, Any]:
        per_class: dict[str, dict[str, float | int]] = {}
        f1s: list[float] = []
        for i, name in enumerate(self.label_names):
            s, p, c = int(self.support[i]), int(self.predicted[i]), int(self.correct[i])
            f1 = 2 * c / (s + p) if s + p else 0.0
            # Like scikit-learn's default: average over classes that occur in the labels or
            # the predictions; a class absent from both says nothing about the model.
            if s + p:
                f1s.append(f1)
            per_class[name] = {
                "support": s,
                "predicted": p,
                "correct": c,
                "precision": c / p if p else 0.0,
                "recall": c / s if s else 0.0,
                "f1": f1,
            }
        total = max(self.count, 1)
        return {
            "loss": self.loss_sum / total,
            "accuracy": int(self.correct.sum()) / total,
            "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
            "count": self.count,
            "per_class": per_class,
        }


class RewardMetrics:
    """Accumulates over batches: mean loss, pairwise accuracy, mean reward margin."""

    def __init__(self, center_rewards_coefficient: float | None = None) -> None:
        self.center = center_rewards_coefficient
        self.loss_sum = 0.0
        self.wins = 0
        self.margin_sum = 0.0
        self.chosen_sum = 0.0
        self.rejected_sum = 0.0
        self.count = 0

    def update(self, r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0) -> None:
        rc, rr = r_chosen.detach().float().cpu(), r_rejected.detach().float().cpu()
        if isinstance(margin, Tensor):
            margin = margin.detach().float().cpu()
        n = rc.numel()
        self.loss_sum += reward_loss(rc, rr, margin, self.center).item() * n
        # Ties count as wrong: a scorer that cannot tell the two apart has not ranked them.
        self.wins += int((rc > rr).sum())
        self.margin_sum += float((rc - rr).sum())
        self.chosen_sum += float(rc.sum())
        self.rejected_sum += float(rr.sum())
        self.count += n

    def compute(self) -> dict[str, Any]:
        total = max(self.count, 1)
        return {
            "loss": self.loss_sum / total,
            "accuracy": self.wins / total,
            "mean_margin": self.margin_sum / total,
            "mean_reward_chosen": self.chosen_sum / total,
            "mean_reward_rejected": self.rejected_sum / total,
            "count": self.count,
        }


def is_better(metric: str, new: float, best: float | None) -> bool:
    """Loss improves downwards, every other metric upwards; ties are not improvements."""
    if best is None:
        return True
    return new < best if metric == "loss" else new > best
