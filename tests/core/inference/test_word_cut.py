"""A long classification text is cut by characters at a word boundary before it is tokenized:
a cut inside a word that the window holds would change that word's ids (and the prediction)."""

from __future__ import annotations

from core.base import FrozenBase
from core.inference import RowEncoder
from core.inference.tokens import MAX_CHARS_PER_TOKEN

WINDOW = 128  # the first cut reads 2,560 characters
# 24 words over 100 characters (one [UNK] each) and 101 dots: 125 tokens in 2,550 characters,
# so the first cut ends 10 characters into the next word, which the window still holds.
PREFIX = ("a" * 101 + " ") * 24 + "." * 101 + " "


def _whole(base: FrozenBase, text: str, pair: str | None) -> list[int]:
    return base.tokenizer(text, pair, truncation=True, max_length=WINDOW)["input_ids"]  # type: ignore[operator,no-any-return]


def test_a_cut_inside_a_word_in_the_window_keeps_the_whole_texts_ids(
    real_base: FrozenBase,
) -> None:
    b, c = PREFIX + "b" * 150 + " tail", PREFIX + "c" * 150 + " tail"
    assert len(PREFIX) < WINDOW * MAX_CHARS_PER_TOKEN < len(PREFIX) + 150
    # Whole, both last words are one [UNK] (100): the two texts' windows hold the same ids.
    assert _whole(real_base, b, None) == _whole(real_base, c, None)
    assert _whole(real_base, b, None)[-2:] == [100, 102]

    items: list[tuple[str, str | None]] = [(b, None), (c, None), ("q", b), (c, "q")]
    got = RowEncoder(real_base).encode(items, WINDOW)
    for (text, pair), enc in zip(items, got, strict=True):
        assert enc.input_ids == _whole(real_base, text, pair), (text[-20:], pair)
    assert got[0].input_ids == got[1].input_ids
