"""bench.decoder_quality on the tiny random Llama and HH-shaped literal rows: every arm of
ours runs, and its held-out figures are the decoder trainer's own validation metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from bench import decoder_quality as dq
from bench.hh_convert import to_chat, to_dpo
from core.base import FrozenBase
from core.decoder.base import DecoderBase, load_decoder_base
from core.training.decoder import DecoderTrainer
from tests.core.decoder.tiny_llama import TINY_LLAMA_NAME, build_tiny_llama
from tests.test_bench_reward_quality import dialogue_pairs

BUDGET = dq.Budget(train_pairs=8, test_pairs=6, max_seq_length=128, batch_size=4)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> DecoderBase:
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return load_decoder_base(folder, name=TINY_LLAMA_NAME, device="cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def split() -> dq.Split:
    return dq.Split(dialogue_pairs(BUDGET.train_pairs), dialogue_pairs(BUDGET.test_pairs, 100))


def test_every_arm_of_ours_runs(tiny_decoder: DecoderBase, tiny_base: FrozenBase) -> None:
    arms = ["base", "sft", "dpo", "sft_dpo", "samples", "reward"]
    got = dq.run_arms(tiny_decoder, split(), BUDGET, arms, new_tokens=4, encoder=tiny_base)
    rows = {r["arm"]: r for r in got}
    assert list(rows) == arms
    base = rows["base"]
    # The base is its own reference: every implicit reward is 0, a tie, which counts as wrong.
    assert base["preference_accuracy"] == 0.0 and base["mean_margin"] == 0.0
    assert base["target_tokens"] == rows["sft"]["target_tokens"] > 0
    for arm in ("sft", "dpo", "sft_dpo"):
        assert rows[arm]["steps"] == 2 and rows[arm]["train_rows"] == 8
        assert rows[arm]["train_s"] > 0
        assert_peak_rss(rows[arm])
    for arm in ("dpo", "sft_dpo"):
        assert 0.0 <= rows[arm]["preference_accuracy"] <= 1.0 and rows[arm]["test_pairs"] == 6
    samples = rows["samples"]
    assert len(samples["prompts"]) == dq.N_SAMPLES
    for model in ("base", "sft", "dpo", "sft_dpo"):
        assert len(samples[model]) == dq.N_SAMPLES and all(
            isinstance(s, str) for s in samples[model]
        )
    reward = rows["reward"]
    assert 0.0 <= reward["pair_accuracy"] <= 1.0 and reward["test_pairs"] == 6
    assert reward["steps"] == 2 and reward["train_s"] > 0
    assert_peak_rss(reward)
    assert_peak_rss(base)
    assert 0.0 <= reward["minilm"]["accuracy"] <= 1.0 and reward["minilm"]["test_pairs"] == 6


def assert_peak_rss(row: dict[str, Any]) -> None:
    """A phase's peak (or, where the kernel refuses the reset, the process's) holds at least
    what stays resident all along: torch itself is over 100 MiB."""
    assert row["peak_rss_scope"] in ("phase", "process")
    assert row["peak_rss_mib"] > 100


def test_chat_and_pair_rows_score_the_same_chosen_tokens(tiny_decoder: DecoderBase) -> None:
    s = split()
    s.encode(tiny_decoder, BUDGET.max_seq_length)
    for chat, pair in zip(s.test_chat.rows, s.test_pairs.rows, strict=True):
        assert chat[0] == pair[0]  # same ids and loss mask: SFT's target is DPO's preferred


@pytest.mark.parametrize("task", ["chat", "dpo"])
def test_scores_are_the_trainers_validation_metrics(tiny_decoder: DecoderBase, task: str) -> None:
    s = split()
    s.encode(tiny_decoder, BUDGET.max_seq_length)
    convert = to_chat if task == "chat" else to_dpo
    cfg = {**BUDGET.training(), "max_steps": 3}
    trainer = DecoderTrainer(
        tiny_decoder,
        dq.LORA,
        {"task": task},
        [convert(r) for r in s.train_hh],
        [convert(r) for r in s.test_hh],
        cfg,
    )
    result = trainer.train()
    # The kept adapter (the best validation's) as served, and that validation's metrics.
    metrics, hooks = result.metrics, result.adapter.load_method(tiny_decoder).hooks()
    if task == "chat":
        ours = dq.sft_metrics(dq.score(tiny_decoder, s.test_chat, hooks))
        assert ours["loss"] == pytest.approx(metrics["val_loss"], abs=1e-4)
        assert ours["token_accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-4)
    else:
        ref = dq.score(tiny_decoder, s.test_pairs)
        policy = dq.score(tiny_decoder, s.test_pairs, hooks)
        ours = dq.dpo_metrics(policy.logp, ref.logp, BUDGET.beta)
        assert ours["preference_accuracy"] == pytest.approx(metrics["val_rewards/accuracies"])
        assert ours["mean_margin"] == pytest.approx(metrics["val_rewards/margins"], abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="TRL is installed")
def test_trl_arm_says_why_it_did_not_run(tiny_decoder: DecoderBase, tmp_path: Path) -> None:
    s = split()
    s.encode(tiny_decoder, BUDGET.max_seq_length)
    reference = dq.score(tiny_decoder, s.test_pairs).logp
    rows = [to_dpo(r) for r in s.train_hh]
    row = dq.trl_arm(tiny_decoder, s, rows, reference, BUDGET, None)
    assert row["arm"] == "trl" and row["skipped"].startswith("TRL does not import here")


def test_a_peak_without_a_reset_is_the_process_peak_and_says_so() -> None:
    from bench.common import peak_rss_mib, peak_rss_since_reset_mib, rss_mib

    # Read before the peak: the suite's other threads may grow the RSS between two readings,
    # so only what was resident before it was taken is a bound the peak must meet.
    lifetime, rss = peak_rss_mib(), rss_mib()
    peak, scope = peak_rss_since_reset_mib(was_reset=False)
    assert scope == "process" and peak >= lifetime and peak >= rss > 100
