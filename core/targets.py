"""Names of each base's linear layers that adaptation methods may target.

Plain data, kept out of :mod:`core.encoder` so that method configs (and the API request schema
built from them) can name their targets without importing torch.
"""

from __future__ import annotations

from typing import Literal

# Linear layers an adapter may target, named by their path inside ``encoder.layer.N``.
# ``output.dense`` is the feed-forward output (``encoder.layer.N.output.dense``), not the
# attention output, which is ``attention.output.dense``.
TARGET_MODULES: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
TARGET_PATHS: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}

# A decoder's (Llama's) linear layers, PEFT's names for them; each sits at
# ``model.layers.N.<DECODER_TARGET_PATHS[name]>``. No name is shared with the encoder's, so a
# target names its base's kind.
DECODER_TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
DECODER_TARGET_PATHS: dict[str, str] = {
    **{t: f"self_attn.{t}" for t in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{t: f"mlp.{t}" for t in ("gate_proj", "up_proj", "down_proj")},
}

# What kind of base a method's config is validated for (``parse_config``'s ``base_kind``).
BaseKind = Literal["encoder", "decoder"]
TARGET_MODULES_BY_KIND: dict[BaseKind, tuple[str, ...]] = {
    "encoder": TARGET_MODULES,
    "decoder": DECODER_TARGET_MODULES,
}
# Methods that train a decoder base: LoRA's hooks apply to the decoder's linears unchanged, full
# fine-tuning runs the decoder's forward over its own copy of the weights, and prompt tuning
# gives it virtual token embeddings as its prefix. Here, torch-free, so the API lists and checks
# them without loading the trainer (core.training.decoder refuses the others at set-up).
DECODER_METHODS: tuple[str, ...] = ("lora", "full", "prompt_tuning")


def module_path(layer: int, target: str) -> str:
    """The Hugging Face module path of ``target`` in layer ``layer``, for either base."""
    if target in TARGET_PATHS:
        return f"encoder.layer.{layer}.{TARGET_PATHS[target]}"
    return f"model.layers.{layer}.{DECODER_TARGET_PATHS[target]}"
