"""Our stateless encoder and LoRA against Hugging Face ``BertModel`` and the real ``peft``."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.io.peft import export_peft
from core.methods.lora.layer import merge_pairs
from core.methods.lora.model import LoraModel
from tests.core.util import batch, hidden, make_method, make_model, randomize, write_files

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def hf_bert(model_dir: Path) -> torch.nn.Module:
    return transformers.BertModel.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def real_hf(real_base: FrozenBase) -> torch.nn.Module:
    return hf_bert(real_base.path)


def hf_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def peft_hidden_for(
    adapter_model: torch.nn.Module, base: FrozenBase, hf: torch.nn.Module, folder: Path
) -> tuple[torch.Tensor, torch.nn.Module]:
    """Export ``adapter_model``, load it with ``PeftModel.from_pretrained`` on a copy of ``hf``."""
    adapter = Adapter.from_model(adapter_model, 0, {})
    write_files(export_peft(adapter, base), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our extra "loraplex" config key
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder)).eval()
    return hf_hidden(peft_model, batch(base)), peft_model


def test_encoder_equals_hf_bert_tiny(tiny_base: FrozenBase) -> None:
    inputs = tiny_base.tokenize(["the movie"], ["was great"])  # exercises token type 1
    expected = hf_hidden(hf_bert(tiny_base.path), inputs)
    got = hidden(make_method(tiny_base, "feature_extraction"), inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.real_model
def test_encoder_equals_hf_bert_real(real_base: FrozenBase, real_hf: torch.nn.Module) -> None:
    inputs = real_base.tokenize(["a quietly moving film", "dull"], ["yes", "no, not at all"])
    expected = hf_hidden(real_hf, inputs)
    got = hidden(make_method(real_base, "feature_extraction"), inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


LORA_CASES = [
    {"r": 8, "target_modules": ["query", "value"]},
    {"r": 4, "target_modules": "all-linear", "alpha": 8.0},
    {"r": 8, "target_modules": ["query", "key", "output.dense"], "use_rslora": True},
]


@pytest.mark.real_model
@pytest.mark.parametrize("params", LORA_CASES, ids=["qv-r8", "all-linear-r4", "rslora"])
def test_unmerged_lora_equals_peft_and_merged_equals_unmerged(
    real_base: FrozenBase, real_hf: torch.nn.Module, tmp_path: Path, params: dict
) -> None:
    model = make_model(real_base, "lora", **params)
    randomize(model.method, std=0.05)  # random non-zero B (and A) so LoRA really acts
    method = model.method
    assert isinstance(method, LoraModel)
    inputs = batch(real_base)
    ours = hidden(method, inputs)
    theirs, peft_model = peft_hidden_for(model, real_base, real_hf, tmp_path)
    # PEFT wrapped exactly our sites: PEFT's list suffixes would put "output.dense" on the
    # attention output too, which the exported regex avoids.
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A}
    assert len(wrapped) == len(method.sites)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - hidden(make_method(real_base, "feature_extraction"), inputs)).abs().max() > 1e-2
    pairs, scaling, device = method.pairs(), method.config.scaling, real_base.device
    hooks = merge_pairs(real_base.encoder, pairs, scaling, device=device, dtype=torch.float32)
    merged = hidden(method, inputs, hooks=hooks)  # the engine's mode="merged" weights
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=0)
