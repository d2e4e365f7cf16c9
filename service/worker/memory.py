"""Giving a finished job's memory back to the operating system, so an idle worker holds
little more than its base model."""

from __future__ import annotations

from typing import Any

# mallopt's parameter number for the mmap threshold (glibc malloc.h), and the threshold the
# worker sets: a training step's activations are blocks of 1-30 MiB, all above it.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def release_free_memory() -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); False where unavailable.

    Without it a cancelled or finished job's tensors are freed but glibc keeps most of the
    pages. Measured on a cancelled ``full`` MiniLM job (idle worker ~460 MiB, ~890 MiB while
    training): ~300 MiB stayed resident without it, ~20 MiB with it (together with the
    SQLite statement-cache setting in ``service.db.session``). The worker then holds little
    more than the base model between jobs; ``tests/e2e/test_faults.py`` checks it.
    """
    libc = _load_libc()
    if not libc or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))


def limit_heap_growth(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes and more from their own mappings, which are
    unmapped when freed; False where glibc's ``mallopt`` is unavailable. Call once, at start.

    glibc starts at 128 KiB but raises the threshold to the largest block freed (up to 32 MiB),
    so after the first training steps every activation tensor comes from the heap, whose freed
    pages stay resident and fragment: a worker's resident memory then creeps up step by step.
    A fixed threshold turns the dynamic raise off. The default HH-RLHF reward job (MiniLM LoRA,
    16 pairs x 128 tokens, one training thread) on a ``loraplex worker`` without it: peak RSS
    1,018 MiB after the first steps, past 2,000 MiB by step 40, 2,099 MiB at the epoch's end;
    with it, 1,156 MiB at step 40. 40 steps through the Trainer alone: 1,696 MiB without,
    1,115 MiB with (issue 15), in 953 s and 710 s on shared cores.
    """
    libc = _load_libc()
    if not libc or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))


def _load_libc() -> Any:
    """The C library via ctypes, or False where it cannot be loaded."""
    import ctypes
    import ctypes.util

    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    return _libc


_libc: Any = None
