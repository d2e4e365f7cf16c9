"""Run a planned batch: one forward per group, each row's own head, one result per row.

This is the part of serving that may run off the engine's owner thread (the service's compute
pool), several plans at once. It only reads the plan and the tensors the plan names (bank
site tensors snapshotted by :class:`~core.inference.bank.MixedLoraHooks`, merged copies, built
models, head weights) and writes only the plan's own ``results``. Nothing here loads, evicts or
frees: the owner pinned every entry a plan uses until it releases the plan.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from core.encoder import NO_HOOKS, EncoderHooks
from core.heads import HeadConfig
from core.inference.residency import Resident
from core.inference.rows import Row, RowResult
from core.inference.tokens import Tokenized
from core.model import AdaptedModel

log = logging.getLogger(__name__)

# The engine's forward through the (serving) encoder: token tensors [n, L] -> pooled [n, hidden].
Encode = Callable[[dict[str, Tensor], EncoderHooks], Tensor]


class NonFiniteOutputError(ArithmeticError):
    """A row's head output is inf or NaN: its adapter's weights overflow on that input (an
    import's probe forward passed on another input). Its row's error, never its result."""


@dataclass
class Group:
    """Rows that share one forward pass, and what that pass runs with (built by ``plan``)."""

    kind: Literal["mixed", "merged", "model"]
    idx: list[int]  # positions in the plan's rows
    hooks: EncoderHooks = NO_HOOKS
    model: AdaptedModel | None = None  # kind "model": runs its own method and head


@dataclass
class Plan:
    """A batch made ready by the owner thread; :meth:`InferenceEngine.execute` runs it anywhere.

    ``results`` already holds the rows that failed while planning (unknown mode, an adapter
    that could not be loaded); ``execute`` fills in the rest.
    """

    rows: Sequence[Row]
    entries: list[Resident | None]  # per row; None: the bare base, or the row failed
    results: list[RowResult | None]  # per row
    tokens: Tokenized
    groups: list[Group]
    pinned: list[Resident]  # what ``release`` unpins
    with_features: bool


def execute_plan(plan: Plan, encode: Encode) -> list[RowResult]:
    """Every group's forward and heads; a failing group fails only its own rows."""
    for group in plan.groups:
        try:
            feats, logits = _forward(group, plan.tokens, encode)
            _finish(plan, group.idx, feats, logits)
        except Exception as exc:  # one failing group must not fail the other rows
            log.exception("inference failed for %d rows (%s)", len(group.idx), group.kind)
            for i in group.idx:
                plan.results[i] = RowResult(plan.rows[i].key, error=exc)
    assert all(r is not None for r in plan.results)
    return plan.results  # type: ignore[return-value]


def _forward(group: Group, tokens: Tokenized, encode: Encode) -> tuple[Tensor, Tensor | None]:
    """Pooled features [n, hidden], plus logits [n, k] when a built model ran its head."""
    batch = tokens.batch(group.idx)
    if group.model is None:
        return encode(batch, group.hooks), None
    feats = group.model.features(batch)
    return feats, group.model.head(feats).reshape(len(group.idx), -1)


def _finish(plan: Plan, idx: list[int], feats: Tensor, logits: Tensor | None) -> None:
    """Apply each row's own head (grouped by adapter; heads are tiny) and fill results."""
    rows, entries, results = plan.rows, plan.entries, plan.results
    with_features = plan.with_features
    feats = feats.float()
    by_key: dict[Hashable, list[int]] = {}  # adapter -> positions in ``idx``
    for j, i in enumerate(idx):
        by_key.setdefault(rows[i].key, []).append(j)
    outs: list[Tensor] = []  # per adapter key (bare base left out): [rows of that key, k]
    for key, js in by_key.items():
        if key is None:
            continue
        sel = torch.tensor(js, device=feats.device)
        if logits is not None:
            outs.append(logits.index_select(0, sel).float())
        else:
            e = entries[idx[js[0]]]
            assert e is not None and e.head_weight is not None
            outs.append(F.linear(feats.index_select(0, sel), e.head_weight, e.head_bias))
    # One device→host copy for the whole group (one sync on CUDA).
    flat = torch.cat([o.reshape(-1) for o in outs]).cpu() if outs else None
    # One check for the whole group; rows are looked at one by one only when it fails.
    finite = flat is None or bool(torch.isfinite(flat).all())
    need_feats = with_features or None in by_key
    feats_host = feats.cpu() if need_feats else None
    offset = 0
    k = 0
    for key, js in by_key.items():
        if key is None:
            assert feats_host is not None
            for j in js:
                results[idx[j]] = RowResult(None, features=feats_host[j].tolist())
            continue
        head = entries[idx[js[0]]].head  # type: ignore[union-attr]
        width = outs[k].shape[1]
        k += 1
        assert flat is not None
        block = flat[offset : offset + len(js) * width].view(len(js), width)
        offset += len(js) * width
        for j, out in zip(js, block, strict=True):
            if not finite and not bool(torch.isfinite(out).all()):
                error = NonFiniteOutputError(f"the head's output is not finite: {out.tolist()}")
                results[idx[j]] = RowResult(key, error=error)
                continue
            res = _head_result(key, head, out)
            if with_features:
                assert feats_host is not None
                res.features = feats_host[j].tolist()
            results[idx[j]] = res


def _head_result(key: Hashable, head: HeadConfig, out: Tensor) -> RowResult:
    """A row's result from its head output ``out`` ([num_labels] logits, or [1] reward; host)."""
    if head.task == "reward":
        return RowResult(key, task="reward", reward=float(out[0]))
    probs = torch.softmax(out, dim=0).tolist()
    best = int(torch.argmax(out))
    return RowResult(
        key,
        task="classification",
        logits=out.tolist(),
        probabilities=dict(zip(head.label_names, probs, strict=True)),
        label=head.label_names[best],
    )
