from __future__ import annotations

from typing import ClassVar

from core.methods.config import MethodConfig


class FullConfig(MethodConfig):
    """Full fine-tuning: every encoder weight is trained.

    The expensive option: each adapter stores and keeps resident a whole encoder copy (~90 MB
    for MiniLM, float32) and cannot share a mixed batch with other adapters.
    """

    type: ClassVar[str] = "full"
