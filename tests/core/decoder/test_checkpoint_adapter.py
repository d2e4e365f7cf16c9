"""A decoder job's checkpoint served as an adapter (adapter_from_checkpoint): chat SFT, DPO and
the decoder's reward and classification heads, on the tiny Llama."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.forward import forward
from core.decoder.scoring import score_decoder_pairs
from core.errors import AdapterFormatError
from core.methods.full.model import DecoderFullModel
from core.methods.prompt_tuning.model import DecoderPromptTuningModel
from core.training.checkpoint import adapter_from_checkpoint
from core.training.decoder import DecoderTrainer
from core.training.decoder_head import DecoderHeadTrainer
from tests.core.decoder.test_heads import preference_rows
from tests.core.decoder.test_training import WORDS, chat_rows, dpo_rows
from tests.core.training.test_checkpoint_adapter import (
    assert_same_adapter,
    train_with_final_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The result is the last weights: no validation, and a reward model's epochs not averaged.
CFG = {
    "n_epochs": 2,
    "batch_size": 4,
    "learning_rate": 1e-2,
    "seed": 3,
    "validation_fraction": 0,
    "average_epochs": False,
}
METHODS = [
    {"type": "lora", "r": 4, "dropout": 0.1},
    {"type": "full"},
    {"type": "prompt_tuning", "n_virtual_tokens": 4},
]


def hidden_states(adapter: Adapter, base: DecoderBase) -> torch.Tensor:
    """The adapted decoder's final hidden states over a few prompts."""
    method = adapter.load_method(base)
    w = method.decoder_weights() if isinstance(method, DecoderFullModel) else base.weights
    prefix = method.prefix() if isinstance(method, DecoderPromptTuningModel) else None
    ids = torch.tensor([base.tokenizer("What is 2 plus 3?")["input_ids"]])
    with torch.inference_mode():
        return forward(w, ids, None, hooks=method.hooks(), prefix=prefix)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("task", ["chat", "dpo"])
def test_final_checkpoint_is_the_trained_chat_or_dpo_adapter(
    tiny_decoder: DecoderBase, task: str, method: dict[str, Any]
) -> None:
    rows = chat_rows(12) if task == "chat" else dpo_rows(WORDS[:8])
    result, data = train_with_final_checkpoint(
        DecoderTrainer, tiny_decoder, method, {"task": task}, rows, None, CFG
    )
    adapter = adapter_from_checkpoint(data, tiny_decoder)
    assert_same_adapter(adapter, result.adapter)
    assert adapter.head_state == {} and adapter.task == task
    assert torch.equal(
        hidden_states(adapter, tiny_decoder), hidden_states(result.adapter, tiny_decoder)
    )


@pytest.mark.parametrize("method", METHODS)
def test_final_checkpoint_is_the_trained_decoder_reward_model(
    tiny_decoder: DecoderBase, method: dict[str, Any]
) -> None:
    result, data = train_with_final_checkpoint(
        DecoderHeadTrainer, tiny_decoder, method, {"task": "reward"}, preference_rows(WORDS),
        None, CFG,
    )  # fmt: skip
    adapter = adapter_from_checkpoint(data, tiny_decoder)
    assert_same_adapter(adapter, result.adapter)
    prompts, responses = ["Say red."] * 2, ["red!", "No."]
    assert torch.equal(
        score_decoder_pairs(adapter.build_decoder_head(tiny_decoder), prompts, responses),
        score_decoder_pairs(result.adapter.build_decoder_head(tiny_decoder), prompts, responses),
    )


def test_decoder_classifier_checkpoint_and_the_other_base(
    tiny_decoder: DecoderBase, tiny_base: FrozenBase
) -> None:
    rows = [{"text": f"it is {w}", "label": "warm" if i % 2 else "cold"} for i, w in
            enumerate(WORDS * 2)]  # fmt: skip
    result, data = train_with_final_checkpoint(
        DecoderHeadTrainer, tiny_decoder, METHODS[0], {"task": "classification"}, rows, None, CFG
    )
    assert_same_adapter(adapter_from_checkpoint(data, tiny_decoder), result.adapter)
    with pytest.raises(AdapterFormatError, match="decoder"):
        adapter_from_checkpoint(data, tiny_base)
