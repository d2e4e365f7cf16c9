from __future__ import annotations

from typing import ClassVar

from core.methods.feature_extraction.config import FeatureExtractionConfig
from core.methods.method import AdapterMethod


class FeatureExtractionModel(AdapterMethod):
    """No encoder parameters: the base's pooled features go straight into the head.

    ``frozen_features`` tells the trainer the features never change during training, so it
    computes them once (one forward over the data set) and trains the head on the cache.
    """

    config: FeatureExtractionConfig
    frozen_features: ClassVar[bool] = True
