from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from core.methods.config import MethodConfig

NonLinearity = Literal["relu", "gelu", "swish", "tanh"]
Placement = Literal["houlsby", "pfeiffer"]


class BottleneckConfig(MethodConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

    `houlsby` puts one adapter after the attention output and one after the feed-forward
    output of every layer; `pfeiffer` only the feed-forward one (half the parameters).
    """

    type: ClassVar[str] = "adapter"
    bottleneck_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="Width each adapter projects down to (and back up from); more capacity and "
        "more trainable parameters as it grows.",
    )
    non_linearity: NonLinearity = Field(
        "relu", description="Activation between the down- and the up-projection."
    )
    placement: Placement = Field(
        "houlsby",
        description="houlsby: an adapter after the attention output and one after the "
        "feed-forward output of every layer; pfeiffer: only the feed-forward one (half the "
        "parameters).",
    )
    # A zero down-projection too would get no gradient, hence a small random one.
    init_scale: float = Field(
        0.02,
        gt=0.0,
        le=1.0,
        description="Standard deviation of the down-projection's normal initialisation. The "
        "up-projection starts at zero, so a new adapter leaves the base unchanged.",
    )

    @property
    def sites(self) -> tuple[str, ...]:
        """Sub-layers that get an adapter (``EncoderHooks.sublayer_output``'s ``where``)."""
        return ("attention", "ffn") if self.placement == "houlsby" else ("ffn",)
