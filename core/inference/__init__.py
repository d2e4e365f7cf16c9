"""Serving many adapters from one frozen base: stacked LoRA bank, mixed batches, residency."""

from core.inference.bank import LoraBank, MixedLoraHooks
from core.inference.engine import (
    AdapterNotResidentError,
    EngineStats,
    InferenceEngine,
    Plan,
    ResidencyError,
    Row,
    RowResult,
)
from core.inference.merged_cache import MergedCache

__all__ = [
    "AdapterNotResidentError",
    "EngineStats",
    "InferenceEngine",
    "LoraBank",
    "MergedCache",
    "MixedLoraHooks",
    "Plan",
    "ResidencyError",
    "Row",
    "RowResult",
]
