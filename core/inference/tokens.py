"""Tokenize a batch once per input shape, then cut sub-batches for each forward pass.

Rows are tokenized in as few tokenizer calls as possible: one per (has text pair, reserved
positions) group, because the fast tokenizer cannot mix pairs and singles in one call and prompt
tuning truncates shorter. Forward passes then take any subset of rows, padded only to the
longest row in that subset (dynamic padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.base import FrozenBase

_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class _Group:
    tensors: dict[str, Tensor]  # [n, L] on CPU
    lengths: list[int]


class Tokenized:
    """Token tensors of a batch's rows, addressable by row index."""

    def __init__(self, base: FrozenBase, device: torch.device) -> None:
        self._base = base
        self._device = device
        self._groups: list[_Group] = []
        self._where: dict[int, tuple[int, int]] = {}  # row → (group, position in group)
        self._members: list[list[int]] = []

    def add_group(
        self, rows: Sequence[int], texts: list[str], pairs: list[str] | None, max_length: int
    ) -> None:
        """Tokenize one group (truncated to ``max_length``, padded to its longest row)."""
        enc = self._base.tokenize(texts, pairs, max_length=max_length)
        lengths = enc["attention_mask"].sum(1).tolist()
        gid = len(self._groups)
        self._groups.append(_Group(enc, lengths))
        self._members.append(list(rows))
        for pos, row in enumerate(rows):
            self._where[row] = (gid, pos)

    def batch(self, rows: Sequence[int]) -> dict[str, Tensor]:
        """Tensors for ``rows`` in this order, padded to their longest row, on the device."""
        where = [self._where[r] for r in rows]
        gids = {g for g, _ in where}
        if len(gids) == 1:
            gid = next(iter(gids))
            if list(rows) == self._members[gid]:  # the common case: no copy at all
                return self._to_device(self._groups[gid].tensors)
        width = max(self._groups[g].lengths[p] for g, p in where)
        pad = self._base.config.pad_token_id
        out = {
            "input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
            "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
            "token_type_ids": torch.zeros(len(rows), width, dtype=torch.long),
        }
        for gid in gids:
            dst = [i for i, (g, _) in enumerate(where) if g == gid]
            src = torch.tensor([where[i][1] for i in dst])
            dst_t = torch.tensor(dst)
            group = self._groups[gid].tensors
            w = min(width, group["input_ids"].shape[1])
            for name in _FIELDS:
                out[name][dst_t, :w] = group[name].index_select(0, src)[:, :w]
        return self._to_device(out)

    def _to_device(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: tensors[k].to(self._device, non_blocking=True) for k in _FIELDS}
