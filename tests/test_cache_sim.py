"""Behaviour of bench.cache_sim: LRU, routing and metadata-cache properties on small seeded runs.

Every run here is tiny (<= 60k requests) so the whole file takes a couple of seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench import cache_sim as cs
from bench.cache_sim import SimConfig, SimResult, simulate

SMALL = SimConfig(
    adapters=2000, replicas=8, cache=64, zipf=1.0, rps=1000.0, requests=60_000, seed=3
)


def by_strategy(results: list[SimResult]) -> dict[str, SimResult]:
    return {r.strategy: r for r in results}


def test_cache_holding_every_adapter_hits_always_after_warmup() -> None:
    cfg = SimConfig(
        adapters=20, replicas=4, cache=32, zipf=1.1, rps=1000.0, requests=40_000, warmup=0.5
    )
    res = by_strategy(simulate(cfg))
    for strategy in ("random", "affinity"):
        assert res[strategy].hit_rate == 1.0, strategy
        assert res[strategy].adapter_reads_per_s == 0.0
        assert res[strategy].db_bytes_per_s == 0.0
    # Spill can still send an adapter to a replica it has never visited (a deep choice taken
    # once, when the first ones were full): a first-touch miss, never an eviction (see below).
    assert res["affinity+spill"].hit_rate > 0.999


def test_misses_without_evictions_are_exactly_first_touches() -> None:
    # K >= N: nothing is ever evicted, so every miss is a (replica, adapter) pair's first
    # request, and a metadata cache that never expires misses exactly as often.
    cfg = SimConfig(
        adapters=300, replicas=5, cache=300, requests=20_000, warmup=0.0, meta_ttl_s=math.inf
    )
    traffic, route_rngs = cs._rngs(cfg.seed)
    reqs, _ = cs.zipf_stream(cfg, traffic)
    for strategy in cs.STRATEGIES:
        routes, _ = cs.route(strategy, reqs, cfg, route_rngs[strategy])
        counts = cs.replay(reqs, routes, cfg)
        pairs = len(np.unique(routes * cfg.adapters + reqs))
        assert counts.misses_total == pairs
        assert counts.meta_lookups == pairs
        assert counts.hits == cfg.requests - pairs


def test_affinity_beats_random_when_fleet_cache_exceeds_one_replica() -> None:
    # R*K = 512 < N = 2000 <= 4*R*K: one replica cannot hold the working set, the fleet can
    # hold a good part of it if each adapter lives on one replica.
    res = by_strategy(simulate(SMALL))
    assert res["affinity"].hit_rate > res["random"].hit_rate + 0.1
    assert res["affinity+spill"].hit_rate > res["random"].hit_rate
    assert res["affinity"].adapter_reads_per_s < res["random"].adapter_reads_per_s


def test_single_replica_makes_all_strategies_equal() -> None:
    cfg = dataclasses.replace(SMALL, replicas=1, requests=20_000)
    res = simulate(cfg)
    assert len({(r.hit_rate, r.misses, r.meta_lookups_per_s) for r in res}) == 1
    assert all(r.imbalance == 1.0 and r.spilled == 0.0 for r in res)


def test_results_are_deterministic_for_a_seed() -> None:
    cfg = dataclasses.replace(SMALL, requests=20_000)
    first = [dataclasses.asdict(r) for r in simulate(cfg)]
    again = [dataclasses.asdict(r) for r in simulate(cfg)]
    other = [dataclasses.asdict(r) for r in simulate(dataclasses.replace(cfg, seed=4))]
    assert first == again
    assert first != other


def test_strategy_subset_does_not_change_traffic() -> None:
    cfg = dataclasses.replace(SMALL, requests=20_000)
    alone = simulate(cfg, ["affinity"])[0]
    together = by_strategy(simulate(cfg))["affinity"]
    assert alone == together


def test_simulated_lru_matches_che_approximation() -> None:
    # Independent Zipf requests are the regime where Che's approximation is known to be
    # accurate; agreement checks the LRU bookkeeping, not the approximation.
    res = by_strategy(simulate(SMALL, ["random", "affinity"]))
    for strategy in ("random", "affinity"):
        che = res[strategy].che_hit_rate
        assert che is not None
        assert abs(res[strategy].hit_rate - che) < 0.02, strategy


def test_spill_bounds_load_imbalance() -> None:
    cfg = dataclasses.replace(SMALL, zipf=1.2)
    res = by_strategy(simulate(cfg))
    window = round(cfg.service_ms / 1000 * cfg.rps)
    cap = math.ceil(cfg.spill_factor * window / cfg.replicas)
    assert res["affinity"].imbalance > 2.0  # the hottest adapter's home is overloaded
    assert res["affinity+spill"].imbalance <= cap / (window / cfg.replicas) + 0.05
    assert 0 < res["affinity+spill"].spilled < 1
    assert res["random"].spilled == res["affinity"].spilled == 0


def test_metadata_ttl_extremes() -> None:
    cfg = dataclasses.replace(SMALL, requests=10_000, meta_ttl_s=0.0)
    for res in simulate(cfg):
        assert res.meta_lookups_per_s == pytest.approx(cfg.rps)  # one lookup per request
        assert res.meta_hit_rate == 0.0
    longer = by_strategy(simulate(dataclasses.replace(cfg, meta_ttl_s=5.0)))
    assert 0 < longer["affinity"].meta_lookups_per_s < longer["random"].meta_lookups_per_s


def test_rendezvous_moves_only_adapters_claimed_by_a_new_replica() -> None:
    ids = np.arange(20_000)
    before = cs.rendezvous_home(ids, 10)
    after = cs.rendezvous_home(ids, 11)
    moved = before != after
    assert np.all(after[moved] == 10)  # nothing reshuffles between the old replicas
    assert moved.mean() == pytest.approx(1 / 11, abs=0.01)
    assert np.bincount(before).min() > 0.9 * len(ids) / 10  # the hash spreads ids evenly
    order = cs.rendezvous_order(123, 10)
    assert sorted(order) == list(range(10)) and order[0] == before[123]


def test_zipf_stream_follows_the_law() -> None:
    cfg = SimConfig(adapters=1000, zipf=1.1, requests=200_000)
    reqs, p = cs.zipf_stream(cfg, np.random.default_rng(0))
    assert p.sum() == pytest.approx(1.0)
    top = int(p.argmax())
    assert (reqs == top).mean() == pytest.approx(p[top], rel=0.05)
    assert reqs.min() >= 0 and reqs.max() < cfg.adapters


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim.json"
    argv = ["--adapters", "500", "--replicas", "4", "--cache", "16", "--requests", "5_000"]
    argv += ["--sweep", "2:16:1.1", "--json", str(out)]
    assert cs.main(argv) == 0
    text = capsys.readouterr().out
    assert "affinity+spill" in text and "sweep" in text
    data = json.loads(out.read_text())
    assert data["config"]["requests"] == 5000
    assert [r["strategy"] for r in data["results"]] == list(cs.STRATEGIES)
    assert data["sweep"][0]["config"]["replicas"] == 2
