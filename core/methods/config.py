"""What every method config is: a frozen pydantic model whose fields document themselves.

Torch-free on purpose: the service builds its request schema and ``GET /v1/methods`` from these
classes, and importing the API must not import torch. Every field carries a ``description``
(PEFT's convention), its default and its range; those are the single definition the API schema,
the OpenAPI document and the dashboard's form are derived from.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo

from core.errors import ConfigError
from core.targets import BaseKind


class MethodConfig(BaseModel):
    """Base of every method config. ``type`` is the method's registry name."""

    # Every parameter is finite, as every training setting is (TrainingConfig): Infinity
    # passes a lower bound alone (LoRA's alpha > 0).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    type: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **self.model_dump(mode="json")}

    def for_task(self, task: str) -> MethodConfig:
        """The config a run of ``task`` trains: this one, with any default that depends on the
        task (known once the training rows are read) filled in where none was given."""
        return self

    @property
    def reserved_positions(self) -> int:
        """Sequence positions the method occupies before the real tokens (prompt tuning's
        virtual tokens). Whoever tokenizes for this method truncates real text to
        ``base.max_length - reserved_positions`` (see ``AdapterMethod.max_input_length``).
        """
        return 0


def validation_base_kind(info: ValidationInfo) -> BaseKind:
    """The kind of base a config is being validated for (``parse_config``'s ``base_kind``)."""
    return (info.context or {}).get("base_kind", "encoder")


def parse_config(
    cls: type[MethodConfig], params: dict[str, Any] | None, base_kind: BaseKind = "encoder"
) -> MethodConfig:
    """Validate ``params`` into ``cls`` for a base of ``base_kind`` (a method's layer names
    differ per kind); raise :class:`ConfigError` naming the first bad field."""
    try:
        return cls.model_validate(params or {}, context={"base_kind": base_kind})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or cls.type
        raise ConfigError(field, err["msg"]) from None
    except TypeError as e:
        raise ConfigError(cls.type, str(e)) from None
