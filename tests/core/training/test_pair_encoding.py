"""How preference pairs become token ids: the response is kept, the prompt is cut from its
start, whole dialogues are split at their shared turns, and nothing collapses silently."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.base import FrozenBase
from core.heads import HeadConfig
from core.pair_encoding import (
    MAX_CHARS_PER_TOKEN,
    PROMPT_SHARE,
    bounded_ids,
    encode_responses,
    split_shared_prefix,
)
from core.training.config import TrainingConfig
from core.training.data import (
    EncodedData,
    PreferenceExample,
    coerce_examples,
    encode,
    split_dialogues,
)
from core.training.inputs import prepare_inputs
from core.training.trainer import Trainer

# Words the tiny tokenizer holds whole: one token each.
WORDS = "the a an and or not is was were this that it movie film story actor plot".split()  # noqa: SIM905


def _words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_truncation_keeps_the_response_and_cuts_the_prompt_from_the_left(
    tiny_base: FrozenBase,
) -> None:
    tok = tiny_base.tokenizer
    prompt, response = _words(100), "good fun"
    [(ids, types)] = encode_responses(tok, [prompt], [response], 32)
    p, r = _ids(tok, prompt), _ids(tok, response)
    kept = 32 - 3 - len(r)  # [CLS] prompt [SEP] response [SEP]
    assert ids == [tok.cls_token_id, *p[-kept:], tok.sep_token_id, *r, tok.sep_token_id]
    assert types == [0] * (kept + 2) + [1] * (len(r) + 1)
    # The tokenizer's own truncation kept the start of the prompt instead.
    right = tok(prompt, response, truncation="only_first", max_length=32)["input_ids"]
    assert right[1:4] == p[:3] and ids[1:4] != p[:3]


def test_a_long_response_leaves_the_prompt_its_share(tiny_base: FrozenBase) -> None:
    tok = tiny_base.tokenizer
    prompt, response = _words(100), _words(100, offset=5)
    [(ids, types)] = encode_responses(tok, [prompt], [response], 40)
    budget = 40 - 3
    share = budget // PROMPT_SHARE
    p, r = _ids(tok, prompt), _ids(tok, response)
    assert ids == [
        tok.cls_token_id,
        *p[-share:],
        tok.sep_token_id,
        *r[: budget - share],
        tok.sep_token_id,
    ]
    assert types.count(0) == share + 2 and len(ids) == 40
    # A short prompt is kept whole and the response takes the rest.
    [(ids, _)] = encode_responses(tok, ["plot"], [response], 40)
    assert ids[1:3] == [*_ids(tok, "plot"), tok.sep_token_id] and len(ids) == 40


def test_a_response_without_prompt_keeps_its_start(tiny_base: FrozenBase) -> None:
    tok = tiny_base.tokenizer
    response = _words(100)
    [(ids, types)] = encode_responses(tok, [None], [response], 16)
    assert ids == tok(response, truncation=True, max_length=16)["input_ids"]
    assert types == [0] * 16


@pytest.mark.parametrize("keep_end", [False, True])
def test_the_character_cut_never_changes_the_ids(tiny_base: FrozenBase, keep_end: bool) -> None:
    tok = tiny_base.tokenizer
    texts = [
        _words(5000),
        ("movie" + " " * 400) * 300,  # whitespace runs: the first cut holds too few tokens
        "plot",
    ]
    got = bounded_ids(tok, texts, 50, keep_end)
    for text, ids in zip(texts, got, strict=True):
        whole = _ids(tok, text)
        assert ids == (whole[-50:] if keep_end else whole[:50])


@pytest.mark.parametrize("prompt", ["字" * 100_000, "https://a.io/" + "plot/" * 20_000])
def test_a_prompt_without_whitespace_costs_its_window_not_its_length(
    tiny_base: FrozenBase, prompt: str
) -> None:
    """CJK text or one long URL has no word boundary to cut at: it is cut by characters, so
    the tokenizer reads about the window's worth of it, and the response is kept whole."""
    read: list[int] = []

    class Spy:
        def __init__(self, tokenizer: Any) -> None:
            self._tokenizer = tokenizer

        def __call__(self, texts: list[str], **kwargs: Any) -> Any:
            read.append(max(map(len, texts)))
            return self._tokenizer(texts, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._tokenizer, name)

    response = _words(10)
    [(ids, types)] = encode_responses(Spy(tiny_base.tokenizer), [prompt], [response], 64)
    assert read and max(read) <= 64 * MAX_CHARS_PER_TOKEN
    assert len(ids) == 64 and types.count(1) == 11  # the response and its [SEP]
    assert ids[-11:-1] == _ids(tiny_base.tokenizer, response)


def _dialogue(turns: list[tuple[str, str]]) -> str:
    return "".join(f"\n\n{who}: {text}" for who, text in turns)


def test_responses_differing_only_after_position_128_stay_distinguishable(
    tiny_base: FrozenBase,
) -> None:
    """HH-style rows: one long dialogue whose final answers share their first 150 tokens. At
    256 tokens (MiniLM's limit) the two stay apart; at the default 128 they cannot, and the
    pair is counted as one input instead of passing silently."""
    history = [("Human", _words(60)), ("Assistant", _words(80, 3)), ("Human", _words(40, 7))]
    shared = _words(150, 2)
    row = {
        "chosen": _dialogue([*history, ("Assistant", f"{shared} good")]),
        "rejected": _dialogue([*history, ("Assistant", f"{shared} bad")]),
    }
    tok = tiny_base.tokenizer
    old = [tok(row[k], truncation=True, max_length=256)["input_ids"] for k in row]
    assert old[0] == old[1]  # as the tokenizer truncates, the two are one input
    rows, split = split_dialogues(coerce_examples([row], "reward"))
    assert split == 1
    data = encode(rows, tok, 256)
    chosen, rejected = data.ids[0]
    assert chosen != rejected and data.identical_pairs() == 0
    assert chosen[-2] == _ids(tok, "good")[0] and rejected[-2] == _ids(tok, "bad")[0]
    default = TrainingConfig().resolved_max_seq_length("reward")
    assert encode(rows, tok, default).identical_pairs() == (1 if default <= 150 else 0)


def test_split_finds_the_last_shared_turn_boundary() -> None:
    history = _dialogue([("Human", "is it good"), ("Assistant", "yes"), ("Human", "why")])
    got = split_shared_prefix(
        f"{history}\n\nAssistant: it is fun", f"{history}\n\nAssistant: it is not"
    )
    assert got == (history.strip() + "\n\nAssistant:", "it is fun", "it is not")
    # Dialogues that part in an earlier turn keep the rest of each as its response.
    a = _dialogue([("Human", "hi"), ("Assistant", "hello"), ("Human", "ok"), ("Assistant", "x")])
    b = _dialogue([("Human", "hi"), ("Assistant", "go away"), ("Human", "ok"), ("Assistant", "x")])
    assert split_shared_prefix(a, b) == (
        "Human: hi\n\nAssistant:",
        "hello\n\nHuman: ok\n\nAssistant: x",
        "go away\n\nHuman: ok\n\nAssistant: x",
    )
    # No shared turn boundary, or an empty response: left as given.
    assert split_shared_prefix("the movie was good", "the movie was bad") is None
    assert split_shared_prefix(f"{history}\n\nAssistant:", f"{history}\n\nAssistant: no") is None


def test_rows_with_a_prompt_are_left_alone_and_the_split_can_be_switched_off() -> None:
    dialogue = _dialogue([("Human", "is it good")])
    rows = [
        {"chosen": f"{dialogue}\n\nAssistant: yes", "rejected": f"{dialogue}\n\nAssistant: no"},
        {
            "prompt": "a question",
            "chosen": f"{dialogue}\n\nAssistant: yes",
            "rejected": f"{dialogue}\n\nAssistant: no",
        },
    ]
    head = {"task": "reward"}
    on = prepare_inputs(head, rows, rows, TrainingConfig())
    assert on.split_rows == 2  # the first row, in training and in validation
    assert on.train[0] == PreferenceExample("yes", "no", "Human: is it good\n\nAssistant:")
    assert on.train[1] == PreferenceExample(rows[1]["chosen"], rows[1]["rejected"], "a question")
    off = prepare_inputs(head, rows, rows, TrainingConfig(split_shared_prefix=False))
    assert off.split_rows == 0 and off.train[0].prompt is None  # type: ignore[union-attr]


def test_the_trainer_reports_split_and_identical_pairs(tiny_base: FrozenBase) -> None:
    dialogue = _dialogue([("Human", "is it good")])
    rows = [
        {"chosen": f"{dialogue}\n\nAssistant: yes", "rejected": f"{dialogue}\n\nAssistant: no"},
        {"chosen": "The movie", "rejected": "the   MOVIE"},  # one input once lower-cased
        {"chosen": "good", "rejected": "bad"},
    ]
    trainer = Trainer(
        tiny_base, {"type": "lora"}, {"task": "reward"}, rows * 3, None, {"max_steps": 1}
    )
    trainer.setup()
    assert trainer.pair_report() == {"split_rows": 3, "identical_pairs": 3}
    assert trainer.head_config.pooling == "response"  # a new reward head reads its response


@pytest.mark.parametrize("pooling", ["response", "base"])
def test_serving_scores_a_pair_as_training_encoded_it(tiny_base: FrozenBase, pooling: str) -> None:
    """The engine (rows as text) and the service (rows encoded by RowEncoder in the request's
    thread) encode a reward model's rows with the trainer's function and pool them as its head
    says, also beside a classifier's and the bare base's rows in one mixed forward."""
    from dataclasses import replace

    from core.inference import InferenceEngine, Row, RowEncoder
    from tests.core.inference.helpers import lora, reference

    base_head = lora(tiny_base, r=4, n_labels=None)
    adapter = replace(base_head, head=base_head.head.model_copy(update={"pooling": pooling}))
    classifier = lora(tiny_base, r=2)
    prompt, response = _words(200), _words(100, offset=3)
    window = tiny_base.max_length
    data = encode([PreferenceExample(response, "plot", prompt)], tiny_base.tokenizer, window)
    [served] = RowEncoder(tiny_base).encode_responses([(prompt, response)], window)
    assert (served.input_ids, served.token_type_ids) == (data.ids[0][0], data.types[0][0])
    model = adapter.build(tiny_base)
    expected = float(model(data.collate([0], tiny_base.device))[0])
    engine = InferenceEngine(tiny_base, device="cpu")
    engine.load("r", adapter)
    engine.load("c", classifier)
    as_text, as_encoded, other, bare = engine.run(
        [
            Row("r", prompt, response),
            Row("r", prompt, response, encoded=served),
            Row("c", "a good film"),
            Row(None, "a good film"),
        ]
    )
    assert as_text.reward == pytest.approx(expected, abs=1e-5)
    assert as_encoded.reward == pytest.approx(expected, abs=1e-5)
    assert other.logits == pytest.approx(
        reference(tiny_base, classifier, "a good film").tolist(), abs=1e-5
    )
    assert bare.features == pytest.approx(
        reference(tiny_base, None, "a good film").tolist(), abs=1e-5
    )
    # Pooling over the response is not pooling over the whole row.
    whole = replace(adapter, head=adapter.head.model_copy(update={"pooling": "base"}))
    if pooling == "response":
        other_model = whole.build(tiny_base)
        assert float(other_model(data.collate([0], tiny_base.device))[0]) != pytest.approx(expected)


def test_wide_batches_run_in_chunks_whose_gradients_add_up(
    tiny_base: FrozenBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core.training import data as training_data
    from core.training.metrics import reward_loss

    rows = [PreferenceExample(_words(20 + i), _words(10 + i, 3), _words(30, i)) for i in range(8)]
    # The default classification batch, 16 rows x 128 tokens, is still one forward; 16 pairs
    # x 256 tokens run as 2 pairs (1,024 tokens) at a time.
    rows_128 = EncodedData([([0] * 128,)] * 16, [([0] * 128,)] * 16, None, None, 0)
    assert len(training_data.forward_chunks(rows_128, list(range(16)))) == 1
    pairs_256 = EncodedData([([0] * 256,) * 2] * 16, [([0] * 256,) * 2] * 16, None, None, 0)
    assert [len(c) for c in training_data.forward_chunks(pairs_256, list(range(16)))] == [2] * 8
    data = encode(rows, tiny_base.tokenizer, 64)
    width = max(len(s) for seqs in data.ids for s in seqs)
    assert training_data.forward_chunks(data, list(range(8))) == [list(range(8))]
    monkeypatch.setattr(training_data, "MAX_FORWARD_TOKENS", 2 * 2 * width)
    chunks = training_data.forward_chunks(data, list(range(8)))
    assert chunks == [[0, 1], [2, 3], [4, 5], [6, 7]]  # a pair's two sequences stay together
    head = {"task": "reward", "text_pair": True}
    trainer = Trainer(tiny_base, {"type": "lora", "r": 4}, head, rows, None, {"max_steps": 1})
    trainer.setup()
    model, device = trainer.model, tiny_base.device

    def grads(parts: list[list[int]]) -> list[Any]:
        model.zero_grad()
        for part in parts:
            out = model(data.collate(part, device))
            n = len(part)
            (reward_loss(out[:n], out[n:], data.targets(part, device)) * n / 8).backward()
        return [p.grad.clone() for p in trainer.named_params.values()]

    for whole, chunked in zip(grads([list(range(8))]), grads(chunks), strict=True):
        assert torch.allclose(whole, chunked, atol=1e-6)


def test_the_window_never_exceeds_the_base_window() -> None:
    """A head stored with a length past its base's window (imported before that was
    refused) is served at the base's window, not past the position embeddings."""
    assert HeadConfig(task="reward", max_seq_length=600).window(510) == 510
    assert HeadConfig(task="reward", max_seq_length=128).window(510) == 128
    assert HeadConfig(task="reward").window(510) == 510


def test_serving_encodes_at_the_length_the_adapter_was_trained_at(tiny_base: FrozenBase) -> None:
    """Trained at 32 tokens on rows far longer, a reward and a classification adapter are
    served at 32 (the base's window is larger): the engine's outputs equal the trained model's
    on the rows as training encoded them. Adapters saved before keep the base's window."""
    from core.heads import HeadConfig
    from core.inference import InferenceEngine, Row
    from core.training.data import ClassificationExample

    assert tiny_base.max_length > 32
    short = {"max_seq_length": 32, "max_steps": 2, "learning_rate": 1e-2, "validation_fraction": 0}
    pairs = [
        PreferenceExample(_words(40, offset=i + 3), _words(45, offset=i + 5), _words(60, offset=i))
        for i in range(4)
    ]
    texts = [ClassificationExample(_words(70, offset=i), "ab"[i % 2]) for i in range(4)]
    engine = InferenceEngine(tiny_base, device="cpu")
    for task, rows in (("reward", pairs), ("classification", texts)):
        result = Trainer(tiny_base, {"type": "lora"}, {"task": task}, rows, None, short).train()
        adapter = result.adapter
        assert adapter.head.max_seq_length == 32
        assert HeadConfig(task=task, label_names=adapter.head.label_names).window(256) == 256
        model = adapter.build(tiny_base)
        data = encode(rows, tiny_base.tokenizer, 32, adapter.head.label_names)
        with torch.inference_mode():
            trained = model(data.collate(list(range(len(rows))), tiny_base.device)).float()
        engine.load(task, adapter)
        if task == "reward":
            served = engine.run(
                [Row(task, e.prompt, r) for e in pairs for r in (e.chosen, e.rejected)]
            )
            got = torch.tensor([r.reward for r in served]).view(len(pairs), 2).T.reshape(-1)
        else:
            got = torch.tensor([r.logits for r in engine.run([Row(task, e.text) for e in texts])])
        assert torch.allclose(got, trained, atol=1e-5), (task, (got - trained).abs().max())
