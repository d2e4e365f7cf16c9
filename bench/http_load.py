"""HTTP load on the real server: batching on vs off vs the in-process bare base model.

Starts ``loraplex serve`` (uvicorn, temporary SQLite, real MiniLM, no embedded worker), stores
N random non-zero LoRA adapters (r=8, query+value) straight into its database, then drives
``/predict`` with single-text requests from C concurrent httpx clients for T seconds, spread
uniformly over the adapters. In the same invocation:

1. batching on (``max_batch_size`` 64, ``max_wait_ms`` 5),
2. batching off (``max_batch_size`` 1),
3. the in-process bare base model at batch 32 (the reference throughput),
plus ``mode=merged`` with a single adapter, and cold loads with 10,000 stored adapters: the
latency of the first request to adapters that are not resident, against warm requests.

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
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import fixture_reviews
from tests.e2e.server import ServerProcess

R = 8
TARGETS = ("query", "value")


def store_random_adapters(data_dir: Path, n: int, prefix: str = "a") -> list[str]:
    """Insert ``n`` random LoRA adapters for the default tenant; returns their names."""
    import torch

    from core.adapter import Adapter
    from core.base import load_base_model
    from core.heads import HeadConfig
    from core.methods.lora import LoraConfig, lora_key
    from service.adapters.store import adapter_row_from
    from service.db.models import ApiKey
    from service.db.session import make_engine, make_sessionmaker
    from service.tenants.keys import hash_api_key

    base = load_base_model(device="cpu")
    key = (data_dir / "default_api_key").read_text().strip()
    engine = make_engine(f"sqlite:///{data_dir / 'loraplex.db'}")
    factory = make_sessionmaker(engine)
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
    engine.dispose()
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


def inprocess_base_seq_per_s(texts: list[str], seconds: float) -> float:
    """The bare base model at batch 32 in this process: the ceiling for any server."""
    import torch

    from core.base import load_base_model

    torch.set_num_threads(os.cpu_count() or 2)
    base = load_base_model(device="cpu")
    batch = base.tokenize(texts[:32], max_length=64)
    with torch.inference_mode():
        base.embed(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            base.embed(batch)
            n += 32
    return n / (time.perf_counter() - start)


def cold_loads(server: ServerProcess, names: list[str], text: str, k: int) -> dict[str, Any]:
    """First request to ``k`` never-used adapters (one at a time), then the same requests warm."""
    cold, warm = [], []
    with server.client() as client:
        for phase in (cold, warm):
            for name in names[:k]:
                t0 = time.perf_counter()
                r = client.post(f"/predict?adapter={name}", json={"inputs": [text]})
                phase.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
    c, w = sorted(x * 1000 for x in cold), sorted(x * 1000 for x in warm)
    p50c, p50w = statistics.median(c), statistics.median(w)
    return {
        "case": "cold_load",
        "n_adapters": len(names),
        "requests": k,
        "cold_p50_ms": round(p50c, 2),
        "cold_p99_ms": round(c[int(0.99 * (len(c) - 1))], 2),
        "warm_p50_ms": round(p50w, 2),
        "load_p50_ms": round(p50c - p50w, 2),  # what the database → ready step adds
    }


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
    try:
        asyncio.run(
            drive(server.base_url, server.api_key, names, texts, args.concurrency, 2.0, mode)
        )
        result = asyncio.run(
            drive(
                server.base_url, server.api_key, names, texts, args.concurrency, args.seconds, mode
            )
        )
    finally:
        server.stop()
    row = {"case": label, "n_adapters": len(names), "concurrency": args.concurrency, **result}
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

    texts = [r["text"] for r in fixture_reviews()]
    base_seq_s = inprocess_base_seq_per_s(texts, 5.0 if args.quick else 15.0)
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
        for row in (batched, single, merged):
            row["ratio_to_inprocess_base"] = round(row["req_per_s"] / base_seq_s, 3)
            row["ratio_to_unbatched"] = round(row["req_per_s"] / single["req_per_s"], 2)
        rows += [batched, single, merged]
        rows.append(
            {"case": "inprocess_base_batch32", "n_adapters": 0, "req_per_s": round(base_seq_s, 1)}
        )
        server = ServerProcess(data_dir, settings={"embedded_worker": False}).start()
        try:
            cold = names[args.adapters :][: args.cold_requests]
            rows.append(cold_loads(server, cold, texts[0], len(cold)))
            rows[-1]["n_adapters"] = len(names)
        finally:
            server.stop()

    print(
        f"\n{'case':<24}{'adapters':>9}{'req/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}"
        f"{'err':>5}{'xbase':>7}{'xunbatched':>11}"
    )
    for r in rows:
        if r["case"] == "cold_load":
            print(
                f"cold_load: {r['requests']} first requests with {r['n_adapters']} stored: "
                f"p50 {r['cold_p50_ms']} ms, p99 {r['cold_p99_ms']} ms (warm p50 "
                f"{r['warm_p50_ms']} ms; load adds {r['load_p50_ms']} ms)"
            )
            continue
        print(
            f"{r['case']:<24}{r['n_adapters']:>9}{r['req_per_s']:>9}{r.get('p50_ms', ''):>8}"
            f"{r.get('p95_ms', ''):>8}{r.get('p99_ms', ''):>8}{r.get('errors', ''):>5}"
            f"{r.get('ratio_to_inprocess_base', ''):>7}{r.get('ratio_to_unbatched', ''):>11}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
