"""The decoder fixtures (tiny random Llama, SmolLM2), shared with tests/core/decoder."""

from tests.core.decoder.conftest import real_decoder, tiny_decoder, tiny_llama_dir

__all__ = ["real_decoder", "tiny_decoder", "tiny_llama_dir"]
