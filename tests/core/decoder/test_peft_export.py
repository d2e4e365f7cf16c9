"""A decoder's LoRA adapter exported in PEFT's layout loads on transformers' LlamaForCausalLM."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import peft
import torch
from transformers import LlamaForCausalLM

from core.decoder.base import DecoderBase
from core.decoder.forward import forward, logits
from core.heads import HeadConfig
from core.io.peft import CONFIG_FILE, export_peft
from core.methods import parse_method_config
from tests.core.decoder.helpers import random_decoder_lora


def test_decoder_lora_export_loads_in_peft_with_the_same_logits(
    tiny_decoder: DecoderBase, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    targets = ["q_proj", "v_proj", "down_proj"]
    method = parse_method_config(
        "lora", {"r": 4, "alpha": 8, "target_modules": targets, "layers": [1]}, "decoder"
    )
    gen = torch.Generator().manual_seed(0)
    adapter = random_decoder_lora(tiny_decoder, method, HeadConfig(task="chat"), gen, scale=0.1)
    files = export_peft(adapter, tiny_decoder)
    config = json.loads(files[CONFIG_FILE])
    assert config["task_type"] == "CAUSAL_LM"
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    ids = torch.tensor([[1, 5, 9, 23, 7, 3]])
    attention = torch.ones_like(ids)
    w = tiny_decoder.weights
    with torch.no_grad():
        ours = logits(
            w, forward(w, ids, attention, hooks=adapter.load_method(tiny_decoder).hooks())
        )
        bare = logits(w, forward(w, ids, attention))
        hf = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir)).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about our extra "loraplex" config key
            model = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
        theirs = model(input_ids=ids, attention_mask=attention).logits
    assert (ours - bare).abs().max() > 1e-3  # the adapter changes the logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
