"""What the machine's processor does fast, for settings that say ``auto``."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

# The x86 flags that make bfloat16 matmuls fast on a CPU: AMX tiles (Sapphire Rapids and
# later) run bf16 GEMMs through oneDNN several times faster than fp32; avx512_bf16 alone has
# only dot-product instructions and is reported for the record.
BF16_CPU_FLAGS = ("amx_bf16", "amx_tile", "avx512_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def bf16_cpu_flags() -> list[str]:
    """Which of :data:`BF16_CPU_FLAGS` this CPU has (for benchmark reports)."""
    return [f for f in BF16_CPU_FLAGS if f in cpu_flags()]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``float32`` / ``bfloat16`` as named; ``auto``: bfloat16 on CUDA or on a CPU with AMX,
    float32 elsewhere (without AMX a CPU's bf16 matmuls are no faster than fp32 ones)."""
    # Both prefill and decode: SmolLM2 on 2 AMX cores (load ~5), one process alternating fp32
    # and bf16: decode step + logits 126 vs 139 ms at 1 row, 272 vs 160 at 4, 318 vs 180 at 8,
    # 481 vs 304 at 32; prefill of 1x100 tokens 1018 vs 530 ms, 8x100 2937 vs 1126. An fp32
    # copy for one-row steps would cost no memory (the base is fp32) but would need its own
    # fp32 KV cache, for a gain lost in the noise.
    if name == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and "amx_bf16" in cpu_flags())
        return torch.bfloat16 if fast else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return getattr(torch, name)
