"""Prompt tuning on the decoder: virtual tokens as the forward's prefix, trained by chat SFT."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
from transformers import LlamaForCausalLM

from core.decoder.base import DecoderBase
from core.decoder.forward import forward, left_pad, logits
from core.training.decoder import DecoderTrainer
from core.training.decoder_head import DecoderHeadTrainer
from tests.core.decoder.test_training import CHAT_CFG, chat_rows

PROMPT = {"type": "prompt_tuning", "n_virtual_tokens": 4}


def test_prefix_equals_peft_prompt_tuning(tiny_decoder: DecoderBase, tiny_llama_dir: Path) -> None:
    torch.manual_seed(0)
    hf = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = peft.get_peft_model(hf, config).eval()
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    ids = torch.tensor([[1, 5, 9, 23, 7, 3], [1, 40, 41, 42, 43, 44]])
    w = tiny_decoder.weights
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 4:]
        ours = logits(w, forward(w, ids, prefix=prompt))
        # Padding on the left: the virtual tokens come first, the row computes as alone.
        padded, mask = left_pad([[1, 5, 9], [1, 40, 41, 42, 43, 44]])
        short = logits(w, forward(w, padded, mask, prefix=prompt))[0, -3:]
        alone = logits(w, forward(w, torch.tensor([[1, 5, 9]]), prefix=prompt))[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(short, alone, atol=1e-5, rtol=0)


def test_chat_sft_trains_only_the_prompt_embeddings(tiny_decoder: DecoderBase) -> None:
    base_before = {k: v.clone() for k, v in tiny_decoder.state_dict.items()}
    trainer = DecoderTrainer(
        tiny_decoder,
        PROMPT,
        {"task": "chat"},
        chat_rows(32),
        chat_rows(12, seed=1),
        {**CHAT_CFG, "learning_rate": 0.3},  # prompt tuning needs a large rate (PEFT: 3e-1)
    )
    trainer.setup()
    assert list(trainer.named_params) == ["method.prompt_embeddings"]
    start = trainer.method.prompt_embeddings.detach().clone()
    before = trainer.evaluate()
    result = trainer.train()
    assert result.metrics["val_loss"] < 0.75 * before["loss"]
    assert list(result.adapter.method_state) == ["prompt_embeddings"]
    assert not torch.equal(result.adapter.method_state["prompt_embeddings"], start)
    assert all(torch.equal(v, base_before[k]) for k, v in tiny_decoder.state_dict.items())
    # The virtual tokens take positions: real text gets the base's window less theirs.
    assert trainer.max_length <= tiny_decoder.max_length - 4


def test_every_decoder_trainer_gives_real_text_the_window_less_the_virtual_tokens(
    tiny_decoder: DecoderBase,
) -> None:
    """Asked for more than the base's window, chat SFT and a reward head both train rows of
    the window less prompt tuning's 4 positions (Trainer._row_length, one rule for both)."""
    cfg = {**CHAT_CFG, "max_seq_length": 1000, "validation_fraction": 0}
    pairs = [{"prompt": "p", "chosen": "yes", "rejected": "no"}] * 4
    for trainer in (
        DecoderTrainer(tiny_decoder, PROMPT, {"task": "chat"}, chat_rows(4), None, cfg),
        DecoderHeadTrainer(tiny_decoder, PROMPT, {"task": "reward"}, pairs, None, cfg),
    ):
        trainer.setup()
        assert trainer.max_length == tiny_decoder.max_length - 4 == 252
