from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from core.encoder import TARGET_MODULES
from core.methods.base import MethodConfig


class LoraConfig(MethodConfig):
    """Low-rank adaptation: ``W x + scale · B(A(dropout(x)))`` on the target linears."""

    type: ClassVar[str] = "lora"
    r: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False
    # Layers to adapt (None = all); mirrors PEFT's ``layers_to_transform``.
    layers: list[int] | None = None

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, v: list[str] | str) -> list[str]:
        if v == "all-linear":
            return list(TARGET_MODULES)
        if isinstance(v, str):
            v = [v]
        if not v:
            raise ValueError("at least one target module is required")
        unknown = [t for t in v if t not in TARGET_MODULES]
        if unknown:
            raise ValueError(f"unknown target module(s) {unknown}; known: {list(TARGET_MODULES)}")
        return sorted(set(v), key=TARGET_MODULES.index)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
