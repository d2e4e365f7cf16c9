"""PEFT CAUSAL_LM LoRA folders import onto the decoder base: the same logits as PEFT's own."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import LlamaForCausalLM

from core.decoder.base import DecoderBase
from core.decoder.forward import forward, logits
from core.errors import AdapterFormatError
from core.heads import HeadConfig
from core.io.peft import CONFIG_FILE, WEIGHTS_FILE, check_servable, export_peft, import_peft
from core.io.serialization import tensors_from_bytes, tensors_to_bytes
from core.methods import parse_method_config
from tests.core.decoder.helpers import random_decoder_lora


def _folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file()}


def test_a_peft_causal_lm_lora_imports_with_the_same_logits(
    tiny_decoder: DecoderBase, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    hf = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
    config = peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        layers_to_transform=[1],
        init_lora_weights=False,  # B random too: the adapter must change the logits
    )
    model = peft.get_peft_model(hf, config).eval()
    model.save_pretrained(str(tmp_path))
    files = _folder(tmp_path)
    names = tensors_from_bytes(files[WEIGHTS_FILE])
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names

    adapter = import_peft(files, tiny_decoder)
    assert (adapter.task, adapter.base_kind, adapter.head_state) == ("chat", "decoder", {})
    assert adapter.method.to_dict()["target_modules"] == ["q_proj", "v_proj", "o_proj", "down_proj"]
    assert adapter.method.to_dict()["layers"] == [1]
    ids = torch.tensor([[1, 5, 9, 23, 7, 3], [1, 40, 41, 42, 43, 44]])
    w = tiny_decoder.weights
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ours = logits(w, forward(w, ids, hooks=adapter.load_method(tiny_decoder).hooks()))
        bare = logits(w, forward(w, ids))
    assert (ours - bare).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_export_then_import_round_trips(tiny_decoder: DecoderBase) -> None:
    targets = ["k_proj", "gate_proj", "up_proj"]
    method = parse_method_config("lora", {"r": 2, "alpha": 4, "target_modules": targets}, "decoder")
    gen = torch.Generator().manual_seed(1)
    adapter = random_decoder_lora(tiny_decoder, method, HeadConfig(task="dpo"), gen)
    state = adapter.method_state
    back = import_peft(export_peft(adapter, tiny_decoder), tiny_decoder)
    assert back.method == method and back.head == adapter.head  # the loraplex head config
    assert back.method_state.keys() == state.keys()
    assert all(torch.equal(back.method_state[k], v) for k, v in state.items())


def test_foreign_or_misdescribed_weights_are_refused(tiny_decoder: DecoderBase) -> None:
    n_in, n_out = tiny_decoder.config.linear_shape("q_proj")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    good = {
        f"{prefix}.lora_A.weight": torch.zeros(2, n_in),
        f"{prefix}.lora_B.weight": torch.zeros(n_out, 2),
    }
    cfg = b'{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj"]}'
    assert import_peft({CONFIG_FILE: cfg, WEIGHTS_FILE: tensors_to_bytes(good)}, tiny_decoder)
    encoder_key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    with pytest.raises(AdapterFormatError, match="decoder's linear layers"):
        weights = tensors_to_bytes({**good, encoder_key: torch.zeros(2, n_in)})
        import_peft({CONFIG_FILE: cfg, WEIGHTS_FILE: weights}, tiny_decoder)
    with pytest.raises(AdapterFormatError, match="do not select"):
        other = cfg.replace(b'["q_proj"]', b'["v_proj"]')
        import_peft({CONFIG_FILE: other, WEIGHTS_FILE: tensors_to_bytes(good)}, tiny_decoder)
    with pytest.raises(AdapterFormatError, match="shape"):
        wide = {k: torch.zeros(2, n_in + 1) if "lora_A" in k else v for k, v in good.items()}
        import_peft({CONFIG_FILE: cfg, WEIGHTS_FILE: tensors_to_bytes(wide)}, tiny_decoder)


def test_the_servable_check_probes_a_decoder_without_its_tokenizer(
    tiny_decoder: DecoderBase,
) -> None:
    """Request threads share the base's tokenizer under GenerationServer's lock: the import's
    probe must not use it (here there is none), and still refuses outputs that overflow."""
    no_tokenizer = dataclasses.replace(tiny_decoder, tokenizer=None)
    gen = torch.Generator().manual_seed(2)
    for alpha, servable in ((4.0, True), (1e38, False)):
        method = parse_method_config(
            "lora", {"r": 2, "alpha": alpha, "target_modules": ["q_proj"]}, "decoder"
        )
        adapter = random_decoder_lora(tiny_decoder, method, HeadConfig(task="chat"), gen)
        if servable:
            check_servable(adapter, no_tokenizer)
        else:
            with pytest.raises(AdapterFormatError, match="not finite"):
                check_servable(adapter, no_tokenizer)


@pytest.mark.real_model
def test_the_folder_of_a_gguf_base_is_the_path_peft_records_for_it(
    real_decoder: DecoderBase, tmp_path: Path
) -> None:
    """transformers loads SmolLM2's GGUF file as ``from_pretrained(folder, gguf_file=...)``
    and PEFT records the folder: a LoRA made so was refused as another base's."""
    n_in, n_out = real_decoder.config.linear_shape("q_proj")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = tensors_to_bytes(
        {
            f"{prefix}.lora_A.weight": torch.zeros(2, n_in),
            f"{prefix}.lora_B.weight": torch.zeros(n_out, 2),
        }
    )

    def files(recorded: str) -> dict[str, bytes]:
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 2,
            "target_modules": ["q_proj"],
            "base_model_name_or_path": recorded,
        }
        return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: weights}

    assert real_decoder.path.suffix == ".gguf"
    adapter = import_peft(files(str(real_decoder.path.parent)), real_decoder)
    assert adapter.task == "chat" and adapter.base_name == real_decoder.name
    # Another folder that exists is another base.
    with pytest.raises(AdapterFormatError, match="trained on base model"):
        import_peft(files(str(tmp_path)), real_decoder)
