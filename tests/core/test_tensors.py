"""``tensor_bytes``: the one byte count behind the engine's budgets and ``Adapter.num_bytes``."""

from __future__ import annotations

import torch

from core.tensors import tensor_bytes


def test_counts_each_tensor_at_its_own_width() -> None:
    tensors = [torch.zeros(2, 5), torch.zeros(3, dtype=torch.float16), torch.zeros(0)]
    assert tensor_bytes(tensors) == 2 * 5 * 4 + 3 * 2
    assert tensor_bytes(iter(tensors)) == 46  # any iterable, read once
    assert tensor_bytes([]) == 0


def test_counts_at_the_dtype_they_will_be_cast_to() -> None:
    # What a bf16 bank will hold for fp32 LoRA pairs: half their current size.
    pair = [torch.zeros(8, 384), torch.zeros(384, 8)]
    assert tensor_bytes(pair, torch.bfloat16) == 2 * 8 * 384 * 2
    assert tensor_bytes(pair, torch.bfloat16) * 2 == tensor_bytes(pair)
