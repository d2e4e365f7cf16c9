from __future__ import annotations

import unicodedata
from typing import ClassVar, Literal

from pydantic import Field, ValidationInfo, field_validator

from core.methods.config import MethodConfig


class PromptTuningConfig(MethodConfig):
    """Soft prompt tuning (Lester et al. 2021) laid out exactly like PEFT's `PROMPT_TUNING`.

    `n_virtual_tokens` learned embeddings are prepended to every input; they take positions
    `0..n-1` and the real tokens shift to `n..`, so real text is truncated to
    `base.max_length - n_virtual_tokens` tokens.
    `init="text"` starts from the base's word embeddings of `init_text`'s tokens (special
    tokens excluded), repeated or truncated to `n_virtual_tokens`.
    """

    type: ClassVar[str] = "prompt_tuning"
    n_virtual_tokens: int = Field(
        20,
        ge=1,
        le=256,
        description="Learned embeddings prepended to every input; real text is truncated to "
        "the base model's limit minus this many tokens.",
    )
    init: Literal["random", "text"] = Field(
        "random",
        description="random: start from random embeddings; text: from the word embeddings of "
        "init_text's tokens.",
    )
    init_text: str | None = Field(
        None,
        # Tokens past n_virtual_tokens are dropped; the bound keeps a config (an imported one
        # too, which the adapter's row stores and every GET returns) to what could matter.
        max_length=4096,
        validate_default=True,
        description="Required with init='text', refused otherwise: its tokens' embeddings "
        "(repeated or truncated to n_virtual_tokens) start the prompt.",
    )

    @field_validator("init_text")
    @classmethod
    def _text_for_text_init(cls, v: str | None, info: ValidationInfo) -> str | None:
        init = info.data.get("init")
        if init == "text" and not (v and _has_a_token(v)):
            raise ValueError(
                "init='text' needs an init_text with a character that makes a token (spaces, "
                "control, format and nonspacing characters alone make none)"
            )
        if init == "random" and v is not None:
            raise ValueError("init_text is only used with init='text'")
        return v

    @property
    def reserved_positions(self) -> int:
        return self.n_virtual_tokens


def _has_a_token(text: str) -> bool:
    """Whether ``text`` holds a character every tokenizer keeps. An uncased WordPiece (MiniLM's)
    drops whitespace, control and format characters (a zero-width space, a NUL), U+FFFD and,
    stripping accents, nonspacing marks: a text of those alone was queued, and the worker
    failed the job with "init_text: tokenizes to no tokens"."""
    return any(
        c != "\ufffd" and unicodedata.category(c)[0] not in "ZC" and unicodedata.category(c) != "Mn"
        for c in text
    )
