from __future__ import annotations

from typing import ClassVar

from core.methods.config import MethodConfig


class ScratchConfig(MethodConfig):
    """The base's architecture trained from random init (BERT init, std 0.02): a baseline that
    shows what pre-training is worth, never a serious option."""

    type: ClassVar[str] = "scratch"
