"""What the machine's processor does fast, for settings that say ``auto``, and threads."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# The x86 flags that make bfloat16 matmuls fast on a CPU: AMX tiles (Sapphire Rapids and
# later) run bf16 GEMMs through oneDNN several times faster than fp32; avx512_bf16's
# dot-product instructions about twice as fast (SmolLM2's q_proj at 32 rows, AMD EPYC: 201 vs
# 99 us).
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
    """``float32`` / ``bfloat16`` as named; ``auto``: bfloat16 on CUDA or on a CPU with AMX or
    avx512_bf16, float32 elsewhere (without them a CPU's bf16 matmuls are no faster)."""
    # Both prefill and decode: SmolLM2 on 2 AMX cores (load ~5), one process alternating fp32
    # and bf16: decode step + logits 126 vs 139 ms at 1 row, 272 vs 160 at 4, 318 vs 180 at 8,
    # 481 vs 304 at 32; prefill of 1x100 tokens 1018 vs 530 ms, 8x100 2937 vs 1126. An fp32
    # copy for one-row steps would cost no memory (the base is fp32) but would need its own
    # fp32 KV cache, for a gain lost in the noise.
    # On avx512_bf16 without AMX, with the KV cache in fp32 (kv_dtype), AMD EPYC, 2 cores at
    # load 1, one process alternating 7 times: decode step + logits at 32 rows 167 ms fp32 vs
    # 104 bf16 (203 with a bf16 cache), at 8 rows 88 vs 56, at 1 row 57 vs 45 (at load 2:
    # 254 vs 180 at 32 rows); prefill of 1x100 tokens 485 vs 198 ms.
    if name == "auto":
        flags = cpu_flags() if device.type == "cpu" else frozenset()
        fast = device.type == "cuda" or "amx_bf16" in flags or "avx512_bf16" in flags
        return torch.bfloat16 if fast else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return getattr(torch, name)


def one_thread_below(dtype: torch.dtype, device: torch.device) -> int:
    """Generation passes (a decode step's rows, a prefill's packed prompt tokens) of fewer
    tokens than this run on one torch thread whatever the step's count; 0 = none do.

    bf16 on a CPU with AMX: oneDNN's bf16 matmul of a few dozen rows gains nothing from a
    second thread (SmolLM2's 576 -> 1536 linear on 2 Xeon cores, one thread against two: 220
    vs 222 GFLOP/s at 32 rows, 529 vs 556 at 100, 1,114 vs 1,817 at 1,024), while each of a
    pass's ~1,000 kernels pays to wake it. SmolLM2 there, one thread against two: a decode
    step + logits of 32 rows 67-76 vs 100-113 ms; a prefill and its first token (one
    process alternating, best of 3) 102 vs 174 ms for one 100-token prompt, 211 vs 303 for
    4 x 100, 311 vs 380 for one of 500, but 677 vs 602 for one of 1,000 and 609 vs 559 for
    4 x 250. Elsewhere a second thread pays for itself (fp32 on 2 AMD EPYC cores: a 32-row
    step 1.37x faster on two), and the AMX figures say nothing of more cores than two, so
    passes there keep the step's count.

    Nor does bf16 on avx512_bf16 without AMX (2 AMD EPYC cores) gain: a decode step + logits of
    one row took 46 vs 58 ms on one thread against two in a first A/B (medians of 9,
    alternating), 69 vs 69 ms in a rerun, and the scheduler itself with passes of fewer than 8
    tokens on one thread (every step of 1 to 7 streams) against none, one process alternating
    6 times, 100-token prompts: one stream's step 62.9 vs 62.0 ms, 8 streams' 71.8 vs 67.0.
    """
    if dtype == torch.bfloat16 and device.type == "cpu" and "amx_bf16" in cpu_flags():
        return 768
    return 0


def kv_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of generation's KV cache and attention for weights in ``dtype``: theirs,
    except bfloat16 on a CPU without AMX, where it is float32.

    There PyTorch's CPU attention kernel runs bf16 several times slower than fp32 (one decode
    step of SmolLM2, 32 rows of 250 tokens, AMD EPYC with avx512_bf16: 814 vs 187 ms of
    attention over 3 steps), more than the bf16 linears save. With AMX it was measured in bf16
    throughout (the figures in :func:`resolve_dtype`), where a bf16 cache holds twice the
    sequences."""
    if dtype == torch.bfloat16 and device.type == "cpu" and "amx_bf16" not in cpu_flags():
        return torch.float32
    return dtype


def set_thread_torch_threads(threads: int) -> None:
    """Make the calling thread's torch ops run on ``threads`` intra-op threads.

    ``torch.set_num_threads`` alone does not last in a thread that has not run torch yet: its
    first torch call sets the thread's count to the last count any thread set (PyTorch's lazy
    per-thread init), so a thread started beside others that set theirs could end up with
    theirs. Reading the count first runs that init now.
    """
    torch.get_num_threads()
    torch.set_num_threads(threads)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block's torch ops on ``threads`` intra-op threads, then restore the calling
    thread's count (OpenMP's and MKL's counts are per thread: other threads keep theirs)."""
    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
