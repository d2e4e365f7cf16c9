"""Row encoding on the real MiniLM tokenizer: the character cut changes what a row costs, never
its token ids or its prediction."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from core.base import FrozenBase
from core.errors import CoreError
from core.inference import Encoded, InferenceEngine, Row, RowEncoder
from core.inference.tokens import MAX_CHARS_PER_TOKEN
from core.pair_encoding import cut_at_word
from tests.core.inference.helpers import lora, output, reference, spy_tokenizer

PROSE = (Path(__file__).parents[3] / "README.md").read_text()
URLS = " ".join(
    f"https://example.com/a/very/long/path/segment-{i}/index.html?query=value&token=abc{i:05d}"
    "def#fragment-with-words"
    for i in range(3000)
)
LONG_WORDS = " ".join(
    ["pneumonoultramicroscopicsilicovolcanoconiosis", "Donaudampfschifffahrtsgesellschaft"] * 4000
)
CODE = "def f(x):\n    return {'key': [x ** 2 for x in range(10)]}  # comment\n" * 2000
CJK_EMOJI = "机器学习模型很好用。🙂 Ça marche très bien, naïve café! " * 3000
# Degenerate texts that hold fewer tokens than the window within the first cut: long runs of
# whitespace (dropped by the tokenizer) and words over 100 characters (one [UNK] each).
SPACES = ("word" + " " * 300) * 400
HUGE_WORDS = " ".join(["x" * 150] * 700)
TEXTS = {
    name: text[:99_000]
    for name, text in {
        "prose": PROSE * (99_000 // len(PROSE) + 1),
        "urls": URLS,
        "long_words": LONG_WORDS,
        "code": CODE,
        "cjk_emoji": CJK_EMOJI,
        "spaces": SPACES,
        "huge_words": HUGE_WORDS,
    }.items()
}


def _whole(base: FrozenBase, text: str, pair: str | None, max_length: int) -> list[int]:
    """The ids of the whole text, truncated by the tokenizer alone (no character cut)."""
    return base.tokenizer(text, pair, truncation=True, max_length=max_length)["input_ids"]  # type: ignore[operator,no-any-return]


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """(thread name, longest string handed to the tokenizer) of every tokenizer call."""
    return spy_tokenizer(monkeypatch)


@pytest.mark.parametrize("reserved", [0, 20])
def test_cut_never_changes_the_ids(real_base: FrozenBase, reserved: int) -> None:
    window = real_base.max_length - reserved
    items: list[tuple[str, str | None]] = [(text, None) for text in TEXTS.values()]
    items += [(TEXTS["prose"], "Is it any good?"), ("Is it any good?", TEXTS["urls"])]
    items += [(TEXTS["spaces"], "short answer"), ("tiny", "also tiny")]
    got = RowEncoder(real_base).encode(items, window)
    for (text, pair), enc in zip(items, got, strict=True):
        assert enc.input_ids == _whole(real_base, text, pair, window), (text[:40], pair)
        assert enc.max_length == window
        assert len(enc.token_type_ids) == len(enc.input_ids)


def test_a_long_text_costs_the_window_not_its_length(
    real_base: FrozenBase, seen: list[tuple[str, int]]
) -> None:
    bound = real_base.max_length * MAX_CHARS_PER_TOKEN
    encoded = RowEncoder(real_base).encode([(TEXTS["prose"], None)] * 64, real_base.max_length)
    # One call, each text cut to the bound (at its last word boundary).
    cut = cut_at_word(TEXTS["prose"], bound, keep_end=False)
    assert [length for _, length in seen] == [len(cut)]
    assert all(len(e.input_ids) == real_base.max_length for e in encoded)


def test_a_cut_short_of_the_window_is_widened(
    real_base: FrozenBase, seen: list[tuple[str, int]]
) -> None:
    bound = real_base.max_length * MAX_CHARS_PER_TOKEN
    text = TEXTS["huge_words"]
    RowEncoder(real_base).encode([(text, None)], real_base.max_length)
    lengths = [length for _, length in seen]
    assert lengths[:2] == [len(cut_at_word(text, n, keep_end=False)) for n in (bound, 2 * bound)]
    assert lengths[-1] < len(text)  # it stopped once the window was full


def test_predictions_of_long_texts_equal_the_whole_texts(real_base: FrozenBase) -> None:
    adapter = lora(real_base, r=4, seed=3)
    engine = InferenceEngine(real_base, device="cpu")
    engine.load("a", adapter)
    texts = [TEXTS["prose"], TEXTS["urls"], TEXTS["code"], TEXTS["spaces"]]
    results = engine.run([Row("a", text) for text in texts])
    for text, result in zip(texts, results, strict=True):
        assert output(result).tolist() == pytest.approx(
            reference(real_base, adapter, text).tolist(), abs=1e-5
        )


def test_a_row_encoded_for_another_window_is_refused(real_base: FrozenBase) -> None:
    engine = InferenceEngine(real_base, device="cpu")
    engine.load("a", lora(real_base, r=2))
    ok, wrong = (RowEncoder(real_base).encode([("hello", None)], n)[0] for n in (256, 200))
    results = engine.run([Row("a", "hello", encoded=ok), Row("a", "hello", encoded=wrong)])
    assert results[0].ok
    assert isinstance(results[1].error, CoreError)
    assert "window of 200 tokens" in str(results[1].error)


def test_threads_encode_side_by_side(real_base: FrozenBase) -> None:
    """Each call holds its tokenizer copy alone: windows set per call never leak across threads."""
    encoder = RowEncoder(real_base)
    errors: list[str] = []

    def work(window: int) -> None:
        # Batches release the GIL inside the tokenizer: on one shared tokenizer this raised
        # "Already borrowed" and gave rows of another thread's window.
        items: list[tuple[str, str | None]] = [(TEXTS["prose"][i * 50 :], None) for i in range(16)]
        for _ in range(10):
            try:
                encoded: list[Encoded] = encoder.encode(items, window)
            except RuntimeError as e:
                errors.append(str(e))
                continue
            errors.extend(
                f"{window}: {len(e.input_ids)}" for e in encoded if len(e.input_ids) != window
            )

    threads = [threading.Thread(target=work, args=(w,)) for w in (64, 128, 200, 256)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
