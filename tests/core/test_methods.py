"""Every method: identity when untrained, parameter counts, persistence, frozen base."""

from __future__ import annotations

import json

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.errors import ConfigError
from core.io.serialization import adapter_from_bytes, adapter_to_bytes
from core.methods import METHODS
from core.methods.prompt_tuning.model import PromptTuningModel
from core.model import trainable_parameter_count
from tests.core.util import batch, checksum, hidden, make_method, make_model, randomize

# One representative config per method (plus LoRA/adapter variants that take other code paths).
CASES: list[tuple[str, dict]] = [
    ("lora", {"r": 4, "target_modules": ["query", "value"]}),
    ("lora", {"r": 2, "target_modules": "all-linear", "layers": [1], "use_rslora": True}),
    ("adapter", {"bottleneck_size": 8}),
    ("adapter", {"bottleneck_size": 4, "placement": "pfeiffer", "non_linearity": "tanh"}),
    ("prompt_tuning", {"n_virtual_tokens": 3}),
    ("prompt_tuning", {"n_virtual_tokens": 4, "init": "text", "init_text": "great movie"}),
    ("feature_extraction", {}),
    ("full", {}),
    ("scratch", {}),
]
IDS = [f"{m}-{i}" for i, (m, _) in enumerate(CASES)]


def test_every_registered_method_is_covered() -> None:
    assert {m for m, _ in CASES} == set(METHODS)


@pytest.mark.parametrize(("method_type", "params"), CASES, ids=IDS)
def test_untrained_method_is_the_identity(tiny_base: FrozenBase, method_type: str, params: dict):
    inputs = batch(tiny_base)
    expected = hidden(make_method(tiny_base, "feature_extraction"), inputs)
    got = hidden(make_method(tiny_base, method_type, **params), inputs)
    assert got.shape == expected.shape  # prompt tuning strips its virtual tokens again
    if method_type == "prompt_tuning":
        # Not an identity by design: real tokens attend to the virtual ones and move to
        # positions n.. (PEFT's layout), so there is no "zero" prompt.
        assert not torch.allclose(got, expected, atol=1e-3)
    elif method_type == "scratch":
        # Random init: the baseline deliberately forgets the pre-trained weights.
        assert not torch.allclose(got, expected, atol=1e-3)
    else:
        # LoRA's B and the adapters' up-projections start at zero; full starts as a copy.
        assert torch.equal(got, expected)


@pytest.mark.real_model
def test_trainable_counts_match_hand_computed_numbers(real_base: FrozenBase) -> None:
    head = 384 * 2 + 2  # classification head, two labels
    # LoRA per site r*(in+out); adapters 2*(384*b)+b+384 per adapter; 6 layers throughout.
    expected = {
        ("lora", "qv8"): 6 * 2 * 8 * (384 + 384),  # 73,728
        ("lora", "all4"): 6 * 4 * (4 * (384 + 384) + 2 * (384 + 1536)),  # 165,888
        ("adapter", "houlsby64"): 6 * 2 * (2 * 384 * 64 + 64 + 384),  # 595,200
        ("adapter", "pfeiffer64"): 6 * 1 * (2 * 384 * 64 + 64 + 384),  # 297,600
        ("prompt_tuning", "20"): 20 * 384,
        ("feature_extraction", ""): 0,
    }
    params = {
        ("lora", "qv8"): {"r": 8, "target_modules": ["query", "value"]},
        ("lora", "all4"): {"r": 4, "target_modules": "all-linear"},
        ("adapter", "houlsby64"): {"bottleneck_size": 64},
        ("adapter", "pfeiffer64"): {"bottleneck_size": 64, "placement": "pfeiffer"},
        ("prompt_tuning", "20"): {"n_virtual_tokens": 20},
        ("feature_extraction", ""): {},
    }
    assert expected[("lora", "qv8")] == 73_728
    for key, n_method in expected.items():
        model = make_model(real_base, key[0], **params[key])
        count, fraction = trainable_parameter_count(model)
        assert count == n_method + head, key
        assert fraction == pytest.approx((n_method + head) / real_base.num_params)
    # Full fine-tuning trains every encoder weight: MiniLM has 22,565,376 without the pooler.
    count, fraction = trainable_parameter_count(make_model(real_base, "full"))
    assert real_base.num_params == 22_565_376
    assert count == 22_565_376 + head
    assert fraction > 1.0


@pytest.mark.parametrize(("method_type", "params"), CASES, ids=IDS)
def test_bytes_round_trip_gives_identical_outputs(
    tiny_base: FrozenBase, method_type: str, params: dict
) -> None:
    model = make_model(tiny_base, method_type, **params)
    randomize(model)
    adapter = Adapter.from_model(model, model.num_trainable(), {"accuracy": 0.5})
    config, data = adapter_to_bytes(adapter)
    loaded = adapter_from_bytes(json.loads(json.dumps(config)), data).build(tiny_base)
    inputs = batch(tiny_base)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))
    assert loaded.method.config == model.method.config


@pytest.mark.parametrize(("method_type", "params"), CASES, ids=IDS)
def test_training_step_never_touches_the_base(
    tiny_base: FrozenBase, method_type: str, params: dict
) -> None:
    before = checksum(tiny_base.encoder)
    model = make_model(tiny_base, method_type, **params)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(batch(tiny_base), dropout=True).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert checksum(tiny_base.encoder) == before
    assert all(p.grad is None and not p.requires_grad for p in tiny_base.encoder.parameters())


def test_gradients_reach_every_method_parameter(tiny_base: FrozenBase) -> None:
    for method_type, params in CASES:
        model = make_model(tiny_base, method_type, **params)
        randomize(model.method)  # zero-initialised B / up would block gradients to A / down
        model(batch(tiny_base)).sum().backward()
        for name, p in model.method.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (method_type, name)


def test_param_layer_maps_every_parameter(tiny_base: FrozenBase) -> None:
    n = tiny_base.num_layers
    for method_type, params in CASES:
        method = make_method(tiny_base, method_type, **params)
        for name, _ in method.named_parameters():
            layer = method.param_layer(name)
            assert layer is not None and -1 <= layer < n, (method_type, name, layer)
    full = make_method(tiny_base, "full")
    assert full.param_layer("bert.encoder.layer.1.attention.self.query.weight") == 1
    assert full.param_layer("bert.embeddings.word_embeddings.weight") == -1
    adapter = make_method(tiny_base, "adapter")
    assert adapter.param_layer("layer.1.ffn.down.weight") == 1
    assert make_method(tiny_base, "prompt_tuning").param_layer("prompt_embeddings") == -1


def test_feature_extraction_has_frozen_features_and_no_state(tiny_base: FrozenBase) -> None:
    method = make_method(tiny_base, "feature_extraction")
    assert method.frozen_features and not make_method(tiny_base, "lora").frozen_features
    assert method.saved_state() == {} and list(method.parameters()) == []


def test_full_owns_an_independent_copy(tiny_base: FrozenBase) -> None:
    method = make_method(tiny_base, "full")
    assert method.encoder() is not tiny_base.encoder
    base_ptrs = {p.data_ptr() for p in tiny_base.encoder.parameters()}
    assert all(p.requires_grad and p.data_ptr() not in base_ptrs for p in method.parameters())
    assert set(method.saved_state()) == set(tiny_base.encoder.state_dict())


def test_scratch_uses_bert_init(tiny_base: FrozenBase) -> None:
    torch.manual_seed(0)
    enc = make_method(tiny_base, "scratch").encoder()
    assert enc.encoder.layer[0].attention.self.query.weight.std().item() == pytest.approx(
        0.02, rel=0.2
    )
    assert enc.embeddings.word_embeddings.weight[0].abs().sum() == 0  # padding row
    assert torch.equal(enc.encoder.layer[0].output.LayerNorm.weight, torch.ones(32))


def test_prompt_tuning_reserves_positions_and_strips(tiny_base: FrozenBase) -> None:
    method = make_method(tiny_base, "prompt_tuning", n_virtual_tokens=5)
    assert isinstance(method, PromptTuningModel)
    assert method.max_input_length == tiny_base.max_length - 5
    inputs = tiny_base.tokenize(["fun " * 200], max_length=method.max_input_length)
    assert inputs["input_ids"].shape[1] == method.max_input_length
    out = hidden(method, inputs)  # positions n..max_length-1 all exist: no index error
    assert out.shape[1] == inputs["input_ids"].shape[1]
    with pytest.raises(ConfigError) as err:
        make_method(tiny_base, "prompt_tuning", n_virtual_tokens=tiny_base.max_length)
    assert err.value.field == "n_virtual_tokens"


def test_prompt_text_init_uses_word_embeddings(tiny_base: FrozenBase) -> None:
    method = make_method(
        tiny_base, "prompt_tuning", n_virtual_tokens=5, init="text", init_text="great movie"
    )
    ids = tiny_base.tokenizer("great movie", add_special_tokens=False)["input_ids"]
    ids = (ids * 5)[:5]
    words = tiny_base.encoder.embeddings.word_embeddings.weight
    assert torch.equal(method.prompt_embeddings.detach(), words[ids])


def test_adapter_placements(tiny_base: FrozenBase) -> None:
    houlsby = make_method(tiny_base, "adapter", bottleneck_size=4)
    pfeiffer = make_method(tiny_base, "adapter", bottleneck_size=4, placement="pfeiffer")
    assert sorted(houlsby.layer[0].keys()) == ["attention", "ffn"]
    assert list(pfeiffer.layer[0].keys()) == ["ffn"]
