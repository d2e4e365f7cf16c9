"""Reward models and classifiers on a decoder base: the Trainer's recipe, last-token pooling.

Usage, as for the encoder's heads (:mod:`core.training.trainer`)::

    trainer = DecoderHeadTrainer(decoder_base, {"type": "lora"}, {"task": "reward"}, rows)
    result = trainer.train()   # result.adapter: LoRA + head, pooling "last_token"
    model = result.adapter.build_decoder_head(decoder_base)
    rewards = score_decoder_pairs(model, prompts, responses)   # core.decoder.scoring

The rows, checks, splits, metrics, loss and head are the encoder's (preference rows with
``prompt``/``chosen``/``rejected``/``margin``, classification rows with ``text``/``label``/
``text_pair``; Bradley-Terry or cross-entropy); what differs is the task's parts only: rows
are rendered with the base's chat template (:func:`core.decoder.scoring.encode_scored_turns`,
which scoring uses too) and the head reads the final hidden state of each row's last real
token (``HeadConfig.pooling == "last_token"``, which makes the adapter a decoder's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from core.decoder.base import DecoderBase
from core.decoder.scoring import DecoderHeadModel, encode_scored_turns
from core.errors import ConfigError
from core.heads import Head, HeadConfig
from core.methods import build_method
from core.targets import BaseKind
from core.training.data import (
    ClassificationExample,
    EncodedData,
    Example,
    PreferenceExample,
    forward_chunks,
)
from core.training.decoder import DECODER_FORWARD_TOKENS
from core.training.inputs import prepare_inputs
from core.training.trainer import Trainer

# Methods that train a decoder's head: LoRA's hooks, full fine-tuning's own weight copy, prompt
# tuning's virtual tokens.
DECODER_HEAD_METHODS = ("lora", "full", "prompt_tuning")


def encode_decoder_rows(
    examples: Sequence[Example],
    base: DecoderBase,
    max_length: int,
    label_names: Sequence[str] = (),
    default_margin: float = 0.0,
) -> EncodedData:
    """Every row rendered once with the base's chat template (``core.training.data.encode``'s
    result, for a decoder): a preference pair's chosen and rejected each as the assistant's
    reply to its prompt; a classification text as a user message, its ``text_pair`` as the
    reply."""
    tok, template = base.tokenizer, base.chat_template
    if isinstance(examples[0], ClassificationExample):
        rows = [e for e in examples if isinstance(e, ClassificationExample)]
        ids: list[list[int]] = [[] for _ in rows]
        singles = [i for i, e in enumerate(rows) if e.text_pair is None]
        pairs = [i for i, e in enumerate(rows) if e.text_pair is not None]
        for i, seq in zip(
            singles,
            encode_scored_turns(
                tok, template, [None] * len(singles), [rows[i].text for i in singles],
                max_length, role="user",
            ),
            strict=True,
        ):  # fmt: skip
            ids[i] = seq
        for i, seq in zip(
            pairs,
            encode_scored_turns(
                tok, template, [rows[i].text for i in pairs],
                [rows[i].text_pair or "" for i in pairs], max_length,
            ),
            strict=True,
        ):  # fmt: skip
            ids[i] = seq
        index = {name: i for i, name in enumerate(label_names)}
        return EncodedData(
            ids=[(s,) for s in ids],
            types=[([0] * len(s),) for s in ids],
            labels=torch.tensor([index[e.label] for e in rows], dtype=torch.long),
            margins=None,
            pad_id=0,
        )
    pref = [e for e in examples if isinstance(e, PreferenceExample)]
    seqs = encode_scored_turns(
        tok,
        template,
        [e.prompt for e in pref] * 2,
        [e.chosen for e in pref] + [e.rejected for e in pref],
        max_length,
    )
    n = len(pref)
    margins = [default_margin if e.margin is None else e.margin for e in pref]
    return EncodedData(
        ids=[(seqs[i], seqs[n + i]) for i in range(n)],
        types=[([0] * len(seqs[i]), [0] * len(seqs[n + i])) for i in range(n)],
        labels=None,
        margins=torch.tensor(margins, dtype=torch.float32),
        pad_id=0,
    )


def _decoder_head_config(head: HeadConfig | Mapping[str, Any]) -> HeadConfig | dict[str, Any]:
    """The head config with the decoder's pooling: a mapping gets ``pooling="last_token"``
    unless it names another (refused); a ``HeadConfig`` of the default pooling gets it too."""
    if isinstance(head, HeadConfig):
        if head.pooling == "response":
            raise ConfigError("pooling", "a decoder's head reads the last token")
        return head.model_copy(update={"pooling": "last_token"})
    params = dict(head)
    if params.setdefault("pooling", "last_token") != "last_token":
        raise ConfigError("pooling", "a decoder's head reads the last token ('last_token')")
    return params


class DecoderHeadTrainer(Trainer):
    """Fine-tunes a method + a reward or classification head on a frozen decoder base."""

    base_kind: ClassVar[BaseKind] = "decoder"
    base: DecoderBase  # type: ignore[assignment]
    model: DecoderHeadModel  # type: ignore[assignment]

    def _prepare_data(self) -> None:
        cfg = self.config
        if self.method_config.type not in DECODER_HEAD_METHODS:
            raise ConfigError(
                "type",
                f"{self.method_config.type!r} does not train a decoder base; use one of "
                f"{list(DECODER_HEAD_METHODS)}",
            )
        head_in = self._head_config_in
        task = head_in.task if isinstance(head_in, HeadConfig) else dict(head_in).get("task")
        if task not in ("classification", "reward"):
            raise ConfigError(
                "task", f"a decoder's heads are 'classification' or 'reward', not {task!r}"
            )
        inputs = prepare_inputs(
            _decoder_head_config(head_in), self._train_rows, self._val_rows, cfg
        )
        self.head_config = inputs.head
        self.held_out_examples = inputs.held_out
        self.split_rows = inputs.split_rows
        self.max_length = self._row_length(self.head_config.task)
        labels = self.head_config.label_names
        self.train_data = encode_decoder_rows(
            inputs.train, self.base, self.max_length, labels, cfg.margin
        )
        self.val_data = (
            encode_decoder_rows(inputs.val, self.base, self.max_length, labels, cfg.margin)
            if inputs.val
            else None
        )

    def _build_model(self) -> None:
        self.method = build_method(self.method_config, self.base)
        head = Head(self.head_config, self.base.config.hidden_size).to(self.base.device)
        self.model = DecoderHeadModel(self.base, self.method, head)
        self.frozen_features = False

    def _base_tensors(self) -> Iterable[Tensor]:
        return self.base.state_dict.values()

    def _step_parts(self, idx: list[int]) -> list[list[int]]:
        return forward_chunks(self.train_data, idx, DECODER_FORWARD_TOKENS)
