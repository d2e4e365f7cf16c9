"""Adapter-cache simulation: Zipf traffic over R API replicas, each with its own adapter LRU.

What it answers: with N adapters in the database and R API replicas that each keep K adapters
resident, how often does a request miss its replica's cache (and read ~300 KB of adapter
weights from the database), and how does the router in front of the replicas change that?

Model (deliberately small, every number is an input):

* Requests name one adapter drawn from a Zipf(s) law over N adapters (rank k has weight
  ``k**-s``); ranks are shuffled onto ids so popularity is independent of the hash.
* Requests arrive evenly spaced at ``rps``; request ``i`` happens at ``i / rps`` seconds.
* Each replica keeps an LRU of K adapters (an ``OrderedDict``); a miss is one database read
  of the adapter's weights, ``adapter_bytes`` bytes.
* Routing strategies:

  - ``random``: uniform over replicas (a plain L4/L7 load balancer). Every replica sees the
    whole popularity distribution, so the fleet holds about K distinct adapters, R times over.
  - ``affinity``: rendezvous (highest-random-weight) hashing of the adapter id to a replica,
    a stateless stand-in for residency-aware routers (Ray Serve's model multiplexing prefers a
    replica that already has the model loaded; the Gateway API inference extension's endpoint
    picker scores LoRA residency). Each adapter has one home, so the fleet holds ~R*K distinct
    adapters. Its weakness: the hottest adapter's home gets that adapter's whole share.
  - ``affinity+spill``: bounded-load consistent hashing (Mirrokni, Thorup, Zadimoghaddam 2017;
    HAProxy's ``hash-balance-factor``). A replica accepts new requests while its in-flight
    count is below ``ceil(spill_factor * mean in-flight)``; otherwise the request walks the
    adapter's rendezvous preference list (2nd choice, 3rd, ...) to the first replica under
    the bound. In-flight = requests routed to the replica in the last ``service_ms``. Hot
    adapters thus spread over just enough replicas, cold ones stay on their home.

* Metadata: every request needs one indexed lookup of (tenant_id, name) -> adapter row (auth +
  adapter version). Without a cache that is ``rps`` lookups/s; with a per-replica cache whose
  entries live ``meta_ttl_s`` seconds it is one lookup per (replica, adapter) per TTL.

Measurements skip the first ``warmup`` fraction of requests (cold caches fill there). Load
imbalance is max/mean of requests per replica over the whole run.

    python -m bench.cache_sim                      # defaults + a small (R, K, s) sweep
    python -m bench.cache_sim --quick --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES: tuple[str, ...] = ("random", "affinity", "affinity+spill")

# One r=8 LoRA on query+value of MiniLM-L6: 6 layers x 2 targets x (8x384 + 384x8) fp32
# = 73,728 params = 295 KB, plus a small head and safetensors header: ~300 KB.
ADAPTER_BYTES = 300_000

# Extra (R, K, s) points printed after the main table by default; N, rps and requests are
# shared with the main run. K=1700 ~ the service's default 512 MB adapter cache / 300 KB.
DEFAULT_SWEEP: tuple[tuple[int, int, float], ...] = (
    (100, 1024, 1.1),
    (100, 1700, 1.1),
    (100, 256, 0.8),
    (20, 256, 1.1),
)


@dataclass(frozen=True)
class SimConfig:
    adapters: int = 100_000
    replicas: int = 100
    cache: int = 256  # adapters resident per replica (K)
    zipf: float = 1.1
    rps: float = 5000.0
    requests: int = 2_000_000
    seed: int = 0
    # Fraction of requests excluded from hit rate and DB load: long enough that every replica's
    # LRU has filled (R=100, K=1700 random routing needs ~5k requests per replica).
    warmup: float = 0.5
    adapter_bytes: int = ADAPTER_BYTES
    meta_ttl_s: float = 5.0
    service_ms: float = 50.0  # how long a request counts as in flight on its replica (spill)
    spill_factor: float = 1.25  # bounded load: in-flight cap = ceil(factor * mean in-flight)

    def __post_init__(self) -> None:
        if self.adapters < 1 or self.replicas < 1 or self.cache < 0 or self.requests < 1:
            raise ValueError("adapters, replicas and requests must be >= 1, cache >= 0")
        if not 0 <= self.warmup < 1:
            raise ValueError("warmup is a fraction in [0, 1)")
        if self.rps <= 0 or self.zipf < 0:
            raise ValueError("rps must be > 0 and zipf >= 0")

    @property
    def warmup_requests(self) -> int:
        return int(self.requests * self.warmup)

    @property
    def measured_seconds(self) -> float:
        return (self.requests - self.warmup_requests) / self.rps


@dataclass
class SimResult:
    strategy: str
    replicas: int
    cache: int
    zipf: float
    hit_rate: float
    che_hit_rate: float | None  # analytic steady-state LRU hit rate (random, affinity only)
    misses: int  # adapter reads in the measured window
    adapter_reads_per_s: float
    db_bytes_per_s: float
    imbalance: float  # max / mean requests per replica, whole run
    spilled: float  # fraction of requests sent away from their home replica
    meta_lookups_per_s: float  # with the per-replica TTL cache
    meta_hit_rate: float


# --- traffic -----------------------------------------------------------------------------------


def zipf_stream(cfg: SimConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Adapter id of every request (int64), Zipf(s) over ids, and each id's probability."""
    weights = np.arange(1, cfg.adapters + 1, dtype=np.float64) ** -cfg.zipf
    p_rank = weights / weights.sum()
    cdf = np.cumsum(p_rank)
    # Inverse-CDF sampling: one searchsorted over 2M uniforms is ~0.1 s, unlike rng.choice(p=).
    rank = np.searchsorted(cdf, rng.random(cfg.requests), side="right")
    np.minimum(rank, cfg.adapters - 1, out=rank)  # guards the u -> 1.0 rounding edge
    # Shuffle ranks onto ids so "popular" says nothing about where the hash puts an adapter.
    perm = rng.permutation(cfg.adapters)
    p_id = np.empty(cfg.adapters)
    p_id[perm] = p_rank
    return perm[rank].astype(np.int64), p_id


def che_hit_rate(p: np.ndarray, k: int) -> float:
    """Steady-state LRU hit rate for independent requests with probabilities ``p``.

    Che's approximation: the cache's characteristic time T solves sum(1 - exp(-p*T)) = k and
    the hit rate is sum(p * (1 - exp(-p*T))) / sum(p). It is the infinite-run limit, free of
    the simulation's first-touch misses, and is accurate to ~1% for Zipf traffic, so it is
    printed next to the simulated rate as a cross-check.
    """
    p = p[p > 0]
    if k <= 0 or len(p) == 0:
        return 0.0
    if k >= len(p):
        return 1.0
    p = p / p.sum()
    lo, hi = 0.0, float(k)
    while np.sum(-np.expm1(-p * hi)) < k:  # bracket the root
        lo, hi = hi, hi * 2
    for _ in range(80):
        mid = (lo + hi) / 2
        if np.sum(-np.expm1(-p * mid)) < k:
            lo = mid
        else:
            hi = mid
    return float(np.sum(p * -np.expm1(-p * hi)))


def che_fleet(strategy: str, p_id: np.ndarray, cfg: SimConfig) -> float | None:
    """Che estimate for the fleet: every replica sees all of ``p`` (random) or only the
    adapters homed on it (affinity); None where load-dependent routing has no such form."""
    if strategy == "random":
        return che_hit_rate(p_id, cfg.cache)
    if strategy == "affinity":
        home = rendezvous_home(np.arange(cfg.adapters), cfg.replicas)
        total = 0.0
        for rep in range(cfg.replicas):
            p = p_id[home == rep]
            total += p.sum() * che_hit_rate(p, cfg.cache)
        return total
    return None


# --- rendezvous hashing -----------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixed 64-bit hash, vectorised (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def rendezvous_scores(adapter_ids: np.ndarray, replicas: int) -> np.ndarray:
    """``[len(ids), replicas]`` scores; an adapter's preference order is descending score."""
    ids = np.asarray(adapter_ids, dtype=np.uint64)
    salts = _mix64(np.arange(1, replicas + 1, dtype=np.uint64))
    return _mix64((ids[:, None] * _GOLDEN) ^ salts[None, :])


def rendezvous_home(adapter_ids: np.ndarray, replicas: int, chunk: int = 1 << 22) -> np.ndarray:
    """The highest-scoring replica of every id; chunked so memory stays ~32 MB per block."""
    ids = np.asarray(adapter_ids)
    out = np.empty(len(ids), dtype=np.int64)
    step = max(1, chunk // replicas)
    for start in range(0, len(ids), step):
        out[start : start + step] = rendezvous_scores(ids[start : start + step], replicas).argmax(1)
    return out


def rendezvous_order(adapter_id: int, replicas: int) -> list[int]:
    """All replicas in the adapter's preference order (home first)."""
    return rendezvous_orders(np.array([adapter_id]), replicas)[0].tolist()


def rendezvous_orders(adapter_ids: np.ndarray, replicas: int, chunk: int = 1 << 22) -> np.ndarray:
    """``[len(ids), replicas]`` preference orders (home first), as compact ints, chunked."""
    ids = np.asarray(adapter_ids)
    out = np.empty((len(ids), replicas), dtype=np.int16 if replicas < 2**15 else np.int32)
    step = max(1, chunk // replicas)
    for start in range(0, len(ids), step):
        scores = rendezvous_scores(ids[start : start + step], replicas)
        out[start : start + step] = np.argsort(scores, axis=1)[:, ::-1]
    return out


# --- routing -----------------------------------------------------------------------------------


def route(
    strategy: str, reqs: np.ndarray, cfg: SimConfig, rng: np.random.Generator
) -> tuple[np.ndarray, int]:
    """Replica of every request and how many were spilled off their home replica."""
    r = cfg.replicas
    if strategy == "random":
        return rng.integers(0, r, size=len(reqs), dtype=np.int64), 0
    ids, inverse = np.unique(reqs, return_inverse=True)
    if strategy == "affinity":
        return rendezvous_home(ids, r)[inverse], 0
    if strategy == "affinity+spill":
        # Full preference lists of every adapter in the stream, in one vectorised pass (an
        # argsort per spilled adapter inside the loop cost ~4 s at the defaults).
        return _route_bounded(inverse, rendezvous_orders(ids, r), cfg)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def _route_bounded(uidx: np.ndarray, orders: np.ndarray, cfg: SimConfig) -> tuple[np.ndarray, int]:
    """Bounded-load rendezvous routing; sequential because each choice depends on load.

    ``uidx[i]`` indexes request i's adapter in ``orders`` (its preference list, home first).
    """
    r = cfg.replicas
    window = max(1, round(cfg.service_ms / 1000.0 * cfg.rps))  # requests in flight fleet-wide
    cap = max(1, math.ceil(cfg.spill_factor * window / r))
    # Slot r is a sentinel "replica" that pre-fills the sliding window, so the hot loop needs
    # no "is this slot empty" branch; its count is never compared against the cap.
    inflight = [0] * r + [window]
    ring = [r] * window  # replica of each of the last `window` requests
    lists: dict[int, list[int]] = {}  # preference lists as Python lists, for spilled adapters
    out: list[int] = []
    append = out.append
    spilled = 0
    slot = 0
    for a, h in zip(uidx.tolist(), orders[uidx, 0].tolist(), strict=True):
        inflight[ring[slot]] -= 1  # the request `window` arrivals ago has finished
        choice = h
        if inflight[h] >= cap:
            order = lists.get(a)
            if order is None:
                order = lists[a] = orders[a].tolist()
            for cand in order:
                if inflight[cand] < cap:
                    choice = cand
                    break
            else:  # only possible with spill_factor < 1: take the least loaded
                choice = min(range(r), key=inflight.__getitem__)
            spilled += choice != h
        inflight[choice] += 1
        ring[slot] = choice
        append(choice)
        slot += 1
        if slot == window:
            slot = 0
    return np.array(out, dtype=np.int64), spilled


# --- caches ------------------------------------------------------------------------------------


@dataclass
class ReplayCounts:
    hits: int  # adapter LRU hits in the measured window
    measured: int  # requests in the measured window
    meta_lookups: int  # metadata lookups in the measured window (TTL cache)
    misses_total: int  # adapter LRU misses over the whole run (warm-up included)


def _run_replica(
    lru: OrderedDict[int, None],
    meta: dict[int, float],
    adapters: list[int],
    times: list[float],
    k: int,
    ttl: float,
) -> tuple[int, int]:
    """Feed one replica's requests through its LRU and metadata cache: (hits, lookups)."""
    hits = lookups = 0
    move, pop, get = lru.move_to_end, lru.popitem, meta.get
    never = -math.inf  # "fetched at -inf": the first request always looks up, even if ttl=inf
    for a, now in zip(adapters, times, strict=True):
        if a in lru:
            move(a)
            hits += 1
        elif k > 0:
            lru[a] = None
            if len(lru) > k:
                pop(last=False)
        if now - get(a, never) >= ttl:
            meta[a] = now
            lookups += 1
    return hits, lookups


def replay(reqs: np.ndarray, routes: np.ndarray, cfg: SimConfig) -> ReplayCounts:
    """Run every replica's LRU and metadata TTL cache over the routed request stream.

    Replicas share nothing, so each one replays its own subsequence (in arrival order) in a
    tight loop with local bindings: ~2x faster than one interleaved loop over all replicas.
    """
    warm = cfg.warmup_requests
    order = np.argsort(routes, kind="stable")  # stable: arrival order within a replica
    bounds = np.searchsorted(routes[order], np.arange(cfg.replicas + 1))
    hits = lookups = misses_total = 0
    for rep in range(cfg.replicas):
        idx = order[bounds[rep] : bounds[rep + 1]]
        split = int(np.searchsorted(idx, warm))  # idx ascends, so this splits off warm-up
        adapters = reqs[idx].tolist()
        times = (idx / cfg.rps).tolist()
        lru: OrderedDict[int, None] = OrderedDict()
        meta: dict[int, float] = {}
        args = (lru, meta)
        w_hits, _ = _run_replica(*args, adapters[:split], times[:split], cfg.cache, cfg.meta_ttl_s)
        m_hits, m_lookups = _run_replica(
            *args, adapters[split:], times[split:], cfg.cache, cfg.meta_ttl_s
        )
        hits += m_hits
        lookups += m_lookups
        misses_total += len(idx) - w_hits - m_hits
    return ReplayCounts(hits, len(reqs) - warm, lookups, misses_total)


# --- driver ------------------------------------------------------------------------------------


def _rngs(seed: int) -> tuple[np.random.Generator, dict[str, np.random.Generator]]:
    """Independent streams: the traffic never depends on which strategies run."""
    traffic, *per = np.random.SeedSequence(seed).spawn(1 + len(STRATEGIES))
    return np.random.default_rng(traffic), {
        s: np.random.default_rng(ss) for s, ss in zip(STRATEGIES, per, strict=True)
    }


def simulate(cfg: SimConfig, strategies: Sequence[str] = STRATEGIES) -> list[SimResult]:
    traffic_rng, route_rngs = _rngs(cfg.seed)
    reqs, p_id = zipf_stream(cfg, traffic_rng)
    results = []
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        routes, spilled = route(strategy, reqs, cfg, route_rngs[strategy])
        counts = replay(reqs, routes, cfg)
        per_replica = np.bincount(routes, minlength=cfg.replicas)
        misses = counts.measured - counts.hits
        secs = cfg.measured_seconds
        results.append(
            SimResult(
                strategy=strategy,
                replicas=cfg.replicas,
                cache=cfg.cache,
                zipf=cfg.zipf,
                hit_rate=counts.hits / counts.measured,
                che_hit_rate=che_fleet(strategy, p_id, cfg),
                misses=misses,
                adapter_reads_per_s=misses / secs,
                db_bytes_per_s=misses / secs * cfg.adapter_bytes,
                imbalance=float(per_replica.max() / per_replica.mean()),
                spilled=spilled / len(reqs),
                meta_lookups_per_s=counts.meta_lookups / secs,
                meta_hit_rate=1.0 - counts.meta_lookups / counts.measured,
            )
        )
    return results


# --- output ------------------------------------------------------------------------------------

# Columns: simulated hit rate, Che's analytic steady state, adapter reads/s from the database,
# DB egress, max/mean requests per replica, share of requests spilled off their home replica,
# metadata lookups/s with the TTL cache.
_HEADER = (
    f"{'strategy':<14} {'hit':>5} {'(Che)':>5} {'reads/s':>7} {'DB MB/s':>7} "
    f"{'max/mean':>8} {'spilled':>7} {'meta/s':>6}"
)


def _row(res: SimResult) -> str:
    che = "-" if res.che_hit_rate is None else f"{res.che_hit_rate:.3f}"
    return (
        f"{res.strategy:<14} {res.hit_rate:>5.3f} {che:>5} {res.adapter_reads_per_s:>7,.0f} "
        f"{res.db_bytes_per_s / 1e6:>7.1f} {res.imbalance:>8.2f} "
        f"{res.spilled:>7.1%} {res.meta_lookups_per_s:>6,.0f}"
    )


def format_table(cfg: SimConfig, results: Sequence[SimResult]) -> str:
    cache_mb = cfg.cache * cfg.adapter_bytes / 1e6
    lines = [
        f"N={cfg.adapters:,} adapters, R={cfg.replicas} replicas, K={cfg.cache} adapters/replica "
        f"({cache_mb:,.0f} MB at {cfg.adapter_bytes / 1e3:.0f} KB), Zipf s={cfg.zipf}, "
        f"{cfg.rps:,.0f} req/s",
        _HEADER,
        *(_row(r) for r in results),
    ]
    return "\n".join(lines)


def format_sweep(results: Sequence[SimResult]) -> str:
    head = f"{'R':>4} {'K':>5} {'s':>4} " + _HEADER
    rows = [f"{r.replicas:>4} {r.cache:>5} {r.zipf:>4} " + _row(r) for r in results]
    return "\n".join([head, *rows])


def _parse_sweep(text: str) -> list[tuple[int, int, float]]:
    """``"100:1024:1.1,20:256:1.1"`` -> [(100, 1024, 1.1), (20, 256, 1.1)]; "" -> []."""
    points = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        r, k, s = part.split(":")
        points.append((int(r), int(k), float(s)))
    return points


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SimConfig()
    ap.add_argument("--adapters", type=int, default=d.adapters, help="N adapters")
    ap.add_argument("--replicas", type=int, default=d.replicas, help="R API replicas")
    ap.add_argument("--cache", type=int, default=d.cache, help="K adapters per replica LRU")
    ap.add_argument("--zipf", type=float, default=d.zipf, help="Zipf exponent s")
    ap.add_argument("--rps", type=float, default=d.rps, help="fleet-wide requests per second")
    ap.add_argument("--requests", type=int, default=d.requests, help="simulated requests")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--warmup", type=float, default=d.warmup, help="fraction not measured")
    ap.add_argument("--adapter-bytes", type=int, default=d.adapter_bytes)
    ap.add_argument("--meta-ttl", type=float, default=d.meta_ttl_s, help="metadata cache TTL, s")
    ap.add_argument("--service-ms", type=float, default=d.service_ms, help="in-flight time, ms")
    ap.add_argument("--spill-factor", type=float, default=d.spill_factor)
    ap.add_argument(
        "--sweep",
        default=",".join(f"{r}:{k}:{s}" for r, k, s in DEFAULT_SWEEP),
        help='extra R:K:s points, comma-separated ("" for none)',
    )
    ap.add_argument(
        "--sweep-requests",
        type=int,
        default=1_000_000,
        help="requests per sweep point (capped at --requests)",
    )
    ap.add_argument("--quick", action="store_true", help="200k requests, sweep at 100k (<30 s)")
    ap.add_argument("--json", type=Path, default=None, help="write config and results here")
    args = ap.parse_args(argv)

    requests = args.requests
    sweep_requests = min(args.sweep_requests, requests)
    if args.quick:  # a smoke run: caches with K >~ 1000 do not fill at 100k requests
        requests = min(requests, 200_000)
        sweep_requests = min(sweep_requests, 100_000)
    cfg = SimConfig(
        adapters=args.adapters,
        replicas=args.replicas,
        cache=args.cache,
        zipf=args.zipf,
        rps=args.rps,
        requests=requests,
        seed=args.seed,
        warmup=args.warmup,
        adapter_bytes=args.adapter_bytes,
        meta_ttl_s=args.meta_ttl,
        service_ms=args.service_ms,
        spill_factor=args.spill_factor,
    )
    t0 = time.perf_counter()
    main_results = simulate(cfg)
    print(
        f"{cfg.requests:,} requests ({cfg.requests / cfg.rps:,.0f} s simulated, first "
        f"{cfg.warmup:.0%} warm-up), seed {cfg.seed}; spill: in flight {cfg.service_ms:g} ms, "
        f"cap {cfg.spill_factor:g} x mean"
    )
    print(format_table(cfg, main_results))
    print(
        f"hit: simulated after warm-up; (Che): analytic steady-state LRU hit rate; reads/s: "
        f"adapter loads from the DB (miss rate x rps)\nDB MB/s: reads/s x "
        f"{cfg.adapter_bytes / 1e3:.0f} KB; max/mean: requests per replica (load imbalance)\n"
        f"meta/s: metadata lookups/s with a {cfg.meta_ttl_s:g} s TTL per-replica cache; "
        f"without one, {cfg.rps:,.0f}/s (one indexed (tenant_id, name) lookup per request)"
    )

    sweep_cfgs = [
        dataclasses.replace(cfg, replicas=r, cache=k, zipf=s, requests=sweep_requests)
        for r, k, s in _parse_sweep(args.sweep)
    ]
    sweep_groups = [simulate(sc) for sc in sweep_cfgs]
    if sweep_groups:
        n = sweep_cfgs[0].requests
        print(f"\nsweep (N={cfg.adapters:,}, {cfg.rps:,.0f} req/s, {n:,} requests each):")
        print(format_sweep([r for group in sweep_groups for r in group]))
    elapsed = time.perf_counter() - t0
    print(f"\n({elapsed:.1f} s)", file=sys.stderr)

    if args.json is not None:
        payload: dict[str, Any] = {
            "config": dataclasses.asdict(cfg),
            "results": [dataclasses.asdict(r) for r in main_results],
            "sweep": [
                {"config": dataclasses.asdict(sc), "results": [dataclasses.asdict(r) for r in rs]}
                for sc, rs in zip(sweep_cfgs, sweep_groups, strict=True)
            ],
            "elapsed_s": elapsed,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
