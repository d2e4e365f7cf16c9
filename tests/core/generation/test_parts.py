"""The scheduler's parts on their own: sampling, incremental detokenization, stop strings,
adapter pins, the KV budget, a decode step's rows over any slots."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from core.decoder.base import DecoderBase
from core.errors import ConfigError
from core.generation.adapters import AdapterFull, AdapterSlots, LoraWeights
from core.generation.decode import decode_step
from core.generation.detok import IncrementalDetokenizer, StopStrings, TokenBytes, token_text
from core.generation.gathered import GatheredPairs
from core.generation.kv import SlotCache, bytes_per_slot, slots_for_budget
from core.generation.sampling import SamplingParams, sample
from core.inference.bank import LoraBank
from tests.core.generation.helpers import random_lora


def test_incremental_detok_never_emits_half_a_character(tiny_decoder: DecoderBase) -> None:
    text = "naïve €5 — 日本 ok"
    ids = tiny_decoder.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # the tiny tokenizer: one token per byte
    detok = IncrementalDetokenizer(tiny_decoder.tokenizer)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # "€" is three bytes: nothing until its last one, then the whole character.
    euro = text.encode().index("€".encode())
    assert pieces[euro : euro + 3] == ["", "", "€"]


def test_incremental_detok_ignores_the_tokenizers_clean_up_of_spaces(
    tiny_decoder: DecoderBase,
) -> None:
    """Clean-up rewrites text already emitted (" 's" -> "'s"): with it, each window's
    difference lost characters ("'so what'" came back as "'o what'")."""
    tokenizer = copy.deepcopy(tiny_decoder.tokenizer)
    tokenizer.clean_up_tokenization_spaces = True
    text = "He said 'so what' , isn't it ? 'sure' ."
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) != text
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(t) for t in tokenizer.encode(text, add_special_tokens=False)) == text


def test_token_bytes_keep_the_parts_of_a_character(tiny_decoder: DecoderBase) -> None:
    tokenizer = tiny_decoder.tokenizer
    text = "a €"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = TokenBytes(tokenizer)(ids)
    assert b"".join(pieces) == text.encode() and pieces[2:] == [b"\xe2", b"\x82", b"\xac"]
    # Named by their bytes, OpenAI's way, so different bytes never share a name.
    assert [token_text(p) for p in pieces] == [
        "a",
        " ",
        "bytes:\\xe2",
        "bytes:\\x82",
        "bytes:\\xac",
    ]
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    assert TokenBytes(tokenizer)([special]) == [tokenizer.eos_token.encode()]


def test_stop_strings_hold_back_what_could_start_one() -> None:
    stops = StopStrings(("STOP", "\n\n"))
    assert stops.feed("Hello S") == ("Hello ", False)  # "S" may begin "STOP"
    assert stops.feed("T") == ("", False)
    assert stops.feed("ay") == ("STay", False)  # it did not
    assert stops.feed(" then\n") == (" then", False)
    assert stops.feed("\nmore") == ("", True)
    held = StopStrings(("END",))
    assert held.feed("the E") == ("the ", False)
    assert held.flush() == "E"  # the sequence ended otherwise: the held text is the reply's


def test_sampling_params_are_bounded() -> None:
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(max_tokens=1, temperature=2.5)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(max_tokens=1, top_p=0.0)
    with pytest.raises(ConfigError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ConfigError, match="top_logprobs"):
        SamplingParams(max_tokens=1, top_logprobs=3)
    with pytest.raises(ConfigError, match="stop"):
        SamplingParams(max_tokens=1, stop=("a", "b", "c", "d", "e"))


def test_sample_greedy_top_p_and_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    greedy = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=2)
    # top_p this small keeps only the most likely token, whatever the temperature.
    narrow = SamplingParams(max_tokens=1, temperature=2.0, top_p=1e-6, seed=0)
    g = [p.generator(0, torch.device("cpu")) for p in (greedy, narrow)]
    tokens, lps = sample(logits, [greedy, narrow], g)
    assert tokens == [1, 0]
    expected = torch.log_softmax(logits[0], -1)
    assert lps[0] is not None and lps[1] is None
    assert lps[0].logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in lps[0].top] == [1, 3]
    assert lps[0].top[1][1] == pytest.approx(float(expected[3]))
    # Temperature sampling follows the distribution: token 0 of softmax([0, ln 3]) ~ 1/4.
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=3)
    gen = p.generator(0, torch.device("cpu"))
    two = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    draws = [sample(two, [p], [gen])[0][0] for _ in range(2000)]
    assert 0.2 < draws.count(0) / 2000 < 0.3


@pytest.mark.parametrize("temperature", [1e-40, 3e-38, 5e-324, 1e-6])
def test_a_tiny_temperature_is_greedy_and_fails_no_row(temperature: float) -> None:
    """logits / 1e-40 is ±inf in float32, whose softmax is NaN: torch.multinomial raised, and
    the step's other rows failed with it."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, -1.0, 0.0, 4.0], [1.0, 1.0, 0.0, 0.0]])
    tiny = SamplingParams(max_tokens=1, temperature=temperature, seed=0)
    other = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True)
    params = [tiny, other, tiny]
    tokens, lps = sample(logits, params, [p.generator(0, torch.device("cpu")) for p in params])
    assert tokens[:2] == [1, 0] and lps[1] is not None
    assert tokens[2] in (0, 1)  # a tie at the top: either, never a token below it


@pytest.mark.parametrize("top_p", [1e-46, 5e-324, 1e-50, 1e-6])
def test_a_tiny_top_p_keeps_the_best_token_and_fails_no_row(top_p: float) -> None:
    """A top_p that is 0 in float32 kept no token: 0/0 probabilities, and torch.multinomial
    raised for the step's every row."""
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9], [5.0, -1.0, 0.0, 4.0]])
    tiny = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p, seed=0)
    other = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True)
    params = [tiny, other, tiny]
    rows = logits[[0, 1, 1]]
    tokens, lps = sample(rows, params, [p.generator(0, torch.device("cpu")) for p in params])
    assert tokens == [1, 0, 0] and lps[1] is not None


def test_adapter_pins_block_eviction_and_invalidation_waits_for_them(
    tiny_decoder: DecoderBase,
) -> None:
    slots = AdapterSlots(tiny_decoder.weights, max_adapters=2)
    a, b, c = (random_lora(tiny_decoder, k, 2, seed=i) for i, k in enumerate("abc"))
    sa, sb = slots.acquire(a), slots.acquire(b)
    with pytest.raises(AdapterFull):
        slots.acquire(c)  # both pinned: nothing may be evicted
    slots.release(sa, "a")
    sc = slots.acquire(c)  # a was unpinned: evicted, its slot reused
    assert sc == sa and slots.pins("a") == 0 and len(slots) == 2
    slots.invalidate("b")  # pinned: leaves the table, keeps its slot until released
    assert slots.pins("b") == 0 and len(slots.bank) == 2
    pair = slots.bank.slot_pairs(sb)[(0, "q_proj")]
    torch.testing.assert_close(pair[0], b.pairs[(0, "q_proj")][0])
    slots.release(sb, "b")
    assert len(slots.bank) == 1


def test_kv_budget_counts_slots(tiny_decoder: DecoderBase) -> None:
    cfg = tiny_decoder.config
    per = bytes_per_slot(cfg, 128, torch.float32)
    assert per == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 128 * 4
    assert slots_for_budget(cfg, 128, torch.float32, 5 * per + per // 2) == 5


def test_grouped_lora_delta_per_row_and_never_stale(tiny_decoder: DecoderBase) -> None:
    """Each row gets its own adapter's delta (none for -1) at every target, mixed ranks and
    bare rows in one batch, whatever the rows' order, and the pairs the hooks keep gathered
    between steps are re-read once a slot holds another adapter."""
    slots = AdapterSlots(tiny_decoder.weights, max_adapters=2)
    a, b, c = (random_lora(tiny_decoder, k, 2 + i, seed=i) for i, k in enumerate("abc"))
    sa, sb = slots.acquire(a), slots.acquire(b)
    cfg = tiny_decoder.config
    # q/k/v share one input (one stacked shrink matmul), as gate/up do; o_proj has its own.
    shared, own = (torch.randn(4, 3, cfg.linear_shape(t)[0]) for t in ("q_proj", "o_proj"))
    sites = [
        (1, t, own if t == "o_proj" else shared) for t in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]

    def check(rows: list[LoraWeights | None], slot_ids: list[int]) -> None:
        hooks = slots.hooks(torch.tensor(slot_ids))
        for layer, target, x in sites:
            got = hooks.linear(layer, target, x, torch.zeros(4, 3, cfg.linear_shape(target)[1]))
            for i, adapter in enumerate(rows):
                if adapter is None:
                    want = torch.zeros_like(got[i])
                else:
                    lora_a, lora_b = adapter.pairs[(layer, target)]
                    want = adapter.scaling * (x[i] @ lora_a.T) @ lora_b.T
                torch.testing.assert_close(got[i], want)

    check([a, None, b, a], [sa, -1, sb, sa])  # rows of one adapter apart, a bare row between
    check([a, None, b, a], [sa, -1, sb, sa])  # the gathered pairs, reused
    check([None, None, b, a], [-1, -1, sb, sa])  # bare rows first
    check([b, b, a, a], [sb, sb, sa, sa])  # two rows per adapter
    slots.release(sa, "a")
    sc = slots.acquire(c)  # evicts a: c now sits in a's slot (and has a larger rank)
    assert sc == sa
    check([c, None, b, c], [sc, -1, sb, sc])


def test_bf16_base_keeps_bf16_pairs_and_an_fp32_scale(tiny_decoder: DecoderBase) -> None:
    """Under a bf16 base the bank and the decode step's copies hold bf16 pairs (half the bytes
    a step streams) and the scale stays fp32 (alpha / sqrt(r) is not a bf16 number); each
    row's delta, decoding and prefilling, is its adapter's fp32 one within bf16's rounding, and
    a bare row's stays exactly zero."""
    adapters = [random_lora(tiny_decoder, k, 4, seed=i) for i, k in enumerate("ab")]
    adapters[0] = dataclasses.replace(adapters[0], scaling=8 / 3)  # bf16 would round it by 0.2%
    sizes = {}
    for dtype in (torch.float32, torch.bfloat16):
        slots = AdapterSlots(tiny_decoder.weights.to(dtype), max_adapters=2)
        sa, sb = (slots.acquire(adapter) for adapter in adapters)
        decode = slots.hooks(torch.tensor([sb, -1, sa]))
        sizes[dtype] = (slots.bank.num_bytes, slots.gathered.num_bytes)
        assert slots.bank.dtype == dtype and slots.bank.scale.dtype == torch.float32
    assert slots.bank.scale[sa].item() == pytest.approx(8 / 3, rel=1e-7)
    # The bank's fp32 scale vector does not halve; everything else does.
    scale_bytes = 4 * slots.bank.capacity
    assert sizes[torch.bfloat16][0] - scale_bytes == (sizes[torch.float32][0] - scale_bytes) // 2
    assert sizes[torch.bfloat16][1] * 2 == sizes[torch.float32][1]
    prefill = slots.segment_hooks([(sb, 0, 1), (sa, 2, 3)])  # rows 0 and 2, row 1 bare
    cfg = tiny_decoder.config
    for hooks in (decode, prefill):
        for target in ("q_proj", "down_proj"):
            n_in, n_out = cfg.linear_shape(target)
            x = torch.randn(3, 1, n_in).bfloat16()
            got = hooks.linear(1, target, x, torch.zeros(3, 1, n_out).bfloat16())
            assert got.dtype == torch.bfloat16 and not got[1].any()
            for row, adapter in ((0, adapters[1]), (2, adapters[0])):
                lora_a, lora_b = adapter.pairs[(1, target)]
                want = adapter.scaling * (x[row].float() @ lora_a.T) @ lora_b.T
                scale = want.abs().max().item()
                torch.testing.assert_close(got[row].float(), want, rtol=0, atol=2e-2 * scale)


def test_the_lora_side_path_computes_on_one_thread(tiny_decoder: DecoderBase) -> None:
    """A step on two threads runs its LoRA deltas' kernels (decode and prefill hooks) on one,
    and gets its two back: their small kernels lose more waking a thread than it shares."""
    slots = AdapterSlots(tiny_decoder.weights, max_adapters=1)
    slot = slots.acquire(random_lora(tiny_decoder, "a", 2, seed=0))
    n_in, n_out = tiny_decoder.config.linear_shape("q_proj")
    counts: list[int] = []

    class Threads(TorchFunctionMode):  # each torch call's thread count, as it runs
        def __torch_function__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            counts.append(torch.get_num_threads())
            return func(*args, **(kwargs or {}))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for hooks, rows in (
            (slots.hooks(torch.tensor([slot, -1])), 2),
            (slots.segment_hooks([(slot, 0, 3)]), 3),
        ):
            counts.clear()
            x, y = torch.randn(rows, 1, n_in), torch.zeros(rows, 1, n_out)
            with Threads():
                hooks.linear(0, "q_proj", x, y)
            assert y.abs().sum() > 0  # the delta was added
            assert counts and set(counts) == {1}
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _check_deltas(
    slots: AdapterSlots,
    rows: list[LoraWeights | None],
    slot_of: dict[str, int],
    targets: tuple[str, ...] = ("gate_proj", "up_proj"),
) -> None:
    """Each of 5 rows gets exactly its adapter's delta at layer 1 (none for None, or where its
    adapter has no pair)."""
    ids = [-1 if a is None else slot_of[str(a.key)] for a in rows]
    hooks = slots.hooks(torch.tensor(ids))
    cfg = slots.bank.config
    g = torch.Generator().manual_seed(0)
    for target in targets:
        n_in, n_out = cfg.linear_shape(target)
        x = torch.randn(5, 1, n_in, generator=g)
        got = hooks.linear(1, target, x, torch.zeros(5, 1, n_out))
        for i, adapter in enumerate(rows):
            want = torch.zeros_like(got[i])
            pair = adapter.pairs.get((1, target)) if adapter is not None else None
            if adapter is not None and pair is not None:
                want = adapter.scaling * (x[i] @ pair[0].T) @ pair[1].T
            torch.testing.assert_close(got[i], want)


def test_running_set_changes_copy_only_the_adapters_that_start(tiny_decoder: DecoderBase) -> None:
    """As sequences start and end, only adapters that were not running are copied out of the
    bank; every row still gets exactly its own adapter's delta (positions reshuffled, rows out
    of the gathered order, bare rows), and a slot refilled by another adapter of the same rank
    (the bank's layout unchanged) is copied anew, not served from its old copy."""
    slots = AdapterSlots(tiny_decoder.weights, max_adapters=6)
    adapters = [random_lora(tiny_decoder, f"a{i}", 2 + i % 2, seed=i) for i in range(7)]
    slot_of = {str(a.key): slots.acquire(a) for a in adapters[:6]}

    def check(rows: list[LoraWeights | None]) -> None:
        _check_deltas(slots, rows, slot_of)

    a = adapters
    steps = [
        ([a[0], a[1], a[2], a[3], None], 4),  # four start
        ([a[0], a[1], a[2], a[3], None], 0),  # the same set: nothing copied
        ([a[4], a[1], a[2], None, a[0]], 1),  # a3 ends, a4 starts; rows reordered
        ([a[2], a[2], a[5], None, None], 1),  # three end, a5 starts in a freed position
        ([a[5], a[4], a[0], a[1], a[2]], 3),  # a4, a0 and a1 start again
        ([None, None, None, None, None], 0),  # nothing running: the copies are dropped
        ([a[3], None, None, None, a[3]], 1),
    ]
    for rows, started in steps:
        before = slots.gathered.copies
        check(rows)
        assert slots.gathered.copies - before == started
    check([a[3], a[4], None, None, a[3]])
    layout = slots.bank.layout_version
    slots.release(slot_of["a4"], "a4")  # a4's sequence ends: the only unpinned adapter...
    slot_of["a6"] = slots.acquire(a[6])  # ...so a6 (rank 2, as a4) takes its slot
    assert slot_of["a6"] == slot_of.pop("a4") and slots.bank.layout_version == layout
    before = slots.gathered.copies
    check([a[3], a[6], None, None, a[3]])
    assert slots.gathered.copies - before == 1


def test_gathered_copies_dropped_sites_failures_and_memory(
    tiny_decoder: DecoderBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A site the bank adds rebuilds the running adapters' copies, one it drops (an idle
    adapter with a target of its own evicted) costs them nothing; a copy that fails half-way
    leaves no position that could be served stale; the copies take at most the
    bank's capacity in positions and go with the last pin."""
    slots = AdapterSlots(tiny_decoder.weights, max_adapters=3)
    gate_up = ("gate_proj", "up_proj")
    run1, run2, third = (
        random_lora(tiny_decoder, key, 2, targets=gate_up, seed=i)
        for i, key in enumerate(("run1", "run2", "third"))
    )
    own = random_lora(tiny_decoder, "own", 2, targets=(*gate_up, "o_proj"), seed=5)
    slot_of = {str(a.key): slots.acquire(a) for a in (run1, run2)}
    gathered = slots.gathered

    def copies(rows: list[LoraWeights | None], targets: tuple[str, ...] = gate_up) -> int:
        before = gathered.copies
        _check_deltas(slots, rows, slot_of, targets)
        return gathered.copies - before

    assert copies([run1, run2, None, None, run1]) == 2
    assert gathered.capacity == 3  # 2 rounded up to 8, but the bank holds 3
    cfg = tiny_decoder.config
    n_in, n_out = cfg.linear_shape("gate_proj")  # as up_proj's
    # Aᵀ side by side [3·in + 1 zero row, 2+2], two Bᵀ [3·2 + 1 zero row, out]
    per_layer = (3 * n_in + 1) * (2 + 2) + 2 * (3 * 2 + 1) * n_out
    assert gathered.num_bytes == cfg.num_hidden_layers * per_layer * 4  # fp32
    slot_of["own"] = slots.acquire(own)  # idle, and adds o_proj sites...
    slots.release(slot_of["own"], "own")
    assert copies([run1, run2, None, None, run1], (*gate_up, "o_proj")) == 2  # ...a rebuild
    slot_of["third"] = slots.acquire(third)  # evicts own: the bank drops its o_proj sites
    assert "own" not in slots.resident_keys()
    assert copies([run1, run2, third, None, run1], (*gate_up, "o_proj")) == 1

    real_copy_in = GatheredPairs._copy_in

    def copy_wrong_then_fail(self: GatheredPairs, bank: LoraBank, slot: int, pos: int) -> None:
        real_copy_in(self, bank, slot_of["run2"], pos)  # pos holds another adapter's pairs...
        raise RuntimeError("out of memory")

    assert copies([third, None, None, None, None]) == 0  # run1 and run2 stop
    monkeypatch.setattr(GatheredPairs, "_copy_in", copy_wrong_then_fail)
    with pytest.raises(RuntimeError):
        _check_deltas(slots, [third, run1, None, None, None], slot_of)  # run1 starts again
    monkeypatch.undo()
    # ...so run1 gets its own pairs (every copy was dropped: third's is made again too).
    assert copies([third, run1, None, None, None]) == 2

    for key in ("run1", "run2", "third"):
        slots.release(slot_of[key], key)
    assert (gathered.capacity, gathered.num_bytes, gathered.position) == (0, 0, {})


def test_gathered_copies_grow_keeping_the_running_adapters_positions(
    tiny_decoder: DecoderBase,
) -> None:
    """More adapters running than the copies have positions for: the buffers grow, adapters
    already running keep their positions and pairs (not copied again), the new ones are
    copied, and every row still gets exactly its own adapter's delta."""
    slots = AdapterSlots(tiny_decoder.weights, max_adapters=12)
    adapters = [random_lora(tiny_decoder, f"a{i}", 2 + i % 3, seed=i) for i in range(12)]
    slot_of = [slots.acquire(a) for a in adapters]
    gathered = slots.gathered
    slots.hooks(torch.tensor([slot_of[0], -1, slot_of[1]]))
    assert gathered.capacity == 8  # 2 running, rounded up to 8
    before = dict(gathered.position)
    copies = gathered.copies
    hooks = slots.hooks(torch.tensor([*slot_of, -1]))
    assert gathered.capacity == 16  # 12 running, rounded up to 16 (the bank holds 16)
    assert gathered.copies - copies == 10
    assert all(gathered.position[load] == pos for load, pos in before.items())
    cfg = tiny_decoder.config
    for target in ("q_proj", "down_proj"):
        n_in, n_out = cfg.linear_shape(target)
        x = torch.randn(13, 1, n_in)
        got = hooks.linear(1, target, x, torch.zeros(13, 1, n_out))
        for row, adapter in enumerate(adapters):
            lora_a, lora_b = adapter.pairs[(1, target)]
            torch.testing.assert_close(got[row], adapter.scaling * (x[row] @ lora_a.T) @ lora_b.T)
        assert not got[12].any()


@pytest.mark.parametrize(
    "slots",
    [[2, 3, 4], [2, 4, 5], [1, 2, 6], [0, 7]],
    ids=["contiguous", "one-hole", "holes-in-span", "far-apart-gathered"],
)
def test_decode_step_rows_equal_each_slot_alone(
    tiny_decoder: DecoderBase, slots: list[int]
) -> None:
    """Whether a step's slots are a slice, a slice with holes or gathered, each row's hidden
    state is the one that slot's sequence gets decoded alone."""
    weights = tiny_decoder.weights
    cache = SlotCache(weights, 8, 16)
    g = torch.Generator().manual_seed(0)
    for layer in range(len(weights.layers)):  # each slot a different random history
        cache.keys[layer].copy_(torch.randn(cache.keys[layer].shape, generator=g))
        cache.values[layer].copy_(torch.randn(cache.values[layer].shape, generator=g))
    lengths = {s: 3 + s for s in range(8)}
    tokens = {s: 10 + 7 * s for s in range(8)}

    def step(which: list[int]) -> torch.Tensor:
        return decode_step(
            weights,
            cache,
            torch.tensor(which),
            torch.tensor([tokens[s] for s in which]),
            torch.tensor([lengths[s] for s in which]),
        )

    with torch.inference_mode():
        together = step(slots)
        for row, slot in enumerate(slots):
            torch.testing.assert_close(together[row], step([slot])[0], rtol=1e-5, atol=1e-5)
