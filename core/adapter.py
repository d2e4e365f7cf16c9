"""A trained adapter as a value: configs + tensors, independent of where it is stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from core.base import FrozenBase
from core.errors import AdapterFormatError
from core.heads import Head, HeadConfig
from core.methods import MethodConfig, build_method, parse_method_config
from core.model import AdaptedModel
from core.tensors import tensor_bytes


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
    def num_bytes(self) -> int:
        return tensor_bytes([*self.method_state.values(), *self.head_state.values()])

    @classmethod
    def from_model(
        cls, model: AdaptedModel, trainable_params: int, metrics: dict[str, Any]
    ) -> Adapter:
        return cls(
            method=model.method.config,
            head=model.head.config,
            method_state={
                k: v.detach().cpu().clone() for k, v in model.method.saved_state().items()
            },
            head_state={k: v.detach().cpu().clone() for k, v in model.head.state_dict().items()},
            base_name=model.base.name,
            base_fingerprint=model.base.fingerprint,
            trainable_params=trainable_params,
            metrics=metrics,
        )

    def check_base(self, base: FrozenBase) -> None:
        if self.base_fingerprint and self.base_fingerprint != base.fingerprint:
            raise AdapterFormatError(
                f"adapter was trained on base model {self.base_name!r} "
                f"(fingerprint {self.base_fingerprint[:12]}), not on the loaded {base.name!r}"
            )

    def build(self, base: FrozenBase) -> AdaptedModel:
        """An eval-ready model on ``base`` with this adapter's weights (base weights untouched)."""
        self.check_base(base)
        method = build_method(self.method, base)
        head = Head(self.head, base.hidden_size).to(base.device)
        try:
            method.load_saved_state({k: v.to(base.device) for k, v in self.method_state.items()})
            head.load_state_dict({k: v.to(base.device) for k, v in self.head_state.items()})
        except (ValueError, RuntimeError) as e:
            raise AdapterFormatError(f"adapter weights do not fit its config: {e}") from None
        model = AdaptedModel(base, method, head)
        model.requires_grad_(False).eval()
        return model

    def config_dict(self) -> dict[str, Any]:
        return {
            "format": "loraplex.adapter/1",
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
            method = parse_method_config(method_cfg.pop("type"), method_cfg)
            head = HeadConfig(**cfg["head"])
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterFormatError(f"invalid adapter config: {e}") from None
        return cls(
            method=method,
            head=head,
            method_state=method_state,
            head_state=head_state,
            base_name=cfg.get("base_name", ""),
            base_fingerprint=cfg.get("base_fingerprint", ""),
            trainable_params=int(cfg.get("trainable_params", 0)),
            metrics=dict(cfg.get("metrics", {})),
        )
