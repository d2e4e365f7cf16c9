"""What callers hand the engine and get back: one :class:`Row` in, one :class:`RowResult` out."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal, get_args

# How the engine runs an adapter row: ``unmerged`` in the shared mixed batch, ``merged`` on a
# copy of the base with the adapter merged in. (A request's ``auto`` is the service's to resolve.)
ForwardMode = Literal["unmerged", "merged"]
FORWARD_MODES: tuple[ForwardMode, ...] = get_args(ForwardMode)


@dataclass(frozen=True)
class Encoded:
    """A row's token ids, truncated to ``max_length``: its adapter's window (the base's limit
    less the positions the adapter reserves). See :class:`core.inference.tokens.RowEncoder`."""

    input_ids: list[int]
    token_type_ids: list[int]
    max_length: int


@dataclass(frozen=True)
class Row:
    """One input. ``key`` names a resident adapter (any hashable), or None for the bare base.

    ``encoded``: the text's ids, tokenized by the caller on its own thread; without them the
    engine tokenizes ``text`` (and ``text_pair``) itself, on its owner thread.
    """

    key: Hashable | None
    text: str
    text_pair: str | None = None
    mode: ForwardMode = "unmerged"
    encoded: Encoded | None = field(default=None, repr=False)


@dataclass
class RowResult:
    """The answer for one row: the outputs of its task, or ``error`` (then nothing else).

    Classification: ``logits``, ``probabilities`` (softmax, keyed by label name) and ``label``
    (the argmax). Reward: ``reward``. Bare base (``key=None``): ``features`` (the pooled
    embedding); adapter rows carry ``features`` too when ``run(..., with_features=True)``.
    """

    key: Hashable | None
    task: str | None = None
    logits: list[float] | None = None
    probabilities: dict[str, float] | None = None
    label: str | None = None
    reward: float | None = None
    features: list[float] | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class AdapterNotResidentError(KeyError):
    """The row's adapter is not loaded (never loaded, unloaded or evicted) and no loader ran."""
