"""``mode=auto``: merged weights for a dominant adapter, mixed unmerged batches otherwise.

Merging (``W + scale·B@A`` for the targeted linears) removes the low-rank side path, which is
only worth its extra memory and a separate forward when one adapter takes nearly all of the
traffic. The policy looks at the last ``window`` rows served: an adapter whose share reaches
``threshold`` is served merged; every other auto row joins the mixed batch, where any number
of adapters share one base matmul.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from core.inference.rows import ForwardMode

# What a client asks for (``?mode=``): a forward mode, or ``auto`` to let this policy choose one.
RequestMode = Literal["auto", "unmerged", "merged"]


class AutoModePolicy:
    def __init__(self, window: int = 512, threshold: float = 0.9) -> None:
        self.window = window
        self.threshold = threshold
        self._recent: deque[Hashable | None] = deque(maxlen=window)
        self._counts: Counter[Hashable | None] = Counter()

    def observe(self, key: Hashable | None) -> None:
        if len(self._recent) == self.window:
            old = self._recent[0]
            self._counts[old] -= 1
            if not self._counts[old]:
                del self._counts[old]
        self._recent.append(key)
        self._counts[key] += 1

    def mode_for(self, key: Hashable | None) -> ForwardMode:
        """``merged`` if ``key`` dominates the window (and the window is full enough)."""
        if key is None or len(self._recent) < self.window // 4:
            return "unmerged"
        share = self._counts.get(key, 0) / len(self._recent)
        return "merged" if share >= self.threshold else "unmerged"
