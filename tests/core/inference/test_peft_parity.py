"""Real all-MiniLM-L6-v2: 8 mixed LoRA adapters equal PEFT's output, adapter by adapter."""

from __future__ import annotations

import pytest
import torch

from core.base import FrozenBase
from core.inference import InferenceEngine, Row
from tests.core.inference.helpers import random_adapter

pytestmark = pytest.mark.real_model

TEXTS = [
    "A gripping, beautifully acted drama that never lets go.",
    "Two hours of my life I will never get back.",
    "The plot is thin, but the jokes land and the cast is having fun.",
    "An ambitious mess.",
]


def test_mixed_batch_matches_peft_per_adapter(real_base: FrozenBase) -> None:
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    adapters = {
        f"a{i}": random_adapter(
            real_base, "lora", {"r": 8, "alpha": 16}, n_labels=2, seed=i, noise=0.05
        )
        for i in range(8)
    }
    engine = InferenceEngine(real_base, device="cpu")
    for key, a in adapters.items():
        engine.load(key, a)
    rows = [Row(f"a{i % 8}", TEXTS[i % len(TEXTS)]) for i in range(24)]
    results = engine.run(rows, with_features=True)

    hf = BertModel.from_pretrained(str(real_base.path), add_pooling_layer=False).eval()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    model = peft.get_peft_model(hf, cfg, adapter_name="a0")
    for key, a in adapters.items():
        if key != "a0":
            model.add_adapter(key, cfg)
        state = {"base_model.model." + k: v for k, v in a.method_state.items()}
        loaded = peft.set_peft_model_state_dict(model, state, adapter_name=key)
        assert not loaded.unexpected_keys
    model.eval()

    with torch.inference_mode():
        for key, a in adapters.items():
            mine = [(r, res) for r, res in zip(rows, results, strict=True) if r.key == key]
            batch = real_base.tokenize([r.text for r, _ in mine])
            model.set_adapter(key)
            hidden = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).float()
            want = (hidden * m).sum(1) / m.sum(1)
            got = torch.tensor([res.features for _, res in mine])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            logits = torch.nn.functional.linear(
                want, a.head_state["out.weight"], a.head_state["out.bias"]
            )
            torch.testing.assert_close(
                torch.tensor([res.logits for _, res in mine]), logits, atol=1e-5, rtol=0
            )
            # The adapters are really different from the base and from each other.
            assert (got - real_base.embed(batch)).abs().max() > 1e-2
