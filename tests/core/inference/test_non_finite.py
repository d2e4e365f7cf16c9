"""A head output that overflows to inf or NaN is its row's error, never its result: a served
adapter whose weights pass the import's one probe may still overflow on other inputs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.inference import InferenceEngine, Row
from core.inference.execute import NonFiniteOutputError
from tests.core.inference.helpers import lora, output, reference

TEXTS = ["x", "good", "a longer sentence to score", "[SEP]", "bad"]


def _huge_head(adapter: Adapter, weight: float, bias: float = 0.0) -> Adapter:
    """``adapter`` with every head weight ``weight`` and bias ``bias``: finite numbers whose
    outputs overflow float32 (3.4e38) on some inputs or all."""
    state = adapter.head_state
    head_state = {
        "out.weight": torch.full_like(state["out.weight"], weight),
        "out.bias": torch.full_like(state["out.bias"], bias),
    }
    return replace(adapter, head_state=head_state)


def _engine(base: FrozenBase, adapters: dict[str, Adapter]) -> InferenceEngine:
    engine = InferenceEngine(base, device="cpu")
    for key, adapter in adapters.items():
        engine.load(key, adapter)
    return engine


@pytest.mark.parametrize("mode", ["unmerged", "merged"])
@pytest.mark.parametrize("n_labels", [None, 2], ids=["reward", "classification"])
def test_a_non_finite_output_is_the_rows_error(
    tiny_base: FrozenBase, mode: str, n_labels: int | None
) -> None:
    fine = lora(tiny_base, r=4, seed=1)
    bad = _huge_head(lora(tiny_base, r=2, seed=2, n_labels=n_labels), 3e38)
    assert all(not torch.isfinite(reference(tiny_base, bad, t)).all() for t in TEXTS)
    engine = _engine(tiny_base, {"fine": fine, "bad": bad})
    rows = [Row(key, text, mode=mode) for text in TEXTS for key in ("fine", "bad")]  # type: ignore[arg-type]

    results = engine.run(rows)

    for row, result in zip(rows, results, strict=True):
        if row.key == "bad":
            assert isinstance(result.error, NonFiniteOutputError), result
            assert result.reward is None and result.probabilities is None
        else:  # the other adapter's rows in the same batch are untouched
            want = reference(tiny_base, fine, row.text)
            assert output(result).tolist() == pytest.approx(want.tolist(), abs=1e-5)


def test_only_the_rows_that_overflow_fail(tiny_base: FrozenBase) -> None:
    # Rewards near 3.2e38 to 3.45e38: over float32's largest (3.4e38) for some texts only.
    rm = _huge_head(lora(tiny_base, r=2, seed=2, n_labels=None), 1e38, 3e38)
    want = {t: float(reference(tiny_base, rm, t)[0]) for t in TEXTS}
    assert {math.isfinite(r) for r in want.values()} == {True, False}

    results = _engine(tiny_base, {"rm": rm}).run([Row("rm", t) for t in TEXTS])

    for text, result in zip(TEXTS, results, strict=True):
        if math.isfinite(want[text]):
            assert result.reward == pytest.approx(want[text], rel=1e-5)
        else:
            assert isinstance(result.error, NonFiniteOutputError)
