"""How many bytes tensors take: the one count behind every memory budget in core."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def tensor_bytes(tensors: Iterable[Tensor], dtype: torch.dtype | None = None) -> int:
    """Bytes of ``tensors``' elements, as stored, or as they will be once cast to ``dtype``.

    ``dtype`` exists for budgets charged before a cast: the inference engine charges a LoRA
    pair at the bank's dtype (fp16 on GPU) while the adapter still holds it in fp32.
    """
    if dtype is not None:
        return sum(t.numel() for t in tensors) * dtype.itemsize
    return sum(t.numel() * t.element_size() for t in tensors)
