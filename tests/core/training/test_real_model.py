"""One short LoRA run on the real all-MiniLM-L6-v2 with real Rotten Tomatoes rows."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from core.training.trainer import Trainer

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "rotten_tomatoes_small.jsonl"


@pytest.mark.real_model
def test_lora_one_epoch_beats_majority(real_base) -> None:
    if not FIXTURE.is_file():
        pytest.skip(f"{FIXTURE} not created yet")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    train, val = rows[:200], rows[200:400]
    majority = max(Counter(r["label"] for r in val).values()) / len(val)

    t0 = time.monotonic()
    cfg = {"n_epochs": 1, "batch_size": 8, "learning_rate": 5e-3, "max_seq_length": 64}
    result = Trainer(
        real_base, {"type": "lora", "r": 8}, {"task": "classification"}, train, val, cfg
    ).train()
    elapsed = time.monotonic() - t0

    assert result.adapter.head.label_names == ["fresh", "rotten"]
    assert result.metrics["val_accuracy"] > majority + 0.05, (result.metrics, majority)
    assert elapsed < 60
