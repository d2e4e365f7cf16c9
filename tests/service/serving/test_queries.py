"""The request path's adapter lookup reads a stored method config as core will load it."""

from __future__ import annotations

from service.serving.queries import _reserved_positions


def test_a_decoder_adapters_lora_config_is_read_as_a_decoders() -> None:
    # A chat/dpo adapter's LoRA names the decoder's layers (q_proj, ...), which an encoder's
    # config refuses: the lookup validates it for the kind of base its task trains on.
    config = {"method": {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}}
    assert _reserved_positions("chat", config) == 0
    assert _reserved_positions("dpo", config) == 0
    encoder = {"method": {"type": "prompt_tuning", "n_virtual_tokens": 5}}
    assert _reserved_positions("classification", encoder) == 5
