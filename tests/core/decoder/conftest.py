"""Decoder fixtures: ``tiny_decoder`` (random tiny Llama, fast) and ``real_decoder`` (SmolLM2).

Tests that use ``real_decoder`` carry the ``real_model`` marker themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from core.decoder.base import DecoderBase, load_decoder_base
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME, build_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_decoder(tiny_llama_dir: Path) -> DecoderBase:
    return load_decoder_base(tiny_llama_dir, name=TINY_LLAMA_NAME, device="cpu")


@pytest.fixture(scope="session")
def real_decoder() -> DecoderBase:
    """SmolLM2-135M-Instruct dequantised from its GGUF file (seconds, once per session)."""
    return load_decoder_base(device="cpu")
