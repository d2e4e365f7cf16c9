"""Loading a decoder base: the SmolLM2 GGUF file and Hugging Face Llama folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from core.decoder.base import DecoderBase, DecoderBaseError, decoder_dims, load_decoder_base


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_folder_loads_frozen_tensors_under_hf_names(
    tiny_decoder: DecoderBase, tiny_llama_dir: Path
) -> None:
    hf = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))
    assert tiny_decoder.num_params == hf.num_parameters()  # the tied lm_head counted once
    assert "lm_head.weight" not in tiny_decoder.state_dict
    for name, tensor in tiny_decoder.state_dict.items():
        assert not tensor.requires_grad, name
        torch.testing.assert_close(tensor, hf.state_dict()[name], atol=0, rtol=0)
    assert tiny_decoder.weights.lm_head is tiny_decoder.state_dict["model.embed_tokens.weight"]
    assert tiny_decoder.fingerprint == sha256(tiny_llama_dir / "model.safetensors")
    assert tiny_decoder.chat_template is not None and "<|im_start|>" in tiny_decoder.chat_template
    assert tiny_decoder.stop_token_ids == (2,)
    assert (tiny_decoder.config.num_key_value_heads, tiny_decoder.config.head_dim) == (2, 16)


def test_loading_leaves_the_process_environment_alone(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loader is offline by passing local_files_only, not by switching the whole process's
    # Hugging Face libraries offline.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    load_decoder_base(tiny_llama_dir, device="cpu")
    assert "HF_HUB_OFFLINE" not in os.environ
    assert "TRANSFORMERS_OFFLINE" not in os.environ


def test_sharded_folder_loads_the_same_tensors(
    tiny_decoder: DecoderBase, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    hf = LlamaForCausalLM.from_pretrained(str(tiny_llama_dir))
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / name)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded = load_decoder_base(tmp_path, device="cpu")
    assert sharded.state_dict.keys() == tiny_decoder.state_dict.keys()
    for name, tensor in sharded.state_dict.items():
        torch.testing.assert_close(tensor, tiny_decoder.state_dict[name], atol=0, rtol=0)


def copy_config(src: Path, dst: Path, **changes: object) -> Path:
    dst.mkdir(exist_ok=True)
    cfg = {**json.loads((src / "config.json").read_text()), **changes}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_pickled_weights_are_never_read(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_config(tiny_llama_dir, tmp_path / "m")
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(DecoderBaseError, match="only safetensors"):
        load_decoder_base(folder, device="cpu")


def test_other_architectures_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = copy_config(tiny_llama_dir, tmp_path / "bert", model_type="bert")
    with pytest.raises(DecoderBaseError, match="model_type 'bert'"):
        load_decoder_base(folder, device="cpu")
    yarn = {"rope_type": "yarn", "factor": 2.0}
    folder = copy_config(tiny_llama_dir, tmp_path / "yarn", rope_scaling=yarn)
    with pytest.raises(DecoderBaseError, match="rope_scaling type 'yarn'"):
        load_decoder_base(folder, device="cpu")


def test_a_tensor_the_forward_would_ignore_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "extra"
    shutil.copytree(tiny_llama_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(DecoderBaseError, match="q_norm"):
        load_decoder_base(folder, device="cpu")


def test_dims_are_read_without_the_weights_as_the_loaded_base_has_them(
    tiny_decoder: DecoderBase, tiny_llama_dir: Path
) -> None:
    """What the service checks a job's layers and prompt length against before a worker has
    loaded the base: config.json, or the GGUF header (SmolLM2's 30 layers and 8,192
    positions, as the loaded base has them: test_smollm2_gguf_loads_dequantised)."""
    assert decoder_dims(tiny_llama_dir) == (tiny_decoder.num_layers, tiny_decoder.max_length)
    assert decoder_dims() == (30, 8192)


def test_dims_of_a_file_that_is_no_gguf_are_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(DecoderBaseError, match="block_count"):
        decoder_dims(file)


@pytest.mark.real_model
def test_smollm2_gguf_loads_dequantised(real_decoder: DecoderBase) -> None:
    cfg = real_decoder.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (576, 30, 49152)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.rope_theta) == (9, 3, 1e5)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192
    assert real_decoder.num_params == 134_515_008
    assert real_decoder.dtype == torch.float32
    assert real_decoder.fingerprint == sha256(real_decoder.path)
    assert real_decoder.chat_template is not None and "<|im_start|>" in real_decoder.chat_template
    assert real_decoder.tokenizer.convert_ids_to_tokens(list(real_decoder.stop_token_ids)) == [
        "<|im_end|>"
    ]


@pytest.mark.real_model
def test_smollm2_gguf_reads_as_transformers_from_pretrained(real_decoder: DecoderBase) -> None:
    """One parse of the file's metadata gives what from_pretrained's three parses give: the
    same tensors bit for bit, config and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(real_decoder.path.parent), real_decoder.path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True)
    theirs = model.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in real_decoder.state_dict.items())
    assert set(theirs) - set(real_decoder.state_dict) == {"lm_head.weight"}  # tied
    tokenizer = AutoTokenizer.from_pretrained(
        folder, gguf_file=name, config=model.config, local_files_only=True
    )
    ours = real_decoder.tokenizer
    assert type(ours) is type(tokenizer) and ours.get_vocab() == tokenizer.get_vocab()
    assert ours.chat_template == tokenizer.chat_template
    text = "  The naïve café, 東京 🙂\n\n<|im_start|>user\nhi<|im_end|>"
    plain = {"add_special_tokens": False}
    assert ours(text, **plain)["input_ids"] == tokenizer(text, **plain)["input_ids"]
    # Where transformers' conversion departs from the file (see the next test), ours follows it.
    assert ours(text)["input_ids"] == tokenizer(text)["input_ids"][1:]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_start|>")


@pytest.mark.real_model
def test_smollm2_tokenizer_is_as_the_gguf_file_says(real_decoder: DecoderBase) -> None:
    """The file says to add no BOS token and that its EOS is <|im_end|>; nothing in it asks for
    Hugging Face's clean-up of decoded spaces, which rewrote replies (" 's" lost its space)."""
    tokenizer = real_decoder.tokenizer
    ids = tokenizer("The capital of France is")["input_ids"]
    assert ids == tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == real_decoder.stop_token_ids[0]
    text = "He said 'so what' , isn't it ?"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
