"""The inference engine on a tiny random BERT: mixed batches equal one row at a time."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from core.adapter import Adapter
from core.base import FrozenBase
from core.errors import AdapterFormatError
from core.inference import (
    AdapterNotResidentError,
    InferenceEngine,
    ResidencyError,
    Row,
)
from core.inference.engine import InferenceEngine as _Engine
from core.inference.rows import ForwardMode
from tests.core.inference.helpers import lora, output, random_adapter, reference

TEXTS = [
    "the movie was great",
    "a boring film",
    "this story is not good and the actor was awful, really awful",
    "fun",
    "i love it so much " * 20,  # longer than the tiny model's 64 positions: truncated
    "the plot was fine",
]
PAIR = "was it good? yes"


def mixed_adapters(base: FrozenBase) -> dict[Hashable, Adapter]:
    """LoRA adapters of different ranks, targets, layers and heads."""
    return {
        ("t1", "qv2"): lora(base, 2, n_labels=2),
        ("t1", "all8"): lora(base, 8, "all-linear", n_labels=3),
        ("t2", "key4"): lora(base, 4, ["key"], layers=[1], n_labels=5),
        ("t2", "rs1"): lora(base, 1, ["value", "output.dense"], use_rslora=True, n_labels=None),
        ("t3", "ffn16"): lora(base, 16, ["intermediate.dense"], n_labels=2, seed=99),
    }


def rows_for(keys: list[Hashable | None], mode: ForwardMode = "unmerged") -> list[Row]:
    rows = []
    for i, k in enumerate(keys):
        pair = PAIR if i % 3 == 2 else None
        rows.append(Row(k, TEXTS[i % len(TEXTS)], pair, mode=mode))
    return rows


def check(base: FrozenBase, adapters: dict, rows: list[Row], results: list, atol: float) -> None:
    assert len(results) == len(rows)
    for row, res in zip(rows, results, strict=True):
        adapter = adapters.get(row.key) if row.key is not None else None
        want = reference(base, adapter, row.text, row.text_pair)
        torch.testing.assert_close(output(res), want, atol=atol, rtol=0)


@pytest.fixture()
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts encoder forwards the engine runs."""
    calls: list[int] = []
    orig = _Engine._encode

    def _encode(self, batch, hooks):  # type: ignore[no-untyped-def]
        calls.append(batch["input_ids"].shape[0])
        return orig(self, batch, hooks)

    monkeypatch.setattr(_Engine, "_encode", _encode)
    return calls


def test_mixed_lora_batch_equals_each_row_alone(tiny_base: FrozenBase, counted: list[int]) -> None:
    adapters = mixed_adapters(tiny_base)
    engine = InferenceEngine(tiny_base)
    for key, a in adapters.items():
        engine.load(key, a)
    keys: list[Hashable | None] = [*adapters, None] * 3 + [None, ("t1", "qv2")]
    rows = rows_for(keys)
    results = engine.run(rows)
    check(tiny_base, adapters, rows, results, atol=1e-5)
    assert counted == [len(rows)]  # pairs, singles, 5 adapters and the bare base: one forward
    # Heads per row: different label sets in one batch.
    by_key = {r.key: res for r, res in zip(rows, results, strict=True)}
    assert list(by_key[("t2", "key4")].probabilities) == ["one", "two", "three", "four", "five"]
    assert by_key[("t1", "all8")].label in {"neg", "neutral", "pos"}
    assert by_key[("t2", "rs1")].task == "reward" and by_key[("t2", "rs1")].reward is not None
    assert by_key[None].features is not None and len(by_key[None].features) == 32
    assert abs(sum(by_key[("t1", "qv2")].probabilities.values()) - 1) < 1e-6


def test_merged_equals_unmerged_and_is_cached(tiny_base: FrozenBase) -> None:
    adapters = mixed_adapters(tiny_base)
    engine = InferenceEngine(tiny_base)
    for key, a in adapters.items():
        engine.load(key, a)
    keys: list[Hashable | None] = list(adapters) * 2
    unmerged = engine.run(rows_for(keys))
    merged = engine.run(rows_for(keys, mode="merged"))
    for u, m in zip(unmerged, merged, strict=True):
        torch.testing.assert_close(output(m), output(u), atol=1e-4, rtol=0)
    assert engine.stats.merged_cache_count == len(adapters)
    # A second merged run reuses the cache; unloading an adapter drops its merged weights.
    engine.run(rows_for(keys, mode="merged"))
    assert engine._merged.hits >= len(adapters)
    engine.unload(("t1", "qv2"))
    assert engine.stats.merged_cache_count == len(adapters) - 1


def test_merged_cache_is_bounded(tiny_base: FrozenBase) -> None:
    adapters = mixed_adapters(tiny_base)
    one = 4 * 32 * 32 * 4  # merged qv2: query + value weights of 2 layers, 32x32 fp32
    engine = InferenceEngine(tiny_base, merged_cache_bytes=one)
    for key, a in adapters.items():
        engine.load(key, a)
    res = engine.run(rows_for(list(adapters), mode="merged"))
    assert all(r.ok for r in res)
    assert engine.stats.merged_cache_bytes <= one


def test_other_methods_mix_with_lora_rows(tiny_base: FrozenBase, counted: list[int]) -> None:
    adapters: dict[Hashable, Adapter] = {
        "lora": lora(tiny_base, 4, n_labels=3),
        "bottleneck": random_adapter(tiny_base, "adapter", {"bottleneck_size": 8}, 2, seed=1),
        "prompt": random_adapter(tiny_base, "prompt_tuning", {"n_virtual_tokens": 5}, 5, seed=2),
        "probe": random_adapter(tiny_base, "feature_extraction", {}, 2, seed=3),
        "full": random_adapter(tiny_base, "full", {}, None, seed=4),
    }
    engine = InferenceEngine(tiny_base)
    for key, a in adapters.items():
        engine.load(key, a)
    keys: list[Hashable | None] = [*adapters, None] * 2
    rows = [*rows_for(keys), Row("prompt", TEXTS[4])]  # long text: truncated to 64 - 5 tokens
    results = engine.run(rows)
    check(tiny_base, adapters, rows, results, atol=1e-5)
    # One mixed forward for the LoRA + bare rows; the others run through their own models.
    assert counted == [4]
    assert engine.stats.resident_count == 5


def test_lru_eviction_and_reload(tiny_base: FrozenBase) -> None:
    adapters = {f"a{i}": lora(tiny_base, 4, seed=i) for i in range(4)}
    probe = InferenceEngine(tiny_base)
    probe.load("x", adapters["a0"])
    size = probe.stats.resident_bytes
    evicted_log: list[Hashable] = []
    engine = InferenceEngine(tiny_base, max_resident_bytes=2 * size, on_evict=evicted_log.append)
    assert engine.load("a0", adapters["a0"]) == []
    engine.load("a1", adapters["a1"])
    engine.run([Row("a0", "fun")])  # a0 becomes most recently used
    assert engine.load("a2", adapters["a2"]) == ["a1"]
    assert "a1" not in engine and "a0" in engine and evicted_log == ["a1"]
    assert engine.stats.evictions == 1 and engine.stats.resident_count == 2
    assert engine.stats.resident_bytes == 2 * size

    rows = [Row("a1", "the movie"), Row("a0", "the movie"), Row("a2", "bad")]
    res = engine.run(rows)
    assert isinstance(res[0].error, AdapterNotResidentError)
    check(tiny_base, adapters, rows[1:], res[1:], atol=1e-5)

    # With a loader, missing adapters are fetched without evicting ones this batch uses.
    rows = [Row("a0", "the movie"), Row("a3", "a great story"), Row("a2", "bad")]
    res = engine.run(rows, loader=adapters.__getitem__)
    assert isinstance(res[1].error, ResidencyError)  # a0 and a2 are both in use: no room
    assert res[0].ok and res[2].ok
    rows = [Row("a1", "the movie"), Row("a1", "fun"), Row("a2", "bad")]
    res = engine.run(rows, loader=adapters.__getitem__)
    check(tiny_base, adapters, rows, res, atol=1e-5)
    assert "a0" not in engine and engine.stats.misses >= 3


def test_unload_frees_slot_and_reuse_leaves_no_stale_weights(tiny_base: FrozenBase) -> None:
    big = lora(tiny_base, 16, "all-linear", seed=1)
    small = lora(tiny_base, 2, ["query"], seed=2)
    other = lora(tiny_base, 4, seed=3)
    engine = InferenceEngine(tiny_base)
    engine.load("big", big)
    engine.load("other", other)
    slot = engine.slot_of("big")
    assert engine.unload("big") and "big" not in engine and not engine.unload("big")
    assert engine.stats.resident_count == 1
    engine.load("small", small)
    assert engine.slot_of("small") == slot  # the freed slot is reused
    rows = [Row("small", TEXTS[0]), Row("other", TEXTS[2]), Row("small", TEXTS[3], PAIR)]
    check(tiny_base, {"small": small, "other": other}, rows, engine.run(rows), atol=1e-5)


def test_load_and_unload_after_a_run_outside_inference_mode(tiny_base: FrozenBase) -> None:
    """run() grows the bank in inference mode; the serving thread's invalidation commands
    (unload) and direct loads come later, outside it, and must still work."""
    adapters = {k: lora(tiny_base, 4, seed=i) for i, k in enumerate(("a", "b", "c"))}
    engine = InferenceEngine(tiny_base)
    rows = [Row("a", TEXTS[0]), Row("b", TEXTS[1])]
    engine.run(rows, loader=adapters.__getitem__)
    assert not torch.is_inference_mode_enabled()
    slot, nbytes = engine.slot_of("a"), engine.stats.resident_bytes
    assert engine.unload("a") and "a" not in engine
    assert engine.stats.resident_bytes == nbytes // 2  # both adapters are the same size
    engine.load("c", adapters["c"])
    assert engine.slot_of("c") == slot  # the freed slot was returned and reused
    rows = [Row("c", TEXTS[2]), Row("b", TEXTS[3])]
    check(tiny_base, adapters, rows, engine.run(rows), atol=1e-5)


def test_loading_writes_only_its_own_slot(tiny_base: FrozenBase) -> None:
    engine = InferenceEngine(tiny_base)
    engine.load("a", lora(tiny_base, 8, "all-linear", seed=1))
    engine.load("b", lora(tiny_base, 4, seed=2))
    bank = engine.bank
    assert bank.capacity > 3  # no growth in between: storage must stay in place
    before = {
        s: (bank.site(*s).a.data_ptr(), bank.site(*s).a.clone(), bank.site(*s).b.clone())
        for s in bank.sites
    }
    engine.load("c", lora(tiny_base, 2, ["query", "value"], seed=3))
    new = engine.slot_of("c")
    for s, (ptr, a, b) in before.items():
        w = bank.site(*s)
        assert w.a.data_ptr() == ptr
        others = [i for i in range(bank.capacity) if i != new]
        assert torch.equal(w.a[others], a[others]) and torch.equal(w.b[others], b[others])


def test_base_weights_never_change(tiny_base: FrozenBase) -> None:
    before = {k: v.clone() for k, v in tiny_base.encoder.state_dict().items()}
    adapters = mixed_adapters(tiny_base)
    adapters["full"] = random_adapter(tiny_base, "full", {}, 2, seed=5)
    for dtype in (torch.float32, torch.bfloat16):
        engine = InferenceEngine(tiny_base, dtype=dtype)
        for key, a in adapters.items():
            engine.load(key, a)
        engine.run(rows_for([*adapters, None]))
        engine.run(rows_for([*adapters, None], mode="merged"))
        for key in list(adapters):
            engine.unload(key)
    after = tiny_base.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(tiny_base.encoder.parameters()).dtype == torch.float32


def test_bfloat16_serving_copy_is_close(tiny_base: FrozenBase) -> None:
    adapters = mixed_adapters(tiny_base)
    e32 = InferenceEngine(tiny_base)
    e16 = InferenceEngine(tiny_base, dtype=torch.bfloat16)
    assert e16._serving is not tiny_base and e32._serving is tiny_base
    for key, a in adapters.items():
        e32.load(key, a)
        e16.load(key, a)
    rows = rows_for([*adapters, None])
    for a, b in zip(e32.run(rows), e16.run(rows), strict=True):
        torch.testing.assert_close(output(b), output(a), atol=0.1, rtol=0.05)


def test_errors_stay_with_their_rows(tiny_base: FrozenBase) -> None:
    good = lora(tiny_base, 2)
    engine = InferenceEngine(tiny_base)
    engine.load("good", good)

    def loader(key: Hashable) -> Adapter:
        raise LookupError(f"no adapter {key}")

    rows = [
        Row("good", "fun"),
        Row("missing", "fun"),
        Row("good", "bad", mode="weird"),  # type: ignore[arg-type]
        Row(None, "fun"),
    ]
    res = engine.run(rows, loader=loader)
    assert res[0].ok and res[3].ok
    assert isinstance(res[1].error, LookupError) and res[1].key == "missing"
    assert res[2].error is not None
    assert engine.run([]) == []
    assert isinstance(engine.run([Row("missing", "x")])[0].error, KeyError)


def test_failed_loads_change_nothing(tiny_base: FrozenBase) -> None:
    adapter = lora(tiny_base, 4)
    engine = InferenceEngine(tiny_base, max_resident_bytes=10)
    with pytest.raises(ResidencyError):
        engine.load("big", adapter)
    engine = InferenceEngine(tiny_base)
    engine.load("a", adapter)
    wrong = lora(tiny_base, 4)
    wrong.base_fingerprint = "0" * 64
    with pytest.raises(AdapterFormatError):
        engine.load("a", wrong)
    broken = lora(tiny_base, 4)
    broken.method_state = {k: v[:1] for k, v in broken.method_state.items()}
    with pytest.raises(AdapterFormatError):
        engine.load("a", broken)
    assert engine.resident_keys() == ["a"] and len(engine.bank) == 1
    rows = [Row("a", "fun")]
    check(tiny_base, {"a": adapter}, rows, engine.run(rows), atol=1e-5)


def test_reload_replaces_version_in_place(tiny_base: FrozenBase) -> None:
    v1, v2 = lora(tiny_base, 4, seed=1), lora(tiny_base, 8, seed=2)
    engine = InferenceEngine(tiny_base)
    engine.load("k", v1)
    engine.run([Row("k", "fun", mode="merged")])
    engine.load("k", v2)
    assert len(engine.bank) == 1 and engine.stats.resident_count == 1
    rows = [Row("k", "fun"), Row("k", "fun", mode="merged")]
    check(tiny_base, {"k": v2}, rows, engine.run(rows), atol=1e-4)
