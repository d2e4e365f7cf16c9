"""A trained adapter as a value: configs + tensors, independent of where it is stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.scoring import DecoderHeadModel
from core.errors import AdapterFormatError
from core.heads import Head, HeadConfig
from core.methods import MethodConfig, build_method, parse_method_config
from core.methods.method import AdapterMethod
from core.model import AdaptedModel
from core.targets import BaseKind
from core.tensors import tensor_bytes

# The "format" of an adapter's config (config_dict), which a checkpoint's adapter shares.
ADAPTER_FORMAT = "loraplex.adapter/1"


def base_kind_of(base: FrozenBase | DecoderBase) -> BaseKind:
    return "decoder" if isinstance(base, DecoderBase) else "encoder"


@dataclass
class Adapter:
    method: MethodConfig
    head: HeadConfig
    method_state: dict[str, Tensor]
    head_state: dict[str, Tensor]
    base_name: str
    base_fingerprint: str
    trainable_params: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.head.task

    @property
    def base_kind(self) -> BaseKind:
        """The kind of base it was trained on: a decoder's language-model tasks and heads that
        read the last token (``pooling="last_token"``) are a decoder's."""
        return self.head.base_kind

    @property
    def num_bytes(self) -> int:
        return tensor_bytes([*self.method_state.values(), *self.head_state.values()])

    @classmethod
    def from_model(
        cls, model: AdaptedModel, trainable_params: int, metrics: dict[str, Any]
    ) -> Adapter:
        return cls.from_method(
            model.method, model.head.config, trainable_params, metrics, model.head.state_dict()
        )

    @classmethod
    def from_method(
        cls,
        method: AdapterMethod,
        head: HeadConfig,
        trainable_params: int,
        metrics: dict[str, Any],
        head_state: dict[str, Tensor] | None = None,
    ) -> Adapter:
        """A copy of ``method``'s weights (and a head's, if any) on the method's base."""
        base = method.base
        return cls(
            method=method.config,
            head=head,
            method_state={k: v.detach().cpu().clone() for k, v in method.saved_state().items()},
            head_state={k: v.detach().cpu().clone() for k, v in (head_state or {}).items()},
            base_name=base.name,
            base_fingerprint=base.fingerprint,
            trainable_params=trainable_params,
            metrics=metrics,
        )

    def check_base(self, base: FrozenBase | DecoderBase) -> None:
        """Invariant 8: refuses a base of the other kind, or another base of this kind."""
        kind = base_kind_of(base)
        if kind != self.base_kind:
            raise AdapterFormatError(
                f"adapter of task {self.task!r} was trained on {self.base_kind} base model "
                f"{self.base_name!r}, not on the loaded {kind} {base.name!r}"
            )
        if self.base_fingerprint and self.base_fingerprint != base.fingerprint:
            raise AdapterFormatError(
                f"adapter was trained on base model {self.base_name!r} "
                f"(fingerprint {self.base_fingerprint[:12]}), not on the loaded {base.name!r}"
            )

    def build(self, base: FrozenBase) -> AdaptedModel:
        """An eval-ready model on ``base`` with this adapter's weights (base weights untouched)."""
        method = self.load_method(base)
        model = AdaptedModel(base, method, self._load_head(base.hidden_size, base.device))
        model.requires_grad_(False).eval()
        return model

    def _load_head(self, hidden_size: int, device: torch.device) -> Head:
        """This adapter's head on ``device`` with its weights; weights that do not fit the
        head's config are refused."""
        head = Head(self.head, hidden_size).to(device)
        try:
            head.load_state_dict({k: v.to(device) for k, v in self.head_state.items()})
        except (ValueError, RuntimeError) as e:
            raise AdapterFormatError(f"adapter weights do not fit its config: {e}") from None
        return head

    def build_decoder_head(self, base: DecoderBase) -> DecoderHeadModel:
        """An eval-ready reward model or classifier on decoder ``base`` (its head reads the
        last token; :func:`core.decoder.scoring.score_decoder_pairs` scores with it)."""
        if self.head.task not in ("classification", "reward"):
            raise AdapterFormatError(f"a {self.task!r} adapter has no head")
        method = self.load_method(base)
        head = self._load_head(base.config.hidden_size, base.device)
        model = DecoderHeadModel(base, method, head)
        model.requires_grad_(False).eval()
        return model

    def load_method(self, base: FrozenBase | DecoderBase) -> AdapterMethod:
        """This adapter's method on ``base``, eval-ready (a decoder's forward takes its
        ``hooks()``); refused on another base (invariant 8)."""
        self.check_base(base)
        # LoRA, full fine-tuning and prompt tuning are built on either kind.
        method = build_method(self.method, base)  # type: ignore[arg-type]
        try:
            method.load_saved_state({k: v.to(base.device) for k, v in self.method_state.items()})
        except (ValueError, RuntimeError) as e:
            raise AdapterFormatError(f"adapter weights do not fit its config: {e}") from None
        method.requires_grad_(False).eval()
        return method

    def config_dict(self) -> dict[str, Any]:
        return {
            "format": ADAPTER_FORMAT,
            "method": self.method.to_dict(),
            "head": self.head.model_dump(mode="json"),
            "base_name": self.base_name,
            "base_fingerprint": self.base_fingerprint,
            "trainable_params": self.trainable_params,
            "metrics": self.metrics,
        }

    @classmethod
    def from_config_dict(
        cls, cfg: dict[str, Any], method_state: dict[str, Tensor], head_state: dict[str, Tensor]
    ) -> Adapter:
        try:
            method_cfg = dict(cfg["method"])
            head = HeadConfig(**cfg["head"])
            # A decoder's target names are validated as a decoder's.
            method = parse_method_config(method_cfg.pop("type"), method_cfg, head.base_kind)
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterFormatError(f"invalid adapter config: {e}") from None
        base_name, fingerprint = cfg.get("base_name", ""), cfg.get("base_fingerprint", "")
        if not isinstance(base_name, str) or not isinstance(fingerprint, str):
            raise AdapterFormatError(
                "invalid adapter config: base_name and base_fingerprint must be strings"
            )
        trainable = cfg.get("trainable_params", 0)
        # A count of parameters, as the trainer writes it (the database holds 64-bit ints);
        # no conversion, which would take "12", 1.5 or true, and fail on "abc" or Infinity.
        if type(trainable) is not int or not 0 <= trainable < 2**63:
            raise AdapterFormatError(
                f"invalid adapter config: trainable_params must be a count, got {trainable!r:.40}"
            )
        metrics = cfg.get("metrics", {})
        if not isinstance(metrics, dict):
            raise AdapterFormatError("invalid adapter config: metrics must be a JSON object")
        return cls(
            method=method,
            head=head,
            method_state=method_state,
            head_state=head_state,
            base_name=base_name,
            base_fingerprint=fingerprint,
            trainable_params=trainable,
            metrics=dict(metrics),
        )
