"""A tiny randomly initialised Llama folder (Hugging Face layout) for fast decoder tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_LLAMA_NAME = "loraplex-tests/tiny-llama"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2's own template (ChatML with a default system turn), so tiny tests render chats the
# way the real base does.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_llama(
    folder: Path, seed: int = 0, rope_scaling: dict[str, Any] | None = None
) -> Path:
    """Write config.json, model.safetensors and a byte-level tokenizer (one token per byte, the
    three ChatML specials first) into ``folder``: hidden 64, 2 layers, 4 heads over 2 kv heads,
    intermediate 96, 256 positions, tied embeddings. Load it with ``load_decoder_base(folder)``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rope_scaling=rope_scaling,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        # HF's 0.02 leaves a 64-wide random model's logits nearly flat, so no adapter could
        # make it confident of anything; 0.2 gives it logits of a real model's scale.
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # HF initialises RMSNorm weights to exactly 1; perturb them so a norm the forward ignored
    # would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return folder
