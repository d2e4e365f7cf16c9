"""The request path's adapter lookup reads a stored method config as core will load it."""

from __future__ import annotations

from service.serving.queries import _base_kind, _reserved_positions


def test_a_decoder_adapters_lora_config_is_read_as_a_decoders() -> None:
    # A decoder adapter's LoRA names the decoder's layers (q_proj, ...), which an encoder's
    # config refuses: the lookup validates it for the kind of base its head says, so a
    # decoder's reward model (a last-token head) is read as a decoder's like its chat adapters.
    lora = {"type": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]}
    for head in [
        {"task": "chat"},
        {"task": "dpo"},
        {"task": "reward", "pooling": "last_token"},
        {"task": "classification", "pooling": "last_token", "label_names": ["a", "b"]},
    ]:
        config = {"method": lora, "head": head}
        assert _base_kind(head["task"], head) == "decoder"
        assert _reserved_positions(config, "decoder") == 0
    encoder = {"method": {"type": "prompt_tuning", "n_virtual_tokens": 5}, "head": {}}
    assert _base_kind("reward", {"task": "reward"}) == "encoder"
    # A head this release would refuse (here: no task) is still read for its kind alone.
    assert _base_kind("reward", {"pooling": "last_token"}) == "decoder"
    assert _reserved_positions(encoder, "encoder") == 5
