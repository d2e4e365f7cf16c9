"""Smoke test of bench.strategies on the tiny random BERT: a few steps, two strategies."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from bench import strategies as bs
from core.base import FrozenBase

FIELDS = {
    "method", "test_accuracy", "trainable_params", "trainable_pct", "train_seconds",
    "adapter_bytes",
}  # fmt: skip


def synthetic_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    good, bad = ["good", "great", "fun", "love"], ["bad", "terrible", "awful", "boring"]
    rows = []
    for i in range(n):
        label = "fresh" if i % 2 else "rotten"
        words = rng.choices(good if label == "fresh" else bad, k=3)
        rows.append({"text": f"the movie was {' '.join(words)}", "label": label})
    return rows


def check_row(row: dict[str, Any], base: FrozenBase) -> None:
    assert set(row) >= FIELDS
    assert 0.0 <= row["test_accuracy"] <= 1.0
    assert isinstance(row["trainable_params"], int) and row["trainable_params"] > 0
    expected_pct = 100 * row["trainable_params"] / base.num_params
    assert row["trainable_pct"] == pytest.approx(expected_pct, abs=1e-3)
    assert row["train_seconds"] >= 0
    assert row["adapter_bytes"] > 0


def test_run_strategies_rows(tiny_base: FrozenBase) -> None:
    train, val, test = synthetic_rows(32, 0), synthetic_rows(8, 1), synthetic_rows(12, 2)
    rows = bs.run_strategies(
        tiny_base,
        train,
        val,
        test,
        ["feature_extraction", "lora_r4"],
        {"max_steps": 3, "batch_size": 8},
    )
    rows = json.loads(json.dumps(rows))  # what --json writes
    assert [r["method"] for r in rows] == ["feature_extraction", "lora_r4"]
    for r in rows:
        check_row(r, tiny_base)
        assert r["steps"] == 3
    fe, lora = rows
    # Feature extraction trains the head alone: hidden x 2 labels + 2 biases.
    assert fe["trainable_params"] == tiny_base.hidden_size * 2 + 2
    # LoRA r=4 on query+value: 2 targets x layers x (A: r x h + B: h x r), plus the head.
    h, n_layers = tiny_base.hidden_size, tiny_base.num_layers
    assert lora["trainable_params"] == 2 * n_layers * 2 * 4 * h + fe["trainable_params"]
    assert lora["trainable_params"] < tiny_base.num_params
    # The adapter file holds at least its float32 weights.
    assert lora["adapter_bytes"] >= 4 * lora["trainable_params"]


def test_main_writes_json(
    tiny_base: FrozenBase,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import core.base

    splits = (synthetic_rows(24, 0), synthetic_rows(8, 1), synthetic_rows(10, 2), "synthetic")
    monkeypatch.setattr(bs, "load_splits", lambda *a: splits)
    monkeypatch.setattr(core.base, "load_base_model", lambda **kw: tiny_base)
    monkeypatch.setattr(bs.torch, "set_num_threads", lambda n: None)  # process-wide: keep it
    out = tmp_path / "rows.json"
    bs.main(["--quick", "--methods", "full,lora_r8", "--max-steps", "2", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["full", "lora_r8"]
    for r in rows:
        check_row(r, tiny_base)
    assert rows[0]["trainable_pct"] > 100 > rows[1]["trainable_pct"]
    captured = capsys.readouterr()
    assert "QUICK MODE" in captured.out and "lora_r8" in captured.out
    assert "step 2/2" in captured.err


def test_unknown_method_is_refused() -> None:
    with pytest.raises(SystemExit):
        bs.main(["--methods", "lora_r8,nope"])
