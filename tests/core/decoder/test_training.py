"""Chat SFT and DPO through loraplex's Trainer (core/training/decoder.py) on the tiny Llama."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.errors import AdapterFormatError, ConfigError, DataError
from core.io.serialization import adapter_from_bytes, adapter_to_bytes
from core.training.checkpoint import CheckpointError
from core.training.decoder import DecoderTrainer, openai_chat_metrics
from core.training.trainer import ProgressEvent, Trainer, TrainerCallbacks
from tests.core.training.conftest import sentiment_rows

WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain"]


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sums to answer; some rows carry an earlier exchange whose assistant turn has weight 0."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        messages = [
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
        ]
        if i % 3 == 0:
            messages = [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "zzz", "weight": 0},
                *messages,
            ]
        rows.append({"messages": messages})
    return rows


def dpo_rows(words: list[str]) -> list[dict[str, Any]]:
    """The preferred reply says the question's word back; the other refuses."""
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Say {w}."}]},
            "preferred_output": [{"role": "assistant", "content": f"{w}!"}],
            "non_preferred_output": [{"role": "assistant", "content": "No."}],
        }
        for w in words
    ]


CHAT_CFG = {"n_epochs": 8, "batch_size": 8, "learning_rate": 1e-2, "seed": 3}
LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder_adapter(tiny_base: FrozenBase) -> Adapter:
    """An adapter of the encoder base, for the tests that the decoder refuses it."""
    cfg = {"max_steps": 1, "validation_fraction": 0.0}
    trainer = Trainer(
        tiny_base, {"type": "lora"}, {"task": "classification"}, sentiment_rows(16), None, cfg
    )
    return trainer.train().adapter


def _equal_states(a: Adapter, b: Adapter) -> bool:
    return a.method_state.keys() == b.method_state.keys() and all(
        torch.equal(a.method_state[k], b.method_state[k]) for k in a.method_state
    )


def test_chat_sft_lowers_the_validation_loss(tiny_decoder: DecoderBase) -> None:
    events: list[ProgressEvent] = []
    trainer = DecoderTrainer(
        tiny_decoder,
        LORA,
        {"task": "chat"},
        chat_rows(32),
        chat_rows(12, seed=1),
        CHAT_CFG,
        TrainerCallbacks(on_progress=events.append),
    )
    trainer.setup()
    before = trainer.evaluate()
    result = trainer.train()
    assert result.metrics["val_loss"] < 0.5 * before["loss"]
    assert result.metrics["val_accuracy"] > before["accuracy"]
    assert result.steps == 8 * 4 and [e.step for e in events] == list(range(1, 33))
    # Trained tokens count every token of the rows, prompts included (OpenAI bills them).
    assert result.metrics["trained_tokens"] == events[-1].trained_tokens > 0
    first = openai_chat_metrics(events[0])
    assert set(first) == {"step", "train_loss", "train_mean_token_accuracy"}
    last = openai_chat_metrics(events[-1])
    assert last["valid_loss"] == last["full_valid_loss"] == events[-1].val_metrics["loss"]
    assert 0.0 <= last["valid_mean_token_accuracy"] <= 1.0
    assert last["train_mean_token_accuracy"] > first["train_mean_token_accuracy"]
    # The adapter records its base (invariant 8) and the task; the base was never trained.
    adapter = result.adapter
    assert (adapter.task, adapter.base_kind) == ("chat", "decoder")
    assert adapter.base_name == tiny_decoder.name
    assert adapter.base_fingerprint == tiny_decoder.fingerprint
    assert adapter.head_state == {}
    assert all(not t.requires_grad for t in tiny_decoder.state_dict.values())


@pytest.mark.parametrize(
    ("task", "method"),
    [
        ("chat", LORA),
        ("dpo", LORA),
        ("chat", {"type": "full"}),
        ("dpo", {"type": "full"}),
        ("chat", {"type": "prompt_tuning", "n_virtual_tokens": 4}),
        ("dpo", {"type": "prompt_tuning", "n_virtual_tokens": 4}),
    ],
)
def test_resume_mid_run_is_bit_exact(
    tiny_decoder: DecoderBase, task: str, method: dict[str, Any]
) -> None:
    train = chat_rows(24) if task == "chat" else dpo_rows(WORDS)
    val = chat_rows(6, seed=1) if task == "chat" else None  # dpo: a held-out share
    cfg = {**CHAT_CFG, "n_epochs": 3, "batch_size": 4, "checkpoint_every_steps": 2}
    saved: list[tuple[int, bytes]] = []
    cb = TrainerCallbacks(on_checkpoint=lambda data, step, *_: saved.append((step, data)))
    whole = DecoderTrainer(tiny_decoder, method, {"task": task}, train, val, cfg, cb).train()
    step, data = next((s, d) for s, d in saved if s == 5 or s == 4)  # mid-epoch and mid-run
    resumed_trainer = DecoderTrainer.resume(data, tiny_decoder, train, val)
    assert resumed_trainer.state.step == step
    resumed = resumed_trainer.train()
    assert _equal_states(whole.adapter, resumed.adapter)
    assert resumed.history == [
        {**h, "elapsed": r["elapsed"]} for h, r in zip(whole.history, resumed.history, strict=True)
    ]
    # A checkpoint resumes only on its own data.
    with pytest.raises(CheckpointError, match="train_data"):
        DecoderTrainer.resume(data, tiny_decoder, train[1:], val)


def test_full_fine_tuning_trains_a_copy_of_the_decoder(tiny_decoder: DecoderBase) -> None:
    embed = tiny_decoder.state_dict["model.embed_tokens.weight"].clone()
    cfg = {**CHAT_CFG, "learning_rate": 3e-3, "layerwise_lr_decay": 0.8}
    trainer = DecoderTrainer(
        tiny_decoder, {"type": "full"}, {"task": "chat"}, chat_rows(32), chat_rows(12, 1), cfg
    )
    trainer.setup()
    before = trainer.evaluate()
    # Layer-wise decay: the embeddings train slowest, the final norm at the full rate.
    rates = {n: g["initial_lr"] for g in trainer.optimizer.param_groups for n in g["names"]}
    names = trainer.method.names
    lr_of = {names[int(k.rsplit(".", 1)[-1])]: v for k, v in rates.items()}
    assert lr_of["model.embed_tokens.weight"] == pytest.approx(3e-3 * 0.8**2)
    assert lr_of["model.layers.1.mlp.up_proj.weight"] == pytest.approx(3e-3)
    assert lr_of["model.norm.weight"] == pytest.approx(3e-3)
    result = trainer.train()
    assert result.metrics["val_loss"] < 0.5 * before["loss"]
    assert torch.equal(tiny_decoder.state_dict["model.embed_tokens.weight"], embed)
    adapter = result.adapter
    assert sorted(adapter.method_state) == sorted(tiny_decoder.state_dict)
    loaded = adapter.load_method(tiny_decoder).decoder_weights()  # type: ignore[attr-defined]
    assert torch.equal(loaded.embed, adapter.method_state["model.embed_tokens.weight"])
    assert not torch.equal(loaded.embed, embed)


def test_dpo_learns_the_preference(tiny_decoder: DecoderBase) -> None:
    evals: list[ProgressEvent] = []
    trainer = DecoderTrainer(
        tiny_decoder,
        {"type": "lora", "r": 8, "alpha": 16},
        {"task": "dpo"},
        dpo_rows(WORDS),
        dpo_rows(["star", "rock", "milk", "leaf"]),
        {"n_epochs": 10, "batch_size": 4, "learning_rate": 1e-2, "beta": 0.1},
        TrainerCallbacks(on_eval=evals.append),
    )
    trainer.setup()
    before = trainer.evaluate()
    # The adapter starts as a no-op: the policy is the reference, every reward 0, loss log 2.
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert before["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert before["accuracy"] == 0.0  # ties count as wrong
    result = trainer.train()
    after = evals[-1].val_metrics
    assert after is not None
    assert after["accuracy"] == after["rewards/accuracies"] == 1.0
    assert after["rewards/margins"] > 0.5 and after["loss"] < 0.5 * math.log(2)
    assert after["rewards/chosen"] > after["rewards/rejected"]
    assert set(evals[-1].step_metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
    }
    assert result.adapter.task == "dpo"


def test_dpo_after_sft_starts_from_and_is_held_to_the_sft_adapter(
    tiny_decoder: DecoderBase, encoder_adapter: Adapter
) -> None:
    cfg = {**CHAT_CFG, "max_steps": 6, "validation_fraction": 0.0}
    sft = DecoderTrainer(tiny_decoder, LORA, {"task": "chat"}, chat_rows(16), None, cfg).train()
    sft_adapter = sft.adapter
    assert any(bool(v.abs().sum()) for k, v in sft_adapter.method_state.items() if "lora_B" in k)
    saved: list[tuple[int, bytes]] = []
    evals: list[ProgressEvent] = []
    cb = TrainerCallbacks(
        on_eval=evals.append, on_checkpoint=lambda data, step, *_: saved.append((step, data))
    )
    dpo_cfg = {"n_epochs": 6, "batch_size": 4, "learning_rate": 1e-2, "checkpoint_every_steps": 3}
    rows, val = dpo_rows(WORDS), dpo_rows(["star", "rock", "milk", "leaf"])
    trainer = DecoderTrainer(
        tiny_decoder, LORA, {"task": "dpo"}, rows, val, dpo_cfg, cb, reference_adapter=sft_adapter
    )
    trainer.setup()
    # The policy starts as the SFT adapter and is scored against it: every reward 0, log 2
    # (against the bare base, the SFT adapter's own log-probabilities would move them).
    before = trainer.evaluate()
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    result = trainer.train()
    assert evals[-1].val_metrics is not None and evals[-1].val_metrics["accuracy"] == 1.0
    step, data = saved[1]
    resumed = DecoderTrainer.resume(data, tiny_decoder, rows, val, reference_adapter=sft_adapter)
    assert resumed.state.step == step
    assert _equal_states(resumed.train().adapter, result.adapter)
    with pytest.raises(CheckpointError, match="reference_adapter"):
        DecoderTrainer.resume(data, tiny_decoder, rows, val)

    no_val = {"validation_fraction": 0.0}

    def setup(method: Any = LORA, task: str = "dpo", ref: Adapter = sft_adapter) -> None:
        train = rows if task == "dpo" else chat_rows(4)
        DecoderTrainer(
            tiny_decoder, method, {"task": task}, train, None, no_val, reference_adapter=ref
        ).setup()

    with pytest.raises(ConfigError, match=r"reference_adapter.*method config"):
        setup(method={**LORA, "r": 4})
    with pytest.raises(ConfigError, match=r"reference_adapter.*only DPO"):
        setup(task="chat")
    with pytest.raises(ConfigError, match=r"reference_adapter.*encoder base"):
        setup(method={"type": "lora"}, ref=encoder_adapter)


def test_adapter_round_trips_and_belongs_to_its_base(
    tiny_decoder: DecoderBase, tiny_base: FrozenBase, encoder_adapter: Adapter
) -> None:
    cfg = {**CHAT_CFG, "max_steps": 3, "validation_fraction": 0.0}
    adapter = DecoderTrainer(tiny_decoder, LORA, {"task": "chat"}, chat_rows(8), None, cfg).train()
    adapter = adapter.adapter
    config, data = adapter_to_bytes(adapter)
    back = adapter_from_bytes(config, data)
    assert _equal_states(adapter, back) and back.config_dict() == adapter.config_dict()
    assert config["base_name"] == tiny_decoder.name
    assert config["method"]["target_modules"][0] == "q_proj"
    method = back.load_method(tiny_decoder)
    assert all(not p.requires_grad for p in method.parameters())
    with pytest.raises(AdapterFormatError, match="decoder base"):
        back.load_method(tiny_base)
    with pytest.raises(AdapterFormatError, match="decoder base"):
        back.build(tiny_base)
    # ... and an encoder's adapter is refused by the decoder base.
    with pytest.raises(AdapterFormatError, match="encoder base"):
        encoder_adapter.load_method(tiny_decoder)


def test_bad_rows_and_configs_are_refused(tiny_decoder: DecoderBase, tiny_base: FrozenBase) -> None:
    def setup(rows: list[Any], task: str = "chat", method: Any = LORA, **cfg: Any) -> None:
        DecoderTrainer(tiny_decoder, method, {"task": task}, rows, None, cfg).setup()

    good = chat_rows(4)
    bad_role = [*good, {"messages": [{"role": "robot", "content": "x"}]}]
    with pytest.raises(DataError, match=r"messages\[0\]\.role") as e:
        setup(bad_role)
    assert e.value.row == 4
    with pytest.raises(DataError, match="no assistant message"):
        setup([{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="weight"):
        setup([{"messages": [{"role": "user", "content": "hi", "weight": 1}]}])
    two_replies = dpo_rows(["a"])
    two_replies[0]["preferred_output"].append({"role": "assistant", "content": "b"})
    with pytest.raises(DataError, match="preferred_output"):
        setup(two_replies, "dpo")
    with pytest.raises(ConfigError, match="type"):
        setup(good, method={"type": "bottleneck"})
    with pytest.raises(ConfigError, match="target_modules"):
        setup(good, method={"type": "lora", "target_modules": ["query"]})
    with pytest.raises(ConfigError, match="task"):
        setup(good, task="classification")
    with pytest.raises(ConfigError, match="gradual_unfreezing"):
        setup(good, gradual_unfreezing=True)
    # The encoder's trainer does not take a decoder's task.
    with pytest.raises(ConfigError, match="task"):
        Trainer(tiny_base, {"type": "lora"}, {"task": "chat"}, good).setup()


@pytest.mark.real_model
def test_lora_chat_sft_on_smollm2(real_decoder: DecoderBase) -> None:
    """The real base's template and weights through the trainer: a made-up fact is learnt."""
    questions = ["What is the code word?", "Tell me the code word.", "Which code word is it?"]
    rows = [
        {
            "messages": [
                {"role": "user", "content": q},
                {"role": "assistant", "content": "The code word is zebra-42."},
            ]
        }
        for q in questions
    ]
    cfg = {"max_steps": 4, "batch_size": 3, "learning_rate": 2e-3, "warmup_steps": 0}
    lora = {"type": "lora", "r": 8}
    trainer = DecoderTrainer(real_decoder, lora, {"task": "chat"}, rows, rows, cfg)
    trainer.setup()
    before = trainer.evaluate()
    result = trainer.train()
    assert result.metrics["val_loss"] < 0.5 * before["loss"]
    assert result.adapter.base_fingerprint == real_decoder.fingerprint
