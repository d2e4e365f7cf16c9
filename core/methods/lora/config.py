from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field, ValidationInfo, field_validator, model_validator

from core.methods.config import MethodConfig, validation_base_kind
from core.targets import DECODER_TARGET_MODULES, TARGET_MODULES, TARGET_MODULES_BY_KIND


class LoraConfig(MethodConfig):
    """Low-rank adaptation: `W x + scale · B(A(dropout(x)))` on the target linears."""

    type: ClassVar[str] = "lora"
    r: int = Field(
        8,
        ge=1,
        le=256,
        description="Rank of the update B·A: more capacity and more trainable parameters as it "
        "grows.",
    )
    alpha: float = Field(
        16.0,
        gt=0,
        description="Scale of the update: it is multiplied by alpha / r (alpha / sqrt(r) with "
        "use_rslora).",
    )
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA branch's input while training."
    )
    target_modules: list[str] | str = Field(
        default_factory=lambda: ["query", "value"],
        description="Linear layers to adapt in every layer: on an encoder base out of "
        f"{', '.join(TARGET_MODULES)} (default query, value; all of them for a reward model), "
        f"on a decoder base out of {', '.join(DECODER_TARGET_MODULES)} (default all of them); "
        "or 'all-linear' for all of the base's.",
    )
    use_rslora: bool = Field(
        False,
        description="Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r, so the "
        "update's size does not shrink as r grows.",
    )
    # Mirrors PEFT's ``layers_to_transform``.
    layers: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Encoder layers to adapt, by index from 0 (bottom); null = all."
    )

    @model_validator(mode="before")
    @classmethod
    def _decoder_default_targets(cls, data: object, info: ValidationInfo) -> object:
        # Every linear layer on a decoder: LoRA on attention alone falls short of full
        # fine-tuning on instruction data (QLoRA, Dettmers et al. 2023), as PEFT's SFT recipes
        # assume. The encoder's default stays query + value.
        if (
            isinstance(data, dict)
            and "target_modules" not in data
            and validation_base_kind(info) == "decoder"
        ):
            return {**data, "target_modules": "all-linear"}
        return data

    def for_task(self, task: str) -> LoraConfig:
        # A reward model on the encoder adapts every linear layer unless told otherwise.
        # Held-out HH-RLHF pair accuracy, 1 epoch, seeds 0/1/2 (python -m bench.reward_quality
        # --datasets hh --cases default --epochs 1, README "Reward models"): every linear
        # 0.645/0.623/0.636 against query + value's 0.632/0.600/0.628 with dropout, and
        # 0.654/0.647/0.625 against 0.638/0.613 (seeds 0/1) without it, the reward default.
        # Classifiers keep query + value, which match full fine-tuning on Rotten Tomatoes and
        # serve unmerged at less cost. (The decoder's default, all of them, is set while
        # validating, so it is in model_fields_set.)
        if task == "reward" and "target_modules" not in self.model_fields_set:
            return self.model_copy(update={"target_modules": list(TARGET_MODULES)})
        return self

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, v: list[str] | str, info: ValidationInfo) -> list[str]:
        kind = validation_base_kind(info)
        known = TARGET_MODULES_BY_KIND[kind]
        if v == "all-linear":
            return list(known)
        if isinstance(v, str):
            v = [v]
        if not v:
            raise ValueError("at least one target module is required")
        unknown = [t for t in v if t not in known]
        if unknown:
            raise ValueError(f"unknown target module(s) {unknown}; known: {list(known)} ({kind})")
        return sorted(set(v), key=known.index)

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)
