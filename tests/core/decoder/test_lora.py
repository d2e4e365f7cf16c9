"""LoRA (core/methods/lora) on the decoder base: its targets, PEFT parity, a tiny SFT run."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, set_peft_model_state_dict
from transformers import LlamaForCausalLM

from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.chat import collate, render_chat, render_reply
from core.decoder.forward import forward, left_pad, logits, positions_from_mask
from core.decoder.losses import dpo_loss, reply_logprobs, sft_loss, targets
from core.errors import ConfigError
from core.methods import parse_method_config
from core.methods.lora.config import LoraConfig
from core.methods.lora.model import LoraModel
from core.targets import DECODER_TARGET_MODULES

ALL_DECODER = list(DECODER_TARGET_MODULES)


def lora(base: DecoderBase | FrozenBase, **params: object) -> LoraModel:
    kind = "decoder" if isinstance(base, DecoderBase) else "encoder"
    config = parse_method_config("lora", params, base_kind=kind)
    assert isinstance(config, LoraConfig)
    return LoraModel(config, base)


def test_targets_are_validated_for_the_base_kind(
    tiny_decoder: DecoderBase, tiny_base: FrozenBase
) -> None:
    model = lora(tiny_decoder, r=4, target_modules=["q_proj", "down_proj"])
    assert sorted(model.saved_state())[:2] == [
        "model.layers.0.mlp.down_proj.lora_A.weight",
        "model.layers.0.mlp.down_proj.lora_B.weight",
    ]
    decoder_default = parse_method_config("lora", {}, base_kind="decoder")
    assert decoder_default.target_modules == ALL_DECODER  # type: ignore[attr-defined]
    all_linear = parse_method_config("lora", {"target_modules": "all-linear"}, base_kind="decoder")
    assert all_linear.target_modules == ALL_DECODER  # type: ignore[attr-defined]
    # Each kind refuses the other's names, at validation (a 4xx for the service) ...
    with pytest.raises(ConfigError, match="target_modules"):
        parse_method_config("lora", {"target_modules": ["query"]}, base_kind="decoder")
    with pytest.raises(ConfigError, match="target_modules"):
        parse_method_config("lora", {"target_modules": ["q_proj"]})
    # ... and a config validated for one kind is refused on a base of the other.
    with pytest.raises(ConfigError, match="not layers of this base"):
        LoraModel(LoraConfig(), tiny_decoder)
    encoder_lora = lora(tiny_base)
    with pytest.raises(ConfigError, match="not layers of this base"):
        LoraModel(model.config, tiny_base)
    assert encoder_lora.config.target_modules == ["query", "value"]


def test_lora_equals_peft_on_hf_llama(tiny_decoder: DecoderBase, tiny_llama_dir: object) -> None:
    model = lora(tiny_decoder, r=4, alpha=8, target_modules=ALL_DECODER)
    with torch.no_grad():  # PEFT's B starts at 0; a non-zero B makes the comparison mean something
        for b in model.lora_B:
            b.normal_(std=0.05)
    peft_model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)),
        PeftLoraConfig(r=4, lora_alpha=8, target_modules=ALL_DECODER),
    ).eval()
    state = {f"base_model.model.{k}": v for k, v in model.saved_state().items()}
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys
    ids, mask = left_pad([[5, 9, 40, 7, 100, 3], [60, 61, 62]])
    with torch.no_grad():
        w = tiny_decoder.weights
        ours = logits(w, forward(w, ids, mask, hooks=model.hooks()))
        theirs = peft_model(ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs.logits[real], atol=1e-4, rtol=0)


def test_lora_sft_on_chat_rows_lowers_the_loss(tiny_decoder: DecoderBase) -> None:
    torch.manual_seed(0)
    chats = [
        [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a + b}"},
        ]
        for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3), (4, 4)]
    ]
    rows = [render_chat(tiny_decoder.tokenizer, tiny_decoder.chat_template, c, 128) for c in chats]
    ids, attention, loss_mask = collate(rows)
    model = lora(tiny_decoder, r=8, alpha=16, target_modules=ALL_DECODER)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    w = tiny_decoder.weights

    def loss() -> torch.Tensor:
        hidden = forward(w, ids, attention, hooks=model.hooks())
        return sft_loss(targets(w, hidden, ids, loss_mask))

    with torch.no_grad():
        before = float(loss())
    for _ in range(40):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss())
    assert after < 0.5 * before
    # The frozen base never trained: only LoRA's tensors have gradients.
    assert all(not t.requires_grad for t in tiny_decoder.state_dict.values())


def test_lora_dpo_prefers_the_chosen_replies(tiny_decoder: DecoderBase) -> None:
    """DPO against the base with the adapter off: the implicit reward learns the preference."""
    torch.manual_seed(0)
    tok, template = tiny_decoder.tokenizer, tiny_decoder.chat_template
    pairs = [(f"Is {n} even?", "yes" if n % 2 == 0 else "no") for n in range(6)]
    chosen, rejected = [], []
    for question, answer in pairs:
        prompt = [{"role": "user", "content": question}]
        wrong = "no" if answer == "yes" else "yes"
        chosen.append(
            render_reply(tok, template, prompt, {"role": "assistant", "content": answer}, 64)
        )
        rejected.append(
            render_reply(tok, template, prompt, {"role": "assistant", "content": wrong}, 64)
        )
    ids, attention, loss_mask = collate(chosen + rejected)
    w, n = tiny_decoder.weights, len(pairs)
    with torch.no_grad():
        reference = reply_logprobs(w, ids, attention, loss_mask)
    model = lora(tiny_decoder, r=8, alpha=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        policy = reply_logprobs(w, ids, attention, loss_mask, model.hooks())
        out = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], beta=0.1)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the adapter starts as a no-op
    assert losses[-1] < 0.5 * losses[0]
    assert bool((out.chosen_rewards > out.rejected_rewards).all())
