"""The shape of a Llama-family decoder, read from a Hugging Face config (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Rope variants whose frequencies are fixed at load (``dynamic`` and ``yarn`` change with the
# sequence or scale attention, so they are refused rather than approximated).
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class UnsupportedDecoderError(ValueError):
    """A config this forward does not implement exactly (it would silently differ from HF)."""


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    # ``rope_scaling`` as sorted (key, value) pairs, so the config stays hashable; None = plain.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> DecoderConfig:
        """From a Llama ``config.json`` (or ``LlamaConfig.to_dict()``); refuses what differs."""
        if cfg.get("model_type") != "llama":
            raise UnsupportedDecoderError(
                f"unsupported model_type {cfg.get('model_type')!r} (Llama family: 'llama')"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedDecoderError(f"unsupported hidden_act {cfg['hidden_act']!r}")
        if cfg.get("pretraining_tp", 1) != 1:
            raise UnsupportedDecoderError("pretraining_tp other than 1 is not supported")
        scaling = cfg.get("rope_scaling")
        if scaling is not None:
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedDecoderError(
                    f"unsupported rope_scaling type {rope_type!r} (supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)})"
                )
            scaling = tuple(sorted({**scaling, "rope_type": rope_type}.items()))
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise UnsupportedDecoderError("num_attention_heads must be a multiple of kv heads")
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg["max_position_embeddings"]),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=scaling,
        )

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def linear_shape(self, target: str) -> tuple[int, int]:
        """(in_features, out_features) of a target linear layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        shapes = {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }
        return shapes[target]
