from __future__ import annotations

import torch
from torch import Tensor, nn

from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.encoder import EncoderHooks
from core.errors import ConfigError
from core.methods.method import AdapterMethod
from core.methods.prompt_tuning.config import PromptTuningConfig
from core.methods.prompt_tuning.layer import PromptHooks, virtual_token_states


def text_init_ids(base: FrozenBase, text: str, n: int) -> list[int]:
    """Token ids of ``text`` (no special tokens) repeated or truncated to ``n``."""
    ids: list[int] = base.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    if not ids:
        raise ConfigError("init_text", "tokenizes to no tokens")
    reps = -(-n // len(ids))
    return (ids * reps)[:n]


class PromptTuningModel(AdapterMethod):
    """One trainable tensor, ``prompt_embeddings`` [n, hidden], in word-embedding space (the
    same tensor PEFT saves), normalised through the base's embedding LayerNorm per forward."""

    config: PromptTuningConfig

    def __init__(self, config: PromptTuningConfig, base: FrozenBase) -> None:
        super().__init__(config, base)
        n = config.n_virtual_tokens
        if n >= base.max_length:
            raise ConfigError(
                "n_virtual_tokens", f"must be below the base's max length {base.max_length}"
            )
        words = base.encoder.embeddings.word_embeddings.weight
        if config.init == "text":
            assert config.init_text is not None  # the config validator guarantees it
            ids = torch.tensor(text_init_ids(base, config.init_text, n), device=words.device)
            init = words[ids].detach().clone()
        else:
            # PEFT's RANDOM init: a fresh nn.Embedding, i.e. N(0, 1).
            init = torch.randn(n, base.hidden_size, device=words.device, dtype=words.dtype)
        self.prompt_embeddings = nn.Parameter(init)

    def virtual_states(self) -> Tensor:
        return virtual_token_states(self.prompt_embeddings, self.base.encoder)

    def hooks(self, dropout: bool = False) -> EncoderHooks:
        p = self.base.config.hidden_dropout_prob if dropout else 0.0
        return PromptHooks(self.virtual_states(), p)


class DecoderPromptTuningModel(AdapterMethod):
    """Prompt tuning of a decoder base: ``prompt_embeddings`` [n, hidden] in the word
    embedding space (PEFT's tensor), given to the decoder's forward as its ``prefix``: virtual
    tokens at the start of every row, positions ``0..n-1``, as PEFT's ``PROMPT_TUNING`` puts
    them on a causal LM. No dropout: Llama has none on its embeddings."""

    config: PromptTuningConfig

    def __init__(self, config: PromptTuningConfig, base: DecoderBase) -> None:
        super().__init__(config, base)  # type: ignore[arg-type]
        n = config.n_virtual_tokens
        if n >= base.max_length:
            raise ConfigError(
                "n_virtual_tokens", f"must be below the base's max length {base.max_length}"
            )
        words = base.weights.embed
        if config.init == "text":
            assert config.init_text is not None  # the config validator guarantees it
            ids = torch.tensor(text_init_ids(base, config.init_text, n), device=words.device)  # type: ignore[arg-type]
            init = words[ids].detach().clone()
        else:
            # PEFT's RANDOM init: a fresh nn.Embedding, i.e. N(0, 1).
            init = torch.randn(n, words.shape[1], device=words.device, dtype=words.dtype)
        self.prompt_embeddings = nn.Parameter(init)

    def prefix(self) -> Tensor:
        return self.prompt_embeddings
