from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from core.methods.base import MethodConfig

NonLinearity = Literal["relu", "gelu", "swish", "tanh"]
Placement = Literal["houlsby", "pfeiffer"]


class BottleneckConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

    ``houlsby`` puts one adapter after the attention output and one after the feed-forward
    output of every layer; ``pfeiffer`` only the feed-forward one (half the parameters).
    """

    type: ClassVar[str] = "adapter"
    bottleneck_size: int = Field(64, ge=1, le=4096)
    non_linearity: NonLinearity = "relu"
    placement: Placement = "houlsby"
    # Std of the down-projection's normal init. The up-projection starts at zero, so the
    # adapter is the identity until trained; a zero down-projection too would get no gradient.
    init_scale: float = Field(0.02, gt=0.0, le=1.0)

    @property
    def sites(self) -> tuple[str, ...]:
        """Sub-layers that get an adapter (``EncoderHooks.sublayer_output``'s ``where``)."""
        return ("attention", "ffn") if self.placement == "houlsby" else ("ffn",)
