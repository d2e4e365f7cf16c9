"""The stacked LoRA bank on its own: slot writes, growth, rank padding, freeing."""

from __future__ import annotations

import torch

from core.encoder import EncoderConfig
from core.inference.bank import LoraBank, MixedLoraHooks

CFG = EncoderConfig(
    vocab_size=10,
    hidden_size=8,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=16,
    max_position_embeddings=16,
)


def pair(r: int, target: str = "query", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n_in, n_out = CFG.linear_shape(target)
    return torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g)


def test_slots_grow_geometrically_and_keep_values() -> None:
    bank = LoraBank(CFG, initial_capacity=2)
    pairs = [{(0, "query"): pair(2, seed=i)} for i in range(5)]
    slots = [bank.add(p, 1.0 + i) for i, p in enumerate(pairs)]
    assert slots == [0, 1, 2, 3, 4]
    assert bank.capacity == 8
    for s, p in zip(slots, pairs, strict=True):
        a, b = bank.slot_pairs(s)[(0, "query")]
        assert torch.equal(a, p[(0, "query")][0]) and torch.equal(b, p[(0, "query")][1])
        assert bank.scale[s] == 1.0 + s


def test_rank_grows_per_site_with_exact_zero_padding() -> None:
    bank = LoraBank(CFG)
    s4 = bank.add({(0, "query"): pair(4), (1, "value"): pair(4, "value")}, 1.0)
    s16 = bank.add({(0, "query"): pair(16, seed=1)}, 1.0)
    assert bank.site(0, "query").rank == 16
    assert bank.site(1, "value").rank == 4  # untouched by the bigger adapter
    a, b = bank.slot_pairs(s4)[(0, "query")]
    assert torch.equal(a, pair(4)[0]) and torch.equal(b, pair(4)[1])
    assert not bank.site(0, "query").a[s4, 4:].any()
    assert not bank.site(0, "query").b[s4, :, 4:].any()
    assert s16 == 1


def test_remove_zeroes_slot_frees_unused_site_and_reuses_slot() -> None:
    bank = LoraBank(CFG)
    s0 = bank.add({(0, "query"): pair(2), (1, "key"): pair(2, "key")}, 2.0)
    s1 = bank.add({(0, "query"): pair(2, seed=1)}, 3.0)
    bytes_before = bank.num_bytes
    bank.remove(s0)
    assert bank.site(1, "key") is None  # no resident adapter targets it any more
    assert bank.num_bytes < bytes_before
    assert not bank.site(0, "query").a[s0].any() and bank.scale[s0] == 0
    assert bank.add({(1, "value"): pair(2, "value", seed=2)}, 1.0) == s0
    assert len(bank) == 2 and s1 == 1


def test_bytes_only_for_targeted_sites() -> None:
    bank = LoraBank(CFG, initial_capacity=4)
    for i in range(4):
        sites = [(layer, t) for layer in range(2) for t in ("query", "value")]
        bank.add({s: pair(8, s[1], seed=i) for s in sites}, 1.0)
    per_site = 4 * (8 * 8 + 8 * 8) * 4  # capacity x (A + B) x fp32
    assert bank.num_bytes == 4 * per_site + 4 * 4  # 4 sites + the scale vector


def test_hooks_match_per_row_loop_and_skip_rows_without_adapter() -> None:
    bank = LoraBank(CFG)
    p = [pair(r, seed=r) for r in (1, 3, 2)]
    slots = [bank.add({(0, "query"): q}, 0.5 * (i + 1)) for i, q in enumerate(p)]
    row_slots = torch.tensor([slots[1], -1, slots[0], slots[2], -1])
    x = torch.randn(5, 3, 8)
    y = torch.randn(5, 3, 8)
    expected = y.clone()
    for i, s in enumerate(row_slots.tolist()):
        if s >= 0:
            a, b = p[s]
            expected[i] += (x[i] @ a.T @ b.T) * 0.5 * (s + 1)
    out = MixedLoraHooks(bank, row_slots).linear(0, "query", x, y.clone())
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    untouched = y.clone()
    assert torch.equal(MixedLoraHooks(bank, row_slots).linear(1, "query", x, untouched), y)
