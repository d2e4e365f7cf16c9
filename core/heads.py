"""Task heads on top of pooled features: classification (n labels) and reward (one scalar).

A decoder's language-model tasks (``chat`` SFT and ``dpo``) train no head: the base's own
language-model head predicts the next token, and their ``HeadConfig`` only records the task.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from core.targets import BaseKind

TaskType = Literal["classification", "reward", "chat", "dpo"]
# Tasks of a decoder base whose output is the base's own next-token prediction.
LANGUAGE_MODEL_TASKS: frozenset[str] = frozenset({"chat", "dpo"})


def task_base_kind(task: str) -> BaseKind:
    """The kind of base an adapter of ``task`` trains on when its head does not say: the
    language-model tasks need a decoder; a head saved without ``pooling="last_token"`` is an
    encoder's. An adapter's own kind is :attr:`HeadConfig.base_kind` (reward and
    classification heads train on either kind); its method config is validated for that kind
    (layer names differ)."""
    return "decoder" if task in LANGUAGE_MODEL_TASKS else "encoder"


def head_base_kind(task: str, pooling: str) -> BaseKind:
    """The kind of base a head of ``task`` pooling by ``pooling`` runs on: a last-token head
    is a decoder's. :attr:`HeadConfig.base_kind`, callable on a stored head's two fields
    without validating the rest (the request path reads it per request)."""
    return "decoder" if pooling == "last_token" else task_base_kind(task)


class HeadConfig(BaseModel):
    """Saved with the adapter: what the head predicts and how inputs are encoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    task: TaskType
    label_names: list[str] = Field(default_factory=list)
    # Classification: rows carry a second text. Reward: (prompt, response) encoded as a pair.
    text_pair: bool = False
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # What the head reads: the base's own pooling of every token, or (reward) the mean over the
    # response's tokens (token type 1 of a (prompt, response) pair; every token of a response
    # given alone). The trainer gives new reward heads "response": held-out HH-RLHF pair
    # accuracy 0.633 against 0.605 pooling the prompt too (1 epoch, bench.reward_quality,
    # issue 15), as a long shared prompt otherwise dominates both rows' features. Heads saved
    # before the field existed read "base". On a decoder base the head reads the final hidden
    # state of each row's last real token ("last_token", the only pooling there: a causal
    # model's last state is the one that has seen the whole input), which makes the head a
    # decoder's.
    pooling: Literal["base", "response", "last_token"] = "base"
    # Tokens per input the adapter was trained at (the trainer's max_seq_length after the
    # base's cap, which already leaves room for prompt tuning's positions): serving encodes at
    # this length too, so a served row is the row training saw (the reward default of 128
    # served at the base's 256 moved held-out HH rewards by up to 4.1). None, adapters saved
    # before the field: the base's window.
    max_seq_length: int | None = Field(None, ge=1)
    # Reward: whole dialogues without a prompt were split at their last shared turn in
    # training (TrainingConfig.split_shared_prefix); a pair served without a prompt is split
    # the same way (core.pair_encoding.split_shared_prefix). False for heads saved before.
    split_shared_prefix: bool = False

    @model_validator(mode="after")
    def _labels(self) -> HeadConfig:
        if self.task == "classification" and len(self.label_names) < 2:
            raise ValueError("classification needs at least two label names")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError("label names must be unique")
        return self

    @property
    def base_kind(self) -> BaseKind:
        """The kind of base this head's adapter trains on and is served by."""
        return head_base_kind(self.task, self.pooling)

    def window(self, base_window: int) -> int:
        """Tokens per input served: the trained length, or ``base_window`` (the base's limit
        less the method's reserved positions) for heads saved without one; never more than
        ``base_window``."""
        # Capped: an adapter stored before imports checked its length against the base
        # (core.io.peft.check_window) may ask for positions the base does not have.
        return min(self.max_seq_length or base_window, base_window)

    @property
    def out_features(self) -> int:
        return len(self.label_names) if self.task == "classification" else 1


class Head(nn.Module):
    """Dropout + linear, as in BertForSequenceClassification. Reward heads output one scalar."""

    def __init__(self, config: HeadConfig, hidden_size: int) -> None:
        if config.task in LANGUAGE_MODEL_TASKS:
            raise ValueError(f"task {config.task!r} uses the base's language-model head")
        super().__init__()
        self.config = config
        self.dropout = config.dropout
        self.out = nn.Linear(hidden_size, config.out_features)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def forward(self, features: Tensor, dropout: bool = False) -> Tensor:
        if dropout and self.dropout:
            features = nn.functional.dropout(features, self.dropout, training=True)
        y = self.out(features)
        return y.squeeze(-1) if self.config.task == "reward" else y
