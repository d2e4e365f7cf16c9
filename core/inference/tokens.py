"""Rows to token ids (any thread, bounded by the window), then padded tensors per forward pass.

A row costs at most its window to tokenize, not its length: texts are cut by characters before
the tokenizer sees them (:data:`MAX_CHARS_PER_TOKEN`), at a word boundary as reward rows are
(:func:`core.pair_encoding.cut_at_word`: a word cut inside the window would change its ids), and a
cut that left fewer tokens than the window is widened until it fills the window or the text
ends, so the ids are always those of the whole text truncated to the window (one exception,
see :meth:`RowEncoder.encode`).

Who tokenizes. A :class:`RowEncoder` may be called from many threads at once: Hugging Face fast
tokenizers are not (each call sets the truncation state of the shared Rust object), so every
call tokenizes on a copy no other thread holds meanwhile. The service tokenizes in each
request's thread and hands the engine :class:`Encoded` rows, so the engine's owner thread never
tokenizes (docs/architecture.md invariant 3); rows given as bare text are encoded in ``plan``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from typing import Any

import torch
from torch import Tensor

from core.base import FrozenBase
from core.inference.rows import Encoded
from core.pair_encoding import MAX_CHARS_PER_TOKEN, cut_at_word, encode_responses

Item = tuple[str, str | None]  # (text, text_pair or None)


def encode_batch(tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int) -> Any:
    """Where a classification row meets the tokenizer (its arguments are what it costs): no
    padding. A reward model's rows go through :meth:`RowEncoder.encode_responses`."""
    return tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)


class TokenizerCopies:
    """Copies of one tokenizer, lent one thread at a time (:meth:`borrow`).

    Copies are made when first needed, at most ``copies`` (each ~6 MiB and ~25 ms to make for
    MiniLM); past that a borrower waits for one. A few are enough: one batch call already
    spreads over every core inside the tokenizer.
    """

    def __init__(self, tokenizer: Any, copies: int = 4) -> None:
        self._tokenizer = tokenizer
        self._copies = copies
        self._made = 0
        self._lock = threading.Lock()
        self._free: queue.LifoQueue[Any] = queue.LifoQueue()

    @contextmanager
    def borrow(self) -> Iterator[Any]:
        try:
            tokenizer = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._made < self._copies
                self._made += make
            tokenizer = deepcopy(self._tokenizer) if make else self._free.get()
        try:
            yield tokenizer
        finally:
            self._free.put(tokenizer)


class RowEncoder:
    """Token ids of rows, on any thread: each call borrows a tokenizer copy no other thread
    uses (:class:`TokenizerCopies`)."""

    def __init__(self, base: FrozenBase, copies: int = 4) -> None:
        self._copies = TokenizerCopies(base.tokenizer, copies)
        self._tokenizer = self._copies.borrow

    def count(self, text: str, pair: str | None) -> int:
        """Tokens of the whole input, special tokens included (nothing is cut)."""
        with self._tokenizer() as tokenizer:
            return len(tokenizer(text, pair, truncation=False)["input_ids"])

    def encode(self, items: Sequence[Item], max_length: int) -> list[Encoded]:
        """Each item's ids truncated to ``max_length``, as the tokenizer gives them for the
        whole text; the characters it reads per item are bounded by the window.

        The exception: a pair whose texts are both cut and both longer than the window. The
        tokenizer then gives each text half the window, and an odd window's last position to
        the longer text, which only the whole texts tell; here it goes to the longer cut.
        """
        bound = [max_length * MAX_CHARS_PER_TOKEN] * len(items)
        out: list[Encoded | None] = [None] * len(items)
        todo = list(range(len(items)))
        while todo:
            for is_pair in (False, True):  # the fast tokenizer cannot mix pairs and singles
                idx = [i for i in todo if (items[i][1] is not None) == is_pair]
                if not idx:
                    continue
                texts = [cut_at_word(items[i][0], bound[i], keep_end=False) for i in idx]
                pairs: list[str] | None = None
                if is_pair:
                    pairs = [cut_at_word(items[i][1] or "", bound[i], keep_end=False) for i in idx]
                with self._tokenizer() as tokenizer:
                    enc = encode_batch(tokenizer, texts, pairs, max_length)
                for k, i in enumerate(idx):
                    ids = enc["input_ids"][k]
                    out[i] = Encoded(ids, enc["token_type_ids"][k], max_length)
            todo = [i for i in todo if self._cut_short(items[i], bound[i], out[i], max_length)]
            for i in todo:
                bound[i] *= 2
        return [e for e in out if e is not None]

    def encode_responses(self, items: Sequence[Item], max_length: int) -> list[Encoded]:
        """A reward model's rows, ``(prompt, response)`` or ``(response, None)``, encoded as
        training encodes them: the response kept, the prompt cut from its start
        (:func:`core.pair_encoding.encode_responses`, the trainer's own function)."""
        prompts = [text if pair is not None else None for text, pair in items]
        responses = [pair if pair is not None else text for text, pair in items]
        with self._tokenizer() as tokenizer:
            encoded = encode_responses(tokenizer, prompts, responses, max_length)
        return [Encoded(ids, types, max_length) for ids, types in encoded]

    @staticmethod
    def _cut_short(item: Item, bound: int, enc: Encoded | None, max_length: int) -> bool:
        """A text was cut, yet the window is not full: the cut may have dropped tokens."""
        assert enc is not None
        cut = len(item[0]) > bound or len(item[1] or "") > bound
        return cut and len(enc.input_ids) < max_length


class Tokenized:
    """Token ids of a batch's rows, padded into tensors for any subset of them."""

    def __init__(self, pad_token_id: int, device: torch.device) -> None:
        self._pad = pad_token_id
        self._device = device
        self._rows: dict[int, Encoded] = {}
        self._response: dict[int, bool] = {}

    def add(
        self, rows: Sequence[int], encoded: Sequence[Encoded], response_pooled: bool = False
    ) -> None:
        """``response_pooled``: their head reads the mean over the response's tokens."""
        for row, enc in zip(rows, encoded, strict=True):
            self._rows[row] = enc
            self._response[row] = response_pooled

    def batch(self, rows: Sequence[int]) -> dict[str, Tensor]:
        """Tensors for ``rows`` in this order, padded to their longest row, on the device;
        ``response_rows`` says which rows pool over their response."""
        encs = [self._rows[r] for r in rows]
        width = max(len(e.input_ids) for e in encs)
        ids = [e.input_ids + [self._pad] * (width - len(e.input_ids)) for e in encs]
        types = [e.token_type_ids + [0] * (width - len(e.token_type_ids)) for e in encs]
        mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in encs]
        out = {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "token_type_ids": torch.tensor(types, dtype=torch.long),
            "response_rows": torch.tensor([self._response[r] for r in rows], dtype=torch.bool),
        }
        return {k: v.to(self._device, non_blocking=True) for k, v in out.items()}
