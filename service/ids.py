"""Public object ids: ``<prefix>-<24 hex>``, random so they leak neither counts nor order."""

from __future__ import annotations

import secrets

TENANT = "tenant"
API_KEY = "key"
DATASET = "file"
JOB = "ftjob"
CHECKPOINT = "ftckpt"
ADAPTER = "adapter"
EVENT = "ftevent"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def short_hex(n_chars: int = 6) -> str:
    """Random suffix for generated names such as ``lora-3fa9c1``."""
    return secrets.token_hex((n_chars + 1) // 2)[:n_chars]
