"""Text from generated tokens, a piece at a time, and stop strings found in that text.

Incremental detokenization (the scheme of TGI and vLLM): decode a short window of recent
tokens with and without the newest one and emit the difference. A byte-level tokenizer splits
multi-byte characters across tokens; a window that decodes to a trailing U+FFFD holds an
incomplete character, so nothing is emitted until the character's last byte arrives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
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
        # Without Hugging Face's clean-up of spaces, whatever the tokenizer's own setting:
        # it rewrites text already decoded (" 's" -> "'s"), so a window's text would no longer
        # begin with the previous window's and characters would be lost from the difference.
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


class TokenBytes:
    """Each token's own bytes, for logprobs: a byte-level BPE token may hold part of a UTF-8
    character (SmolLM2 splits 🍕 into three), which as text is U+FFFD whatever its bytes.

    A byte-level vocabulary entry spells one byte per character (GPT-2's byte-to-unicode
    table); a SentencePiece entry is text with ``▁`` for a space, or ``<0xNN>`` for one byte
    (byte fallback); an added token (``<|im_end|>``) is its text.
    """

    _BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import pre_tokenizers

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and isinstance(
            backend.pre_tokenizer, pre_tokenizers.ByteLevel
        )
        self.byte_of: dict[str, int] | None = None  # a byte-level entry's character -> byte
        if byte_level:
            from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

            self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self.added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}

    def __call__(self, ids: Sequence[int]) -> list[bytes]:
        pieces = self.tokenizer.convert_ids_to_tokens(list(ids))
        return [self._bytes(i, piece) for i, piece in zip(ids, pieces, strict=True)]

    def _bytes(self, token_id: int, piece: str) -> bytes:
        if token_id in self.added:
            return self.added[token_id].encode()
        if self.byte_of is not None:
            return bytes(self.byte_of[c] for c in piece)
        byte = self._BYTE.fullmatch(piece)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("▁", " ").encode()


def token_text(piece: bytes) -> str:
    """A token's name in logprobs: its text, or where its bytes are not whole UTF-8 characters,
    ``bytes:`` and their escapes (``bytes:\\xf0\\x9f``), as OpenAI's API names such tokens,
    so alternatives with different bytes keep different names."""
    try:
        return piece.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in piece)


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
