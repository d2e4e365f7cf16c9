"""The decoder forward against Hugging Face's ``LlamaForCausalLM``; the KV cache; generation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.decoder.base import DecoderBase, load_decoder_base
from core.decoder.forward import KVCache, forward, left_pad, logits, positions_from_mask
from core.decoder.generate import greedy_generate
from core.methods.lora.layer import LoraHooks, MergedLoraHooks
from tests.core.decoder.tiny_llama import build_tiny_llama

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def hf_model(base: DecoderBase) -> LlamaForCausalLM:
    """transformers' Llama over the base's own tensors (fp32, SDPA attention)."""
    cfg = base.config
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = model.load_state_dict(base.state_dict, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def hf_logits(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)
        ).logits


def ours(base: DecoderBase, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():
        return logits(base.weights, forward(base.weights, ids, mask))


def random_rows(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def llama3_decoder(tmp_path_factory: pytest.TempPathFactory) -> DecoderBase:
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama3"), rope_scaling=LLAMA3_ROPE)
    return load_decoder_base(folder, device="cpu")


@pytest.mark.parametrize("which", ["tiny_decoder", "llama3_decoder"])
def test_forward_equals_hf_llama_tiny(which: str, request: pytest.FixtureRequest) -> None:
    base: DecoderBase = request.getfixturevalue(which)
    ids, mask = left_pad(random_rows(base.config.vocab_size, [40, 23, 1]))
    expected = hf_logits(hf_model(base), ids, mask)
    got = ours(base, ids, mask)
    real = mask.bool()  # padding positions' outputs are never read
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)
    # A padded row computes what it computes alone.
    alone = ours(base, ids[1:2, -23:], None)
    torch.testing.assert_close(got[1, -23:], alone[0], atol=1e-5, rtol=0)


def test_kv_cache_decode_equals_full_forward(tiny_decoder: DecoderBase) -> None:
    w = tiny_decoder.weights
    rows = random_rows(tiny_decoder.config.vocab_size, [12, 7], seed=1)
    ids, mask = left_pad(rows)
    full = ours(tiny_decoder, ids, mask)
    prompt = 5
    cache = KVCache.allocate(w, batch=2, capacity=ids.shape[1])
    with torch.no_grad():
        steps = [logits(w, forward(w, ids[:, :prompt], mask[:, :prompt], cache=cache))]
        for t in range(prompt, ids.shape[1]):
            hidden = forward(w, ids[:, t : t + 1], mask[:, : t + 1], cache=cache)
            steps.append(logits(w, hidden))
    decoded = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(decoded[real], full[real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KV cache full"):
        forward(w, ids[:, :1], None, cache=cache)


def test_kv_cache_chunks_without_padding_equal_full_forward(tiny_decoder: DecoderBase) -> None:
    """Prefill, a several-token chunk on top of the cache, then single tokens; no mask."""
    w = tiny_decoder.weights
    (row,) = random_rows(tiny_decoder.config.vocab_size, [14], seed=5)
    ids = torch.tensor([row])
    full = ours(tiny_decoder, ids, None)
    cache = KVCache.allocate(w, batch=1, capacity=14)
    with torch.no_grad():
        parts = [logits(w, forward(w, ids[:, a:b], cache=cache)) for a, b in [(0, 4), (4, 9)]]
        parts += [logits(w, forward(w, ids[:, t : t + 1], cache=cache)) for t in range(9, 14)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_generate_batched_equals_one_by_one(tiny_decoder: DecoderBase) -> None:
    rows = random_rows(tiny_decoder.config.vocab_size, [9, 4, 6], seed=2)
    batched = greedy_generate(tiny_decoder.weights, rows, 8)
    alone = [greedy_generate(tiny_decoder.weights, [r], 8)[0] for r in rows]
    assert batched == alone and all(len(r) == 8 for r in batched)


def test_lora_hooks_apply_at_the_named_linears(tiny_decoder: DecoderBase) -> None:
    """core/methods/lora's hooks, unchanged: the unmerged and merged paths agree."""
    cfg, sd = tiny_decoder.config, tiny_decoder.state_dict
    g = torch.Generator().manual_seed(3)
    pairs = {}
    for layer, target in [(0, "q_proj"), (1, "v_proj"), (1, "down_proj")]:
        n_in, n_out = cfg.linear_shape(target)
        pairs[(layer, target)] = (
            torch.randn(4, n_in, generator=g),
            torch.randn(n_out, 4, generator=g),
        )
    merged = {}
    for (layer, target), (a, b) in pairs.items():
        path = "mlp" if target == "down_proj" else "self_attn"
        merged[(layer, target)] = sd[f"model.layers.{layer}.{path}.{target}.weight"] + 0.5 * b @ a
    ids, mask = left_pad(random_rows(cfg.vocab_size, [10, 6], seed=4))
    w = tiny_decoder.weights
    with torch.no_grad():
        plain = forward(w, ids, mask)
        unmerged = forward(w, ids, mask, hooks=LoraHooks(pairs, 0.5, 0.0))
        via_weight = forward(w, ids, mask, hooks=MergedLoraHooks(merged))
    real = mask.bool()
    torch.testing.assert_close(unmerged[real], via_weight[real], atol=1e-4, rtol=0)
    assert (unmerged[real] - plain[real]).abs().max() > 1e-2


@pytest.mark.real_model
def test_forward_equals_hf_llama_real(real_decoder: DecoderBase) -> None:
    ids = torch.tensor([real_decoder.tokenizer.encode("The quick brown fox jumps over")])
    mask = torch.ones_like(ids)
    expected = hf_logits(hf_model(real_decoder), ids, mask)
    # Logits reach ~20 after 30 layers in float32, and the two sum in different orders: on an
    # Ice Lake Xeon (AVX-512, no BF16) 4 of 294,912 differed by 1.03e-4. A real fault (RoPE,
    # a norm, the attention mask) moves them by whole units.
    torch.testing.assert_close(ours(real_decoder, ids, None), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.real_model
def test_greedy_answer_names_paris(real_decoder: DecoderBase) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = real_decoder.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    (reply,) = greedy_generate(real_decoder.weights, [prompt], 24, real_decoder.stop_token_ids)
    assert "Paris" in real_decoder.tokenizer.decode(reply)
