from __future__ import annotations

from typing import ClassVar

from core.methods.config import MethodConfig


class FeatureExtractionConfig(MethodConfig):
    """Frozen base + trained head only (linear probe). No settings."""

    type: ClassVar[str] = "feature_extraction"
