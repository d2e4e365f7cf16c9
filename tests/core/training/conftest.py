"""Synthetic data for trainer tests on the session ``tiny_base`` (tests/conftest.py)."""

from __future__ import annotations

import random
from typing import Any

import pytest

POSITIVE = ["good", "great", "fine", "fun", "love"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "hate"]
FILLER = [
    "the", "a", "movie", "film", "story", "actor", "plot", "was", "is", "this", "that", "it",
    "very", "really", "so",
]  # fmt: skip


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Balanced "pos"/"neg" rows: filler words of varied length plus one sentiment word.

    Easy (one token decides the label) and varied in length (2-16 words) for bucketing.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [rng.choice(FILLER) for _ in range(rng.randint(1, 15))]
        words.insert(
            rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        )
        rows.append({"text": " ".join(words), "label": label})
    return rows


def preference_rows(n: int, seed: int = 0, prompt: bool = True) -> list[dict[str, Any]]:
    """Pairs whose chosen response holds a positive word and rejected one a negative word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        filler = [rng.choice(FILLER) for _ in range(rng.randint(1, 8))]
        row = {
            "chosen": " ".join([*filler, rng.choice(POSITIVE)]),
            "rejected": " ".join([*filler, rng.choice(NEGATIVE)]),
        }
        if prompt:
            row["prompt"] = "this movie"
        rows.append(row)
    return rows


@pytest.fixture
def easy_rows() -> list[dict[str, Any]]:
    return sentiment_rows(120)


@pytest.fixture
def easy_val_rows() -> list[dict[str, Any]]:
    return sentiment_rows(40, seed=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for these tiny models: faster (no spin-waiting on a shared, busy
    machine) and the same thread count for every run a determinism test compares. The library
    never sets it (process-wide); tests may, and restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
