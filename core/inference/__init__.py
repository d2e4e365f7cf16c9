"""Serving many adapters from one frozen base: stacked LoRA bank, mixed batches, residency.

``engine`` is the facade: it plans batches on its owner thread and hands them to ``execute``
(forwards and heads, any thread); ``residency`` keeps the LRU ledger of resident adapters (on
``lru``), ``rows`` holds what callers pass in and get back, ``bank`` the stacked LoRA weights,
``merged_cache`` the merged-weight copies, ``tokens`` rows' token ids (any thread, bounded by
the window) and the batch's token tensors.
"""

from core.inference.bank import LoraBank, MixedLoraHooks
from core.inference.engine import EngineStats, InferenceEngine
from core.inference.execute import Plan
from core.inference.merged_cache import MergedCache
from core.inference.residency import ResidencyError
from core.inference.rows import AdapterNotResidentError, Encoded, Row, RowResult
from core.inference.tokens import RowEncoder

__all__ = [
    "AdapterNotResidentError",
    "Encoded",
    "EngineStats",
    "InferenceEngine",
    "LoraBank",
    "MergedCache",
    "MixedLoraHooks",
    "Plan",
    "ResidencyError",
    "Row",
    "RowEncoder",
    "RowResult",
]
