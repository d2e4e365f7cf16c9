"""Lending the embedded worker's cores to generation while nothing else computes on them.

``loraplex serve`` with its embedded worker splits a CPU's cores: the serving budget
(``LORAPLEX_TORCH_THREADS``, half the cores) and the worker's (``LORAPLEX_TRAIN_THREADS``, the
other half). While the worker trains, a generation step on more threads than the budget is
slower than on the budget, since its extra threads wait on cores the trainer holds; while the
worker idles, its cores sit unused and generation on all of them is faster. 8 streaming chat
completions on SmolLM2, fp32, 2 cores of an avx512f Xeon (``python -m
bench.serving_under_training --generate --concurrency 8 --seconds 30 [--generation-threads
2]``): on 1 thread 51.8 tokens/s idle and 51.6 beside a LoRA job, TTFT p50 651 and 666 ms; on
2 threads 58.3 idle (494 ms) but 46.9 beside the job (804 ms).

So each generation step asks :class:`CoreLender` for its thread count: the budget plus the
worker's cores when the worker process has been idle and no other serving engine (the
encoder's batcher, a decoder's scorer) has computed for a moment, else the budget, so that
neither a training job nor another tenant's ``/predict`` shares a core with generation's
extra threads for longer than one sampling window. The same bench with it (the default):
58.6 tokens/s idle (498 ms), 52.3 beside the job (654 ms), the job's steps/s unchanged, and
2 closed-loop ``/predict`` clients beside the 8 streams at 1.39x their p99 alone, against
1.46x with generation on the budget alone (``--generation-threads 1``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# How often the worker's CPU time is sampled, and the share of one core over a window that
# counts as busy: an idle worker polls the database and writes heartbeats (well under 1%); a
# training one uses its threads' worth.
WINDOW_S = 0.5
BUSY_CORE_SHARE = 0.2


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system, every thread) process ``pid`` has used; None where it is
    gone or ``/proc`` does not exist (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # After the command name in parentheses (any bytes, spaces and parentheses included),
    # field 3 (state) comes first, so fields 14 (utime) and 15 (stime) are at 11 and 12.
    fields = stat.rpartition(b")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcessActivity:
    """Whether a process used at least :data:`BUSY_CORE_SHARE` of a core over the last
    :data:`WINDOW_S`; ``pid`` is asked each time, so a restarted worker is followed. Unknown
    (no pid yet, no ``/proc``, no recent sample) counts as busy: cores are lent only when
    known to be idle."""

    def __init__(
        self, pid: Callable[[], int | None], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._pid = pid
        self._clock = clock
        self._lock = threading.Lock()  # one sample at a time, whichever thread asks
        self._sample: tuple[int, float, float] | None = None  # pid, wall, cpu
        self._busy = True

    def busy(self) -> bool:
        now = self._clock()
        with self._lock:
            if self._sample is not None and now - self._sample[1] < WINDOW_S:
                return self._busy
            pid = self._pid()
            cpu = cpu_seconds(pid) if pid is not None else None
            if pid is None or cpu is None:
                self._sample, self._busy = None, True
                return True
            last = self._sample
            # A first sample, a new process, or one from long ago (generation idled): over a
            # long gap a job that started a moment ago would average out as idle.
            if last is None or last[0] != pid or now - last[1] > 2 * WINDOW_S:
                self._busy = True
            else:
                self._busy = cpu - last[2] >= BUSY_CORE_SHARE * (now - last[1])
            self._sample = (pid, now, cpu)
            return self._busy


class CoreLender:
    """The threads a generation step may use: ``budget``, plus ``spare`` while every one of
    ``busy`` says no."""

    def __init__(self, budget: int, spare: int, busy: Sequence[Callable[[], bool]]) -> None:
        self.budget = budget
        self.spare = spare
        self._busy = list(busy)

    def threads(self) -> int:
        if self.spare and not any(check() for check in self._busy):
            return self.budget + self.spare
        return self.budget
