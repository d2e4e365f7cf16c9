"""Prompt tuning in PEFT's ``PROMPT_TUNING`` layout.

What PEFT does (``PeftModelForFeatureExtraction.forward``, peft 0.21): it looks up the real
tokens' word embeddings, prepends ``prompt_embeddings`` and calls ``BertModel`` with
``inputs_embeds``, so BERT's embedding layer adds position ids ``0..n+S-1`` and token type 0
and applies its LayerNorm to virtual and real tokens alike. Our prompt tuning stores the same
tensor and reproduces that layout (virtual states ``LayerNorm(p_i + pos_i + type_0)`` inserted
after the embedding LayerNorm, real tokens at positions ``n..``), so weights convert 1:1 both
ways and outputs match PEFT's on the real tokens. Two differences remain, both outside the
weights: PEFT's feature-extraction model drops ``token_type_ids`` (we keep them, so sentence
pairs differ while single texts are identical) and returns the virtual tokens' states too (we
strip them). PEFT's ``TEXT`` init includes special tokens; we exclude them (init only).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from core.base import FrozenBase
from core.errors import AdapterFormatError, ConfigError
from core.methods import parse_method_config
from core.methods.prompt_tuning import PromptTuningConfig

PROMPT_KEY = "prompt_embeddings"
# In-memory PEFT state dicts name the same tensor after the prompt encoder module.
_ALT_KEYS = ("prompt_encoder.default.embedding.weight",)


def export_prompt(
    cfg: PromptTuningConfig, state: dict[str, Tensor], base: FrozenBase
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    c = base.config
    config = {
        "peft_type": "PROMPT_TUNING",
        # FEATURE_EXTRACTION makes PEFT prepend the prompt (the plain PeftModel does not).
        "task_type": "FEATURE_EXTRACTION",
        "num_virtual_tokens": cfg.n_virtual_tokens,
        "token_dim": c.hidden_size,
        "num_transformer_submodules": 1,
        "num_attention_heads": c.num_attention_heads,
        "num_layers": c.num_hidden_layers,
        # RANDOM: the weights are loaded anyway, and TEXT would make PEFT fetch a tokenizer.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "inference_mode": True,
    }
    return config, {PROMPT_KEY: state[PROMPT_KEY]}


def import_prompt(
    cfg: dict[str, Any],
    tensors: dict[str, Tensor],
    base: FrozenBase,
    ours: dict[str, Any] | None,
) -> tuple[PromptTuningConfig, dict[str, Tensor]]:
    """``ours``: our own method config from the ``loraplex`` key, if the export was ours."""
    c = base.config
    keys = [k for k in (PROMPT_KEY, *_ALT_KEYS) if k in tensors]
    if len(keys) != 1 or len(tensors) != 1:
        raise AdapterFormatError(
            f"PEFT prompt tuning weights must hold exactly one {PROMPT_KEY!r} tensor, "
            f"got {sorted(tensors)[:4]}"
        )
    prompt = tensors[keys[0]]
    for key, ours_value in (
        ("token_dim", c.hidden_size),
        ("num_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
    ):
        if cfg.get(key) not in (None, ours_value):
            raise AdapterFormatError(
                f"PEFT config {key}={cfg[key]} but base {base.name!r} has {ours_value}: "
                "the adapter was trained for a different base model"
            )
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise AdapterFormatError("only encoder-only prompt tuning (one submodule) is supported")
    n = cfg.get("num_virtual_tokens")
    if prompt.ndim != 2 or tuple(prompt.shape) != (n, c.hidden_size):
        raise AdapterFormatError(
            f"{keys[0]}: shape {tuple(prompt.shape)} does not fit num_virtual_tokens={n} and "
            f"base {base.name!r} hidden size {c.hidden_size}"
        )
    params: dict[str, Any] = {"n_virtual_tokens": n}
    if ours and ours.get("type") == "prompt_tuning":
        # Keep how our own export was initialised (informational; weights are loaded anyway).
        params.update({k: ours[k] for k in ("init", "init_text") if k in ours})
    try:
        method = parse_method_config("prompt_tuning", params)
    except ConfigError as e:
        raise AdapterFormatError(f"PEFT prompt tuning config not supported: {e}") from None
    if n >= base.max_length:
        raise AdapterFormatError(
            f"num_virtual_tokens={n} leaves no room for text in base max length {base.max_length}"
        )
    assert isinstance(method, PromptTuningConfig)
    return method, {PROMPT_KEY: prompt}
