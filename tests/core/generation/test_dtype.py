"""Generation in bfloat16 (the ``generation_dtype`` setting) against float32."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import core.generation.scheduler as scheduler_module
from core.decoder.base import DecoderBase
from core.generation.kv import SlotCache
from core.generation.scheduler import GenerationRequest, Scheduler
from core.hardware import cpu_flags, kv_dtype, one_thread_below, resolve_dtype
from tests.core.decoder.test_forward import random_rows
from tests.core.generation.helpers import chat_prompts, greedy, random_lora, run_all


def test_resolve_dtype_names_and_auto() -> None:
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    fast = {"amx_bf16", "avx512_bf16"} & cpu_flags()
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if fast else torch.float32)
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", torch.device("cpu"))


def test_the_kv_cache_is_fp32_under_bf16_weights_on_a_cpu_without_amx() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert kv_dtype(torch.float32, cpu) == torch.float32
    assert kv_dtype(torch.bfloat16, cuda) == torch.bfloat16
    amx = "amx_bf16" in cpu_flags()
    assert kv_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if amx else torch.float32)


def test_small_passes_run_on_one_thread_only_in_bf16_on_an_amx_cpu() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert one_thread_below(torch.float32, cpu) == 0
    assert one_thread_below(torch.bfloat16, cuda) == 0
    amx = "amx_bf16" in cpu_flags()
    assert one_thread_below(torch.bfloat16, cpu) == (768 if amx else 0)


def test_a_pass_under_one_thread_tokens_computes_on_one_thread(
    tiny_decoder: DecoderBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a two-thread step, a prefill or decode pass of fewer tokens than
    ``one_thread_tokens`` runs on one thread and a larger one on both; the count comes back."""
    seen: list[tuple[str, int, int]] = []  # (pass, its tokens, threads while it ran)
    real_prefill, real_decode = scheduler_module.prefill, scheduler_module.decode_step

    def prefill(weights: Any, cache: Any, prompts: list[list[int]], *a: Any, **k: Any) -> Any:
        seen.append(("prefill", sum(map(len, prompts)), torch.get_num_threads()))
        return real_prefill(weights, cache, prompts, *a, **k)

    def decode_step(weights: Any, cache: Any, slots: torch.Tensor, *a: Any, **k: Any) -> Any:
        seen.append(("decode", len(slots), torch.get_num_threads()))
        return real_decode(weights, cache, slots, *a, **k)

    monkeypatch.setattr(scheduler_module, "prefill", prefill)
    monkeypatch.setattr(scheduler_module, "decode_step", decode_step)
    weights = tiny_decoder.weights
    # The hardware's rule by default: none for fp32 weights.
    assert (
        Scheduler(weights, tiny_decoder.tokenizer, num_slots=1, capacity=8).one_thread_tokens == 0
    )
    sched = Scheduler(
        weights, tiny_decoder.tokenizer, num_slots=2, capacity=32, one_thread_tokens=6
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        vocab = tiny_decoder.config.vocab_size
        run_all(sched, [GenerationRequest(random_rows(vocab, [4], seed=1)[0], greedy(3))])
        run_all(sched, [GenerationRequest(random_rows(vocab, [8], seed=2)[0], greedy(2))])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [
        ("prefill", 4, 1),
        ("decode", 1, 1),
        ("decode", 1, 1),
        ("prefill", 8, 2),
        ("decode", 1, 1),
    ]


@pytest.mark.real_model
def test_bf16_weights_are_a_half_size_copy(real_decoder: DecoderBase) -> None:
    fp32 = real_decoder.weights
    bf16 = fp32.to(torch.bfloat16)
    assert fp32.to(torch.float32) is fp32
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert bf16.lm_head is bf16.embed  # SmolLM2's tied head stays one tensor
    assert SlotCache(bf16, 1, 8).num_bytes * 2 == SlotCache(fp32, 1, 8).num_bytes


@pytest.mark.real_model
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float32])
def test_smollm2_bf16_greedy_agrees_with_fp32(
    real_decoder: DecoderBase, cache_dtype: torch.dtype
) -> None:
    """bf16 weights with a bf16 KV cache (AMX CPUs, CUDA) or an fp32 one (other CPUs)."""
    tok = real_decoder.tokenizer
    prompts = chat_prompts(real_decoder, "What is the capital of France?", "Name a colour.")
    adapter = random_lora(real_decoder, "smol-r8", 8, ("q_proj", "v_proj", "down_proj"), std=0.02)
    requests = [GenerationRequest(prompts[0], greedy(8)), GenerationRequest(prompts[1], greedy(8))]
    requests.append(GenerationRequest(prompts[0], greedy(8), adapter))
    tokens = {}
    for dtype in (torch.float32, torch.bfloat16):
        sched = Scheduler(
            real_decoder.weights.to(dtype),
            real_decoder.tokenizer,
            num_slots=3,
            capacity=128,
            kv_dtype=cache_dtype if dtype == torch.bfloat16 else None,
        )
        assert sched.cache.dtype == (cache_dtype if dtype == torch.bfloat16 else torch.float32)
        ids, out = run_all(sched, requests)
        tokens[dtype] = [out.tokens[(rid, 0)] for rid in ids]
    # bf16 rounds every matmul's inputs to 8 bits of mantissa: a near-tie later in a sequence
    # may go the other way, but the first tokens of a confident answer do not.
    for fp32, bf16 in zip(tokens[torch.float32], tokens[torch.bfloat16], strict=True):
        assert bf16[:3] == fp32[:3]
    assert "Paris" in tok.decode(tokens[torch.bfloat16][0])


@pytest.mark.parametrize("n", [1, 2])
def test_chunked_prefill_into_an_fp32_cache_under_bf16_weights(
    tiny_decoder: DecoderBase, n: int
) -> None:
    """The CPU-without-AMX layout (bf16 linears, fp32 keys and values): a prompt's later chunks
    read the earlier ones' fp32 keys beside their own, cast from bf16, and generate what one
    pass does, with and without an adapter's hooks (and ``n`` candidates copying the
    prompt's keys)."""
    (prompt,) = random_rows(tiny_decoder.config.vocab_size, [45], seed=25)
    adapter = random_lora(tiny_decoder, "all-r4", 4, seed=1)
    requests = [
        GenerationRequest(prompt, greedy(12, n=n), adapter),
        GenerationRequest(prompt, greedy(12, n=n)),
    ]
    weights = tiny_decoder.weights.to(torch.bfloat16)
    tokens = {}
    for budget in (2048, 16):
        sched = Scheduler(
            weights,
            tiny_decoder.tokenizer,
            num_slots=4,
            capacity=64,
            prefill_tokens_per_step=budget,
            kv_dtype=torch.float32,
        )
        assert sched.cache.dtype == torch.float32
        ids, out = run_all(sched, requests)
        assert sched.prefill_tokens == 2 * 45
        tokens[budget] = [out.tokens[(rid, j)] for rid in ids for j in range(n)]
    assert all(len(t) == 12 for t in tokens[16])
    assert tokens[16] == tokens[2048]
