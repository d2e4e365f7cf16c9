"""HTTP load on the real server: batching on vs off vs the in-process bare base model.

Starts ``loraplex serve`` (uvicorn, temporary SQLite, real MiniLM, no embedded worker), stores
N random non-zero LoRA adapters (r=8, query+value) straight into its database, then drives
``/predict`` with single-text requests from C concurrent httpx clients for T seconds, spread
uniformly over the adapters. In the same invocation:

1. batching on (``max_batch_size`` 64, ``max_wait_ms`` 5),
2. batching off (``max_batch_size`` 1),
3. the in-process bare base model at batch 32 (the reference throughput: tokenize + encode
   32 texts of the same pool on all cores), laid out two ways: one forward at a time on every
   core's torch thread (``ratio_to_inprocess_base``), and the server's layout, one forward
   per core side by side (``ratio_to_inprocess_best`` divides by the faster of the two); and
   the same at batch 1 (best batch-32 / best batch-1 is the most batching can gain on this
   machine, before any HTTP cost),
plus ``mode=merged`` with a single adapter, batching on in bfloat16 (against a bfloat16
reference), and cold loads with 10,000 stored adapters: the latency of the first request to
adapters that are not resident, each paired with a warm request. Each load row also reports
the server's CPU time per request and the cores this load generator used: client and server
share the machine, so what httpx burns is not available to the server.

    python -m bench.http_load --quick --json bench_http.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.common import fixture_reviews
from service.serving.lifespan import MAX_DEFAULT_WORKERS
from tests.e2e.server import ServerProcess

if TYPE_CHECKING:
    from core.base import FrozenBase

R = 8
TARGETS = ("query", "value")


def store_random_adapters(
    data_dir: Path, n: int, prefix: str = "a", api_key: str | None = None
) -> list[str]:
    """Insert ``n`` random LoRA adapters for ``api_key``'s tenant (default: the default
    tenant's key file); returns their names."""
    import torch

    from core.adapter import Adapter
    from core.base import load_base_model
    from core.heads import HeadConfig
    from core.methods.lora import LoraConfig
    from core.methods.lora.model import lora_key
    from service.adapters.store import adapter_row_from
    from service.db.models import ApiKey
    from service.db.session import make_db_engine, make_sessionmaker
    from service.tenants.keys import hash_api_key

    base = load_base_model(device="cpu")
    key = api_key or (data_dir / "default_api_key").read_text().strip()
    db_engine = make_db_engine(f"sqlite:///{data_dir / 'loraplex.db'}")
    factory = make_sessionmaker(db_engine)
    cfg = LoraConfig(r=R, alpha=16, target_modules=list(TARGETS))
    head = HeadConfig(task="classification", label_names=["fresh", "rotten"])
    gen = torch.Generator().manual_seed(0)
    h = base.hidden_size
    names = []
    with factory() as session:
        tenant_id = session.query(ApiKey).filter_by(key_hash=hash_api_key(key)).one().tenant_id
        for i in range(n):
            state = {}
            for layer in range(base.num_layers):
                for t in TARGETS:
                    state[lora_key(layer, t, "A")] = torch.randn(R, h, generator=gen) * 0.05
                    state[lora_key(layer, t, "B")] = torch.randn(h, R, generator=gen) * 0.05
            adapter = Adapter(
                method=cfg,
                head=head,
                method_state=state,
                head_state={
                    "out.weight": torch.randn(2, h, generator=gen) * 0.1,
                    "out.bias": torch.zeros(2),
                },
                base_name=base.name,
                base_fingerprint=base.fingerprint,
                trainable_params=sum(v.numel() for v in state.values()),
            )
            row = adapter_row_from(adapter, base, name=f"{prefix}{i}")
            row.tenant_id, row.version = tenant_id, i + 1
            session.add(row)
            names.append(row.name)
            if (i + 1) % 250 == 0:
                session.commit()
                print(f"[http_load] stored {i + 1}/{n} adapters", file=sys.stderr, flush=True)
        session.commit()
    db_engine.dispose()
    return names


async def drive(
    url: str,
    key: str,
    names: list[str],
    texts: list[str],
    concurrency: int,
    seconds: float,
    mode: str = "auto",
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30, limits=limits
    ) as client:

        async def one_client(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                name = rng.choice(names)
                body = {"inputs": [rng.choice(texts)]}
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"/predict?adapter={name}&mode={mode}", json=body)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        start = time.monotonic()
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        elapsed = time.monotonic() - start
    return summarize(latencies, errors, elapsed)


def summarize(latencies: list[float], errors: int, elapsed: float) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1) if ms else float("nan")

    return {
        "requests": len(ms),
        "req_per_s": round(len(ms) / elapsed, 1),
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "errors": errors,
    }


def inprocess_base_seq_per_s(
    base: FrozenBase,
    texts: list[str],
    seconds: float,
    dtype: str = "float32",
    batch: int = 32,
    workers: int = 1,
) -> float:
    """The bare base model in this process: at batch 32, the ceiling for any server.

    Each forward tokenizes ``batch`` texts drawn from the load's pool and runs the encoder, the
    work any server does per batch (the load's texts, the server's truncation), in the server's
    dtype, on all cores: ``workers`` threads side by side, each with its share of torch
    threads. At batch 1 it is what batching can be compared against without HTTP.
    """
    import torch

    from core.inference.engine import serving_base

    cores = os.cpu_count() or 2
    base = serving_base(base, torch.device("cpu"), getattr(torch, dtype))
    counts: list[int] = [0] * workers
    warm = threading.Barrier(workers + 1)  # the clock starts once every thread is warm
    stop = threading.Event()

    def worker(i: int) -> None:
        torch.set_num_threads(max(1, cores // workers))
        rng = random.Random(i)
        with torch.inference_mode():
            for _ in range(3):
                base.embed(base.tokenize(rng.sample(texts, batch)))
            warm.wait()
            while not stop.is_set():
                base.embed(base.tokenize(rng.sample(texts, batch)))
                counts[i] += batch

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    warm.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def cold_loads(server: ServerProcess, names: list[str], text: str, k: int) -> dict[str, Any]:
    """The first request to each of ``k`` never-used adapters, each paired with a request to a
    resident one right after it: the median of the pairs' differences is what loading from
    the database adds, and pairing keeps machine noise from drifting into it."""
    warm_name, cold_names = names[0], names[1 : k + 1]
    cold, warm = [], []
    with server.client() as client:

        def timed(name: str) -> float:
            t0 = time.perf_counter()
            r = client.post(f"/predict?adapter={name}", json={"inputs": [text]})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t0

        for _ in range(3):
            timed(warm_name)  # resident from here on
        for name in cold_names:
            cold.append(timed(name) * 1000)
            warm.append(timed(warm_name) * 1000)
    diffs = sorted(c - w for c, w in zip(cold, warm, strict=True))
    c = sorted(cold)
    return {
        "case": "cold_load",
        "n_adapters": len(names),
        "requests": len(cold),
        "cold_p50_ms": round(statistics.median(c), 2),
        "cold_p99_ms": round(c[int(0.99 * (len(c) - 1))], 2),
        "warm_p50_ms": round(statistics.median(warm), 2),
        "load_p50_ms": round(statistics.median(diffs), 2),  # what database → ready adds
        "load_p99_ms": round(diffs[int(0.99 * (len(diffs) - 1))], 2),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_config(
    data_dir: Path,
    settings: dict[str, Any],
    names: list[str],
    texts: list[str],
    args: Any,
    mode: str = "auto",
    label: str = "",
) -> dict[str, Any]:
    server = ServerProcess(data_dir, settings={"embedded_worker": False, **settings})
    server.start()
    assert server.proc is not None
    try:
        asyncio.run(
            drive(server.base_url, server.api_key, names, texts, args.concurrency, 2.0, mode)
        )
        server_cpu, own_cpu, start = cpu_seconds(server.proc.pid), os.times(), time.monotonic()
        result = asyncio.run(
            drive(
                server.base_url, server.api_key, names, texts, args.concurrency, args.seconds, mode
            )
        )
        wall = time.monotonic() - start
        server_cpu = cpu_seconds(server.proc.pid) - server_cpu
        client_cpu = sum(os.times()[:2]) - sum(own_cpu[:2])
    finally:
        server.stop()
    row = {
        "case": label,
        "n_adapters": len(names),
        "concurrency": args.concurrency,
        **result,
        # Where the two cores went: the server's CPU per request (model included) and the
        # share of the machine this load generator took from it.
        "server_cpu_ms_per_req": round(server_cpu / max(result["requests"], 1) * 1000, 2),
        "loadgen_cpu_cores": round(client_cpu / wall, 2),
    }
    print(f"[http_load] {label}: {row}", file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--cold-adapters", type=int, default=10_000, help="stored for the cold rows")
    ap.add_argument("--cold-requests", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="short runs, 1,000 stored adapters")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.cold_adapters, args.cold_requests = 8.0, 1_000, 100

    from core.base import load_base_model

    texts = [r["text"] for r in fixture_reviews()]
    base = load_base_model(device="cpu")  # one copy for every in-process reference
    ref_s = 3.0 if args.quick else 10.0
    # Each reference in both layouts: one forward on all cores, and the server's default
    # pool (one forward per core side by side); the faster one is the bar.
    layouts = {"": 1, "_pool": min(os.cpu_count() or 2, MAX_DEFAULT_WORKERS)}
    refs: dict[str, float] = {}
    for dtype, batch in (("float32", 32), ("bfloat16", 32), ("float32", 1)):
        for suffix, workers in layouts.items():
            name = f"inprocess_base_batch{batch}{'_bf16' if dtype != 'float32' else ''}{suffix}"
            refs[name] = inprocess_base_seq_per_s(base, texts, ref_s, dtype, batch, workers)
    best: dict[str, float] = {}
    for name, seq_s in refs.items():
        key = name.removesuffix("_pool")
        best[key] = max(best.get(key, 0.0), seq_s)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="loraplex-http-") as tmp:
        data_dir = Path(tmp)
        boot = ServerProcess(data_dir, settings={"embedded_worker": False}).start()
        boot.stop()  # migrations + default tenant + key file
        names = store_random_adapters(data_dir, max(args.adapters, args.cold_adapters))
        hot = names[: args.adapters]
        batched = run_config(data_dir, {}, hot, texts, args, label="batching_on")
        single = run_config(data_dir, {"max_batch_size": 1}, hot, texts, args, label="batching_off")
        merged = run_config(data_dir, {}, hot[:1], texts, args, mode="merged", label="merged_1")
        # The same server in bfloat16 (LORAPLEX_SERVE_DTYPE), against a bfloat16 reference.
        bf16 = run_config(
            data_dir, {"serve_dtype": "bfloat16"}, hot, texts, args, label="batching_on_bf16"
        )
        for row, ref in (
            (batched, "inprocess_base_batch32"),
            (single, "inprocess_base_batch32"),
            (merged, "inprocess_base_batch32"),
            (bf16, "inprocess_base_batch32_bf16"),
        ):
            row["ratio_to_inprocess_base"] = round(row["req_per_s"] / refs[ref], 3)
            row["ratio_to_inprocess_best"] = round(row["req_per_s"] / best[ref], 3)
            if row is not bf16:
                row["ratio_to_unbatched"] = round(row["req_per_s"] / single["req_per_s"], 2)
        rows += [batched, single, merged, bf16]
        for label, seq_s in refs.items():
            rows.append({"case": label, "n_adapters": 0, "req_per_s": round(seq_s, 1)})
        # Batching's own ceiling on this machine: how much faster batch 32 runs than batch 1.
        rows[-1]["batching_ceiling"] = round(
            best["inprocess_base_batch32"] / best["inprocess_base_batch1"], 2
        )
        server = ServerProcess(data_dir, settings={"embedded_worker": False}).start()
        try:
            cold = names[args.adapters :][: args.cold_requests + 1]
            rows.append(cold_loads(server, cold, texts[0], args.cold_requests))
            rows[-1]["n_adapters"] = len(names)
        finally:
            server.stop()

    print(
        f"\n{'case':<34}{'adapters':>9}{'req/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'err':>5}{'xbase':>7}{'xbest':>7}{'xunbatched':>11}{'srv ms/req':>11}{'loadgen':>8}"
    )
    for r in rows:
        if r["case"] == "cold_load":
            print(
                f"cold_load: {r['requests']} first requests with {r['n_adapters']} stored: "
                f"p50 {r['cold_p50_ms']} ms, p99 {r['cold_p99_ms']} ms (warm p50 "
                f"{r['warm_p50_ms']} ms; loading adds p50 {r['load_p50_ms']} ms, "
                f"p99 {r['load_p99_ms']} ms)"
            )
            continue
        print(
            f"{r['case']:<34}{r['n_adapters']:>9}{r['req_per_s']:>9}{r.get('p50_ms', ''):>8}"
            f"{r.get('p95_ms', ''):>8}{r.get('p99_ms', ''):>8}{r.get('errors', ''):>5}"
            f"{r.get('ratio_to_inprocess_base', ''):>7}{r.get('ratio_to_inprocess_best', ''):>7}"
            f"{r.get('ratio_to_unbatched', ''):>11}"
            f"{r.get('server_cpu_ms_per_req', ''):>11}{r.get('loadgen_cpu_cores', ''):>8}"
        )
        if "batching_ceiling" in r:
            print(f"in-process batch 32 / batch 1 (best layouts): {r['batching_ceiling']}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
