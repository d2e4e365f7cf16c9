"""The SFT and DPO objectives over a decoder's hidden states.

Logits are computed only where a loss mask is 1 (the assistant tokens), never for the whole
``[B, S, vocab]`` grid: with SmolLM2's 49,152-token vocabulary the full grid of a batch is far
larger than the model's activations, and most of it (prompts, padding) is never a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.decoder.forward import NO_HOOKS, DecoderWeights, LinearHooks, forward, logits


@dataclass(frozen=True)
class Targets:
    """The masked positions of a batch: their logits, the tokens they predict, their rows."""

    logits: Tensor  # [N, vocab]
    tokens: Tensor  # [N]
    rows: Tensor  # [N], the batch row of each target


def targets(
    weights: DecoderWeights, hidden: Tensor, input_ids: Tensor, loss_mask: Tensor
) -> Targets:
    """Position ``t`` predicts token ``t + 1``; only tokens with ``loss_mask`` 1 are kept."""
    where = loss_mask[:, 1:].bool()
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(where)
    return Targets(logits(weights, hidden[:, :-1][where]), input_ids[:, 1:][where], rows[where])


def sft_loss(t: Targets) -> Tensor:
    """Mean token cross-entropy over every target in the batch; 0 (still differentiable) for
    a batch with none, where the mean would be 0/0 = NaN."""
    if t.tokens.numel() == 0:
        return t.logits.float().sum() * 0.0
    return F.cross_entropy(t.logits.float(), t.tokens)


def token_accuracy(t: Targets) -> Tensor:
    """Share of targets whose greedy prediction is the target token."""
    return (t.logits.argmax(-1) == t.tokens).float().mean()


def sequence_logprobs(t: Targets, batch_size: int) -> Tensor:
    """``[B]``: each row's summed log-probability of its target tokens."""
    token_lp = -F.cross_entropy(t.logits.float(), t.tokens, reduction="none")
    return torch.zeros(batch_size, device=token_lp.device).index_add(0, t.rows, token_lp)


@dataclass(frozen=True)
class DpoLoss:
    loss: Tensor  # scalar, the mean over pairs
    chosen_rewards: Tensor  # [B]: beta * (policy - reference) log-prob of the chosen reply
    rejected_rewards: Tensor  # [B]: the same for the rejected reply


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    reference_chosen: Tensor,
    reference_rejected: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> DpoLoss:
    """The sigmoid DPO loss (Rafailov et al. 2023) over per-pair summed log-probabilities.

    With ``label_smoothing`` ε the preference label is taken to be wrong with probability ε
    (conservative DPO, as TRL's ``sigmoid`` loss does).
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    margin = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return DpoLoss(losses.mean(), chosen.detach(), rejected.detach())


def reply_logprobs(
    weights: DecoderWeights,
    input_ids: Tensor,
    attention_mask: Tensor,
    loss_mask: Tensor,
    hooks: LinearHooks = NO_HOOKS,
    prefix: Tensor | None = None,
) -> Tensor:
    """``[B]``: each row's summed log-probability of its masked (reply) tokens.

    Called with the adapter's hooks (and prompt tuning's ``prefix``) for DPO's policy, and
    under ``torch.no_grad()`` with neither for its reference: the same frozen base with the
    adapter switched off, so the reference costs no second copy of the model.
    """
    hidden = forward(weights, input_ids, attention_mask, hooks=hooks, prefix=prefix)
    return sequence_logprobs(targets(weights, hidden, input_ids, loss_mask), input_ids.shape[0])
