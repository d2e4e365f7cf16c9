"""PEFT interop through the real ``peft`` package: export, import, refusals."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.errors import AdapterFormatError
from core.io.peft import CONFIG_FILE, HEAD_FILE, WEIGHTS_FILE, export_peft, import_peft
from core.io.serialization import tensors_from_bytes, tensors_to_bytes
from tests.core.util import (
    CLASSIFY,
    TEXTS,
    batch,
    hidden,
    make_model,
    randomize,
    read_files,
    write_files,
)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny_hf(tiny_base: FrozenBase) -> torch.nn.Module:
    return transformers.BertModel.from_pretrained(str(tiny_base.path)).eval()


def exported(base: FrozenBase, method_type: str, **params: object) -> tuple[Adapter, dict]:
    model = make_model(base, method_type, **params)
    randomize(model, std=0.1)
    adapter = Adapter.from_model(model, model.num_trainable(), {})
    return adapter, export_peft(adapter, base)


def ours(adapter: Adapter, base: FrozenBase) -> torch.Tensor:
    return hidden(adapter.build(base).method, batch(base))


def load_in_peft(hf: torch.nn.Module, folder: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about our extra "loraplex" config key
        return peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(folder)).eval()


def peft_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def edit_config(files: dict[str, bytes], **changes: object) -> dict[str, bytes]:
    cfg = json.loads(files[CONFIG_FILE])
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    return {**files, CONFIG_FILE: json.dumps(cfg).encode()}


# --- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"r": 4, "target_modules": ["query", "value"], "layers": [1]},
        {"r": 2, "target_modules": ["query", "output.dense"], "dropout": 0.1},
    ],
    ids=["qv-layer1", "ffn-output-dense"],
)
def test_lora_export_loads_in_peft_with_same_outputs(
    tiny_base: FrozenBase, tiny_hf: torch.nn.Module, tmp_path: Path, params: dict
) -> None:
    adapter, files = exported(tiny_base, "lora", **params)
    cfg = json.loads(files[CONFIG_FILE])
    assert cfg["peft_type"] == "LORA" and cfg["loraplex"]["head"]["task"] == "classification"
    keys = tensors_from_bytes(files[WEIGHTS_FILE])
    assert all(k.startswith("base_model.model.encoder.layer.") for k in keys)
    peft_model = load_in_peft(tiny_hf, write_files(files, tmp_path))
    wrapped = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and m.lora_A]
    assert len(wrapped) == len(adapter.method_state) // 2
    inputs = tiny_base.tokenize(TEXTS[:2], ["fun", "not fun"])
    torch.testing.assert_close(
        hidden(adapter.build(tiny_base).method, inputs),
        peft_hidden(peft_model, inputs),
        atol=1e-5,
        rtol=0,
    )


def test_lora_round_trip_keeps_weights_config_and_head(tiny_base: FrozenBase) -> None:
    adapter, files = exported(tiny_base, "lora", r=4, alpha=4.0, use_rslora=True)
    back = import_peft(files, tiny_base)
    assert back.method == adapter.method and back.head == adapter.head
    for state, original in (
        (back.method_state, adapter.method_state),
        (back.head_state, adapter.head_state),
    ):
        assert set(state) == set(original)
        assert all(torch.equal(state[k], original[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(
            back.build(tiny_base)(batch(tiny_base)), adapter.build(tiny_base)(batch(tiny_base))
        )


@pytest.mark.parametrize("target_modules", [["query", "value"], "all-linear"])
def test_peft_saved_lora_imports_with_same_outputs(
    tiny_base: FrozenBase, tiny_hf: torch.nn.Module, tmp_path: Path, target_modules: object
) -> None:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules)
    peft_model = peft.get_peft_model(copy.deepcopy(tiny_hf), config).eval()
    randomize(peft_model, std=0.1)  # only the LoRA matrices are trainable
    peft_model.save_pretrained(str(tmp_path))
    adapter = import_peft(read_files(tmp_path), tiny_base, head=CLASSIFY)
    assert adapter.method.r == 4 and adapter.method.alpha == 8  # type: ignore[attr-defined]
    # PEFT's all-linear also wraps the pooler, which we never run: dropped, outputs unaffected.
    torch.testing.assert_close(
        ours(adapter, tiny_base), peft_hidden(peft_model, batch(tiny_base)), atol=1e-5, rtol=0
    )


def test_lora_key_variants_import(tiny_base: FrozenBase) -> None:
    adapter, files = exported(tiny_base, "lora", r=2)
    tensors = tensors_from_bytes(files[WEIGHTS_FILE])
    for rename in (
        lambda k: k.replace("base_model.model.", "base_model.model.bert."),
        lambda k: k.replace(".weight", ".default.weight"),
        lambda k: k.replace("base_model.model.", "base_model.model.model."),
    ):
        renamed = {rename(k): v for k, v in tensors.items()}
        back = import_peft({**files, WEIGHTS_FILE: tensors_to_bytes(renamed)}, tiny_base)
        assert all(torch.equal(back.method_state[k], v) for k, v in adapter.method_state.items())


# --- prompt tuning ---------------------------------------------------------------------------


def test_prompt_export_loads_in_peft_with_same_outputs(
    tiny_base: FrozenBase, tiny_hf: torch.nn.Module, tmp_path: Path
) -> None:
    adapter, files = exported(tiny_base, "prompt_tuning", n_virtual_tokens=3)
    peft_model = load_in_peft(tiny_hf, write_files(files, tmp_path))
    inputs = batch(tiny_base)  # single texts: PEFT's dropped token_type_ids are all 0 anyway
    theirs = peft_hidden(peft_model, {k: inputs[k] for k in ("input_ids", "attention_mask")})
    # PEFT returns the virtual tokens' states too; we strip them.
    torch.testing.assert_close(ours(adapter, tiny_base), theirs[:, 3:], atol=1e-5, rtol=0)


def test_peft_saved_prompt_tuning_imports_with_same_outputs(
    tiny_base: FrozenBase, tiny_hf: torch.nn.Module, tmp_path: Path
) -> None:
    config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=4)
    peft_model = peft.get_peft_model(copy.deepcopy(tiny_hf), config).eval()
    peft_model.save_pretrained(str(tmp_path))
    adapter = import_peft(read_files(tmp_path), tiny_base, head=CLASSIFY)
    inputs = batch(tiny_base)
    theirs = peft_hidden(peft_model, {k: inputs[k] for k in ("input_ids", "attention_mask")})
    torch.testing.assert_close(ours(adapter, tiny_base), theirs[:, 4:], atol=1e-5, rtol=0)


def test_round_trip_keeps_the_trained_encoding(tiny_base: FrozenBase) -> None:
    """The head's trained length and pair split travel with the export, so an imported
    adapter is served as it was trained."""
    from dataclasses import replace

    adapter, _ = exported(tiny_base, "lora", r=2)
    update = {"max_seq_length": 32, "split_shared_prefix": True}
    trained = replace(adapter, head=adapter.head.model_copy(update=update))
    back = import_peft(export_peft(trained, tiny_base), tiny_base)
    assert (back.head.max_seq_length, back.head.split_shared_prefix) == (32, True)


def test_prompt_round_trip_is_exact(tiny_base: FrozenBase) -> None:
    adapter, files = exported(
        tiny_base, "prompt_tuning", n_virtual_tokens=2, init="text", init_text="fun"
    )
    back = import_peft(files, tiny_base)
    assert back.method == adapter.method
    assert torch.equal(
        back.method_state["prompt_embeddings"], adapter.method_state["prompt_embeddings"]
    )


# --- refusals --------------------------------------------------------------------------------


def test_pickle_files_are_refused(tiny_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    for name in ("adapter_model.bin", "sub/pytorch_model.pt"):
        upload = {CONFIG_FILE: files[CONFIG_FILE], name: b"\x80\x04pickle"}
        with pytest.raises(AdapterFormatError, match="pickle"):
            import_peft(upload, tiny_base)


def test_pickle_bytes_under_a_safetensors_name_are_refused(tiny_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    with pytest.raises(AdapterFormatError, match="safetensors"):
        import_peft({**files, WEIGHTS_FILE: b"\x80\x04\x95pickle"}, tiny_base)


def test_unknown_peft_type_and_unsupported_options_are_refused(tiny_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    with pytest.raises(AdapterFormatError, match="peft_type"):
        import_peft(edit_config(files, peft_type="IA3"), tiny_base)
    with pytest.raises(AdapterFormatError, match="use_dora"):
        import_peft(edit_config(files, use_dora=True), tiny_base)
    with pytest.raises(AdapterFormatError, match="modules_to_save"):
        import_peft(edit_config(files, modules_to_save=["classifier"]), tiny_base)


def test_other_base_by_name_is_refused(tiny_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    with pytest.raises(AdapterFormatError, match="bert-base-uncased"):
        import_peft(edit_config(files, base_model_name_or_path="bert-base-uncased"), tiny_base)


def test_adapter_for_a_deeper_base_is_refused(tiny_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    tensors = tensors_from_bytes(files[WEIGHTS_FILE])
    deeper = {k.replace("layer.1.", "layer.5."): v for k, v in tensors.items()}
    with pytest.raises(AdapterFormatError, match=r"layer 5 but base .* has 2 layers"):
        import_peft({**files, WEIGHTS_FILE: tensors_to_bytes(deeper)}, tiny_base)


def test_foreign_adapter_without_head_needs_a_head_config(tiny_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    foreign = edit_config(
        {CONFIG_FILE: files[CONFIG_FILE], WEIGHTS_FILE: files[WEIGHTS_FILE]}, loraplex=None
    )
    with pytest.raises(AdapterFormatError, match="head"):
        import_peft(foreign, tiny_base)
    assert import_peft(foreign, tiny_base, head=CLASSIFY).head == CLASSIFY


def test_methods_without_peft_equivalent_do_not_export(tiny_base: FrozenBase) -> None:
    model = make_model(tiny_base, "adapter")
    with pytest.raises(AdapterFormatError, match="no PEFT equivalent"):
        export_peft(Adapter.from_model(model, 0, {}), tiny_base)


@pytest.mark.real_model
def test_tiny_adapter_is_refused_by_minilm(tiny_base: FrozenBase, real_base: FrozenBase) -> None:
    _, files = exported(tiny_base, "lora")
    with pytest.raises(AdapterFormatError, match="fingerprint"):
        import_peft(files, real_base)
    # Without our metadata and base name, the shapes still give it away.
    anonymous = edit_config(files, loraplex=None, base_model_name_or_path=None)
    with pytest.raises(AdapterFormatError, match="shape"):
        import_peft(anonymous, real_base, head=CLASSIFY)
    _, prompt_files = exported(tiny_base, "prompt_tuning", n_virtual_tokens=2)
    anonymous = edit_config(prompt_files, loraplex=None, base_model_name_or_path=None)
    with pytest.raises(AdapterFormatError, match="different base"):
        import_peft(anonymous, real_base, head=CLASSIFY)


@pytest.mark.real_model
def test_peft_saved_lora_on_minilm_imports(real_base: FrozenBase, tmp_path: Path) -> None:
    hf = transformers.BertModel.from_pretrained(str(real_base.path)).eval()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    peft_model = peft.get_peft_model(hf, config).eval()
    randomize(peft_model, std=0.05)
    peft_model.save_pretrained(str(tmp_path))
    adapter = import_peft(read_files(tmp_path), real_base, head=CLASSIFY)
    assert adapter.trainable_params == 73_728 + 770
    torch.testing.assert_close(
        ours(adapter, real_base), peft_hidden(peft_model, batch(real_base)), atol=1e-5, rtol=0
    )
    assert HEAD_FILE not in read_files(tmp_path)
