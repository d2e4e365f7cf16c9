"""Text from generated tokens, a piece at a time, and stop strings found in that text.

Incremental detokenization (the scheme of TGI and vLLM): decode a short window of recent
tokens with and without the newest one and emit the difference. A byte-level tokenizer splits
multi-byte characters across tokens; a window that decodes to a trailing U+FFFD holds an
incomplete character, so nothing is emitted until the character's last byte arrives.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feeds on one sequence's generated ids; :meth:`push` returns only complete new text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here: context for the tokenizer's spacing rules
        self._read = 0  # ids before this are already emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before) :]
        return ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StopStrings:
    """Finds the first stop string in a stream of text pieces, never emitting any part of it.

    Text that could be the start of a stop string is held back until the next piece shows
    whether it is; :meth:`flush` releases it when the sequence ends for another reason.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """``(text safe to emit, whether a stop string ended the sequence)``."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        hold = self._partial_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[len(text) - k :]):
                    longest = k
                    break
        return longest
