"""Reward models and classifiers on a decoder base (last-token pooling), on the tiny Llama."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.scoring import (
    encode_scored_turns,
    last_token_index,
    right_pad,
    score_decoder_pairs,
)
from core.errors import AdapterFormatError, ConfigError
from core.io.serialization import adapter_from_bytes, adapter_to_bytes
from core.training.decoder_head import DecoderHeadTrainer
from core.training.trainer import Trainer, TrainerCallbacks

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain"]
LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.1}
CFG = {"n_epochs": 10, "batch_size": 4, "learning_rate": 1e-2, "seed": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def preference_rows(words: list[str]) -> list[dict[str, Any]]:
    """The preferred reply says the question's word back; the other refuses."""
    return [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": "No."} for w in words]


def test_last_token_index_reads_the_last_real_token_on_either_side() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_encoding_keeps_the_response_and_cuts_the_prompt_from_the_left(
    tiny_decoder: DecoderBase,
) -> None:
    tok, template = tiny_decoder.tokenizer, tiny_decoder.chat_template
    prompt, response = "abcdefghij " * 30, "the reply"
    whole = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        chat_template=template,
        tokenize=False,
    )
    # The row ends at the reply's end-of-turn token (the template's newline after it dropped).
    full_ids = tok(whole.rstrip(), add_special_tokens=False)["input_ids"]
    (ids,) = encode_scored_turns(tok, template, [prompt], [response], 64)
    # One token per byte: the window is the rendered row's last 64 tokens, the reply whole.
    assert ids == full_ids[-64:]
    assert "the reply" in tok.decode(ids)
    # A long response keeps its start and leaves the prompt a quarter of the window.
    (ids,) = encode_scored_turns(tok, template, ["hello there"], ["word " * 200], 64)
    # 16 tokens (a quarter) of context from its end, then the reply's first 48 bytes.
    assert tok.decode(ids) == "ere<|im_end|>\n<|im_start|>assistant\n" + ("word " * 10)[:48]
    # Cut by characters first (20 per token of the window), and the ids are the whole text's.
    long_prompt = "x" * 5000 + " tail words"
    (ids,) = encode_scored_turns(tok, template, [long_prompt], [response], 64)
    whole = tok.apply_chat_template(
        [{"role": "user", "content": long_prompt}, {"role": "assistant", "content": response}],
        chat_template=template,
        tokenize=False,
    )
    assert ids == tok(whole.rstrip(), add_special_tokens=False)["input_ids"][-64:]


def test_reward_model_training_ranks_a_toy_preference(tiny_decoder: DecoderBase) -> None:
    train, val = preference_rows(WORDS[:8]), preference_rows(WORDS[8:])
    trainer = DecoderHeadTrainer(tiny_decoder, LORA, {"task": "reward"}, train, val, CFG)
    trainer.setup()
    before = trainer.evaluate()
    result = trainer.train()
    # From ranking no held-out pair right to ranking every one (the best step is kept).
    assert before["accuracy"] == 0.0 and result.metrics["val_accuracy"] == 1.0
    assert result.metrics["val_loss"] < 0.8 * before["loss"]
    losses = [h["train_loss"] for h in result.history]
    assert min(losses[1:]) < 0.8 * losses[0]
    adapter = result.adapter
    assert (adapter.task, adapter.base_kind, adapter.head.pooling) == (
        "reward",
        "decoder",
        "last_token",
    )
    assert all(not t.requires_grad for t in tiny_decoder.state_dict.values())
    # The adapter round-trips and scores held-out pairs through the core scoring function.
    back = adapter_from_bytes(*adapter_to_bytes(adapter))
    assert back.base_kind == "decoder"
    model = back.build_decoder_head(tiny_decoder)
    prompts = [f"Say {w}." for w in WORDS[8:]]
    chosen = score_decoder_pairs(model, prompts, [f"{w}!" for w in WORDS[8:]])
    rejected = score_decoder_pairs(model, prompts, ["No."] * 3, batch_size=2)
    assert chosen.shape == rejected.shape == (3,) and bool((chosen > rejected).all())


def test_padding_does_not_change_the_score(tiny_decoder: DecoderBase) -> None:
    trainer = DecoderHeadTrainer(
        tiny_decoder,
        LORA,
        {"task": "reward"},
        preference_rows(WORDS),
        None,
        {**CFG, "max_steps": 2, "validation_fraction": 0.0},
    )
    model = trainer.train().adapter.build_decoder_head(tiny_decoder)
    window = model.head.config.max_seq_length  # what training encoded at, as scoring does
    assert window is not None
    rows = encode_scored_turns(
        tiny_decoder.tokenizer, tiny_decoder.chat_template, ["Say it.", None], ["Yes.", "A"], window
    )
    alone = torch.stack([model(right_pad([r], tiny_decoder.device)) for r in rows]).squeeze(1)
    right = model(right_pad(rows, tiny_decoder.device))
    width = max(map(len, rows))
    left = {
        "input_ids": torch.tensor([[0] * (width - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
    }
    with torch.no_grad():
        torch.testing.assert_close(right, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(left), alone, atol=1e-5, rtol=0)
    # Scoring sorts rows by length: the order of the pairs changes no score.
    a = score_decoder_pairs(model, ["Say it.", None], ["Yes.", "A"])
    b = score_decoder_pairs(model, [None, "Say it."], ["A", "Yes."])
    torch.testing.assert_close(a, b.flip(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(a, alone, atol=1e-5, rtol=0)


def test_decoder_classifier_learns_labels(tiny_decoder: DecoderBase) -> None:
    rows = [{"text": f"{w} is warm", "label": "warm"} for w in WORDS] + [
        {"text": f"{w} is cold", "label": "cold"} for w in WORDS
    ]
    trainer = DecoderHeadTrainer(
        tiny_decoder, LORA, {"task": "classification"}, rows, rows, {**CFG, "n_epochs": 8}
    )
    result = trainer.train()
    assert result.metrics["val_accuracy"] == 1.0
    assert result.adapter.head.label_names == ["cold", "warm"]
    with pytest.raises(ValueError, match="no reward"):
        score_decoder_pairs(result.adapter.build_decoder_head(tiny_decoder), [None], ["x"])


@pytest.mark.parametrize(
    "method", [LORA, {"type": "full"}, {"type": "prompt_tuning", "n_virtual_tokens": 4}]
)
def test_reward_resume_mid_run_is_bit_exact(
    tiny_decoder: DecoderBase, method: dict[str, Any]
) -> None:
    train = preference_rows(WORDS)
    cfg = {**CFG, "n_epochs": 3, "batch_size": 4, "checkpoint_every_steps": 2}
    saved: list[tuple[int, bytes]] = []
    cb = TrainerCallbacks(on_checkpoint=lambda data, step, *_: saved.append((step, data)))
    whole = DecoderHeadTrainer(tiny_decoder, method, {"task": "reward"}, train, None, cfg, cb)
    result = whole.train()
    step, data = next((s, d) for s, d in saved if s in (4, 5))
    resumed_trainer = DecoderHeadTrainer.resume(data, tiny_decoder, train)
    assert resumed_trainer.state.step == step
    resumed = resumed_trainer.train()
    for a, b in ((result.adapter.method_state, resumed.adapter.method_state),
                 (result.adapter.head_state, resumed.adapter.head_state)):  # fmt: skip
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history == [
        {**h, "elapsed": r["elapsed"]} for h, r in zip(result.history, resumed.history, strict=True)
    ]


def test_kinds_are_kept_apart(tiny_decoder: DecoderBase, tiny_base: FrozenBase) -> None:
    rows = preference_rows(WORDS)
    with pytest.raises(ConfigError, match="pooling"):
        DecoderHeadTrainer(
            tiny_decoder, LORA, {"task": "reward", "pooling": "response"}, rows
        ).setup()
    with pytest.raises(ConfigError, match="task"):
        DecoderHeadTrainer(tiny_decoder, LORA, {"task": "chat"}, rows).setup()
    # The encoder's trainer refuses a head that reads the last token.
    with pytest.raises(ConfigError, match="pooling"):
        Trainer(
            tiny_base, {"type": "lora"}, {"task": "reward", "pooling": "last_token"}, rows
        ).setup()
    cfg = {**CFG, "max_steps": 1, "validation_fraction": 0.0}
    adapter = DecoderHeadTrainer(tiny_decoder, LORA, {"task": "reward"}, rows, None, cfg)
    adapter = adapter.train().adapter
    with pytest.raises(AdapterFormatError, match="decoder"):
        adapter.build(tiny_base)
