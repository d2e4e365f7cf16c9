"""Names of the encoder's linear layers that adaptation methods may target.

Plain data, kept out of :mod:`core.encoder` so that method configs (and the API request schema
built from them) can name their targets without importing torch.
"""

from __future__ import annotations

# Linear layers an adapter may target, named by their path inside ``encoder.layer.N``.
# ``output.dense`` is the feed-forward output (``encoder.layer.N.output.dense``), not the
# attention output, which is ``attention.output.dense``.
TARGET_MODULES: tuple[str, ...] = (
    "query",
    "key",
    "value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)
TARGET_PATHS: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}
