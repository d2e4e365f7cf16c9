"""Shared fixtures: ``tiny_base`` (random tiny BERT, fast) and ``real_base`` (MiniLM).

Tests that use ``real_base`` are marked ``real_model`` automatically, so
``pytest -m "not real_model"`` skips every test that loads the real weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from core.base import FrozenBase, load_base_model
from tests.tiny_bert import TINY_NAME, build_tiny_bert


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "real_base" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder of a tiny random BERT (hidden 32, 2 layers, 4 heads) in Hugging Face layout."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir: Path) -> FrozenBase:
    return load_base_model(tiny_model_dir, name=TINY_NAME, device="cpu")


@pytest.fixture(scope="session")
def real_base() -> FrozenBase:
    """all-MiniLM-L6-v2 from its wheel (~4 s once per session)."""
    return load_base_model(device="cpu")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for the test: tiny models run faster without spin-waiting on a
    shared, busy machine. The library never sets it (process-wide); tests may, and restore it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
