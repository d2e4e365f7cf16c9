"""Turning a core ``Adapter`` into its database row and back: one place for both directions.

Used by the worker (trained adapters) and by the import route (uploaded PEFT folders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.db.models import AdapterRow

if TYPE_CHECKING:  # core imports torch; keep it out of module import time for the API
    from core.adapter import Adapter
    from core.base import FrozenBase
    from core.decoder.base import DecoderBase


def adapter_row_from(
    adapter: Adapter,
    base: FrozenBase | DecoderBase,
    *,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
) -> AdapterRow:
    """A new, unsaved row holding ``adapter``'s config JSON and safetensors bytes.

    Tenant, version and source job are left unset: ``finish_success`` (or the import route)
    fills them inside the transaction that inserts the row.
    """
    from core.io.serialization import adapter_to_bytes

    config, weights = adapter_to_bytes(adapter)
    return AdapterRow(
        name=name,
        method=adapter.method.type,
        task=adapter.task,
        config=config,
        weights=weights,
        label_names=list(adapter.head.label_names) or None,
        metrics=metrics if metrics is not None else (adapter.metrics or None),
        trainable_params=adapter.trainable_params,
        trainable_pct=100.0 * adapter.trainable_params / max(base.num_params, 1),
        size_bytes=len(weights),
        base_model=adapter.base_name or base.name,
        base_fingerprint=adapter.base_fingerprint or base.fingerprint,
    )


def adapter_from_row(row: AdapterRow) -> Adapter:
    """Parse a stored row back into a core ``Adapter`` (safetensors only, never pickle)."""
    from core.io.serialization import adapter_from_bytes

    return adapter_from_bytes(row.config, row.weights)
