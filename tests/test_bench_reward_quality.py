"""Smoke test of bench.reward_quality on the tiny random BERT: every case, a few steps."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from bench import reward_quality as rq
from core.base import FrozenBase
from core.training import data as training_data

FIELDS = {
    "case", "accuracy", "ties", "identical_pairs", "mean_margin", "train_s", "steps",
    "max_seq_length", "split_rows", "test_pairs",
}  # fmt: skip


def dialogue_pairs(n: int, offset: int = 0) -> list[dict[str, str]]:
    """HH-shaped rows: one dialogue each, the final assistant turns differ."""
    words = ["good", "great", "fun", "bad", "awful", "boring"]
    rows = []
    for i in range(offset, offset + n):
        history = f"\n\nHuman: is the {['movie', 'film', 'story'][i % 3]} any good"
        rows.append(
            {
                "chosen": f"{history}\n\nAssistant: it is {words[i % 3]}",
                "rejected": f"{history}\n\nAssistant: it is {words[3 + i % 3]}",
            }
        )
    return rows


@pytest.mark.parametrize("case", rq.CASES, ids=[c.name for c in rq.CASES])
def test_every_case_trains_and_scores(tiny_base: FrozenBase, case: rq.Case) -> None:
    saved = training_data.encode_responses
    row = rq.run_case(tiny_base, case, dialogue_pairs(24), dialogue_pairs(8, 24), {"max_steps": 2})
    assert training_data.encode_responses == saved  # restored
    row = json.loads(json.dumps(row))  # what --json writes
    assert set(row) >= FIELDS and row["case"] == case.name
    assert 0.0 <= row["accuracy"] <= 1.0 and row["test_pairs"] == 8 and row["steps"] == 2
    assert row["max_seq_length"] <= tiny_base.max_length
    # Only the cases that split whole dialogues say so; the default is also served.
    splits = case.training.get("split_shared_prefix", True) and case.encoding != "response"
    assert row["split_rows"] == (24 if splits else 0)
    if case.name == "default":
        assert row["engine_max_abs_diff"] < 1e-4


def test_hh_split_is_the_seeded_80_20_permutation(tmp_path: Path) -> None:
    path = tmp_path / "hh.jsonl.gz"
    rows = dialogue_pairs(10)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    got = rq.hh_pairs(path, quick=False)
    assert got is not None
    train, test = got
    assert (len(train), len(test)) == (8, 2)
    assert sorted(map(str, train + test)) == sorted(map(str, rows))
    # The validation split: the last fifth of the training pairs, the held-out pairs unseen.
    got = rq.hh_pairs(path, quick=False, validation=True)
    assert got is not None
    fit, val = got
    assert (len(fit), len(val)) == (6, 2) and fit + val == train
    assert rq.hh_pairs(tmp_path / "absent.jsonl.gz", quick=False) is None


def test_summary_over_seeds_is_each_cases_mean_and_spread() -> None:
    def row(case: str, seed: int, acc: float, ties: int, margin: float) -> dict[str, object]:
        fields = ("dataset", "case", "seed", "accuracy", "ties", "mean_margin")
        return dict(zip(fields, ("hh", case, seed, acc, ties, margin), strict=True))

    rows = [
        row("default", 0, 0.632, 0, 0.18),
        row("default", 1, 0.600, 2, 0.05),
        row("default", 2, 0.628, 1, 0.15),
        row("frozen", 0, 0.605, 0, 0.40),
    ]
    default, frozen = rq.summarize(rows)
    assert default["case"] == "default" and default["seeds"] == [0, 1, 2]
    assert default["accuracy_mean"] == 0.62 and default["accuracy_sd"] == 0.0174
    assert (default["accuracy_min"], default["accuracy_max"]) == (0.6, 0.632)
    assert default["ties_mean"] == 1.0 and default["mean_margin"] == 0.1267
    assert frozen["accuracy_mean"] == 0.605 and frozen["accuracy_sd"] == 0.0
    assert "0.620 ± 0.017" in rq._summary_line(default)
