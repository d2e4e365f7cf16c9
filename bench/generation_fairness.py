"""Generation fairness: what tenant A's heaviest legal generation load does to tenant B's
streaming chat completion, over HTTP on SmolLM2.

Starts ``loraplex serve`` with SmolLM2 only (no embedded worker, temporary SQLite, an admin
key), creates tenants A and B through ``/v1/tenants``, and measures B's time to first streamed
content token (``bench.generate_load.drive``: sequential ``stream: true`` chat completions of
``--b-tokens`` tokens on the bare base, greedy, after one untimed request) in three phases:

1. idle: B alone;
2. ``reserved``: while A keeps every slot it may take busy and its waiting queue full:
   slots + ``LORAPLEX_GENERATION_MAX_WAITING`` clients in a closed loop, each streaming
   ``--a-tokens`` tokens (temperature 1, a prompt asking for a long story) and, refused with
   503, waiting the Retry-After it was given (``bench.noisy_neighbour.Flood``); B measures once
   the server runs A's sequences and holds A's queue full (``/metrics``);
3. ``no_reserve``: the same on a server restarted with ``LORAPLEX_GENERATION_RESERVED_SLOTS=0``:
   A may hold every slot, so each of B's requests waits for one of A's sequences to finish
   (B's own queue and fewest-held-first still put it before A's waiting requests; before
   tenants had queues of their own, it queued behind all of them, or got 503 once A's filled
   the one queue).

Per phase: B's TTFT p50/p99 and their ratios to idle, A's tokens/s (the server's
``loraplex_generation_tokens_total`` over B's measurement, less B's tokens), A's requests
finished and refused with 503 while B measured. The KV cache is sized for about ``--slots``
sequences (default 22, as many as the server's default cache holds in fp32; ``--quick``: 10,
affordable on 2 cores) of ``--a-tokens`` + ``PROMPT_ROOM`` tokens; the slots the server made
are read from ``/metrics`` and printed. The server generates in ``LORAPLEX_GENERATION_DTYPE``
(``--dtype``, default auto: bf16 on an AMX or avx512_bf16 CPU); the report names the dtype
and the CPU's bf16 flags. Clients and server share the machine's
cores: the figures compare phases of one run.

    nice -n 10 python -m bench.generation_fairness --quick --json generation_fairness.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.generate_load import drive
from bench.noisy_neighbour import ADMIN_KEY, Flood, create_tenant
from service.config import DEFAULT_DECODER_NAME, Settings
from tests.e2e.server import ServerProcess

#: Tokens of a sequence's context beyond A's reply: its rendered prompt (A's is ~40 tokens).
PROMPT_ROOM = 64
#: SmolLM2-135M's keys and values take 45 KiB a token in fp32 (service.config), half in bf16.
KIB_PER_TOKEN_FP32 = 45
A_CHAT = [
    {
        "role": "user",
        "content": "Write a very long story, in many chapters, about a lighthouse keeper who "
        "finds a map in a bottle. Describe every place and every person in detail.",
    }
]
B_CHATS = [[{"role": "user", "content": "What is the capital of France?"}]]
FILL_TIMEOUT_S = 300.0


def generation_gauges(client: httpx.Client) -> dict[str, float]:
    """``/metrics``' generation figures for the one decoder base, by name without the
    ``loraplex_generation_`` prefix (counters as ``tokens``, not ``tokens_total``)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name.startswith("loraplex_generation_") and family.samples:
            out[family.name.removeprefix("loraplex_generation_")] = family.samples[0].value
    return out


def wait_full(client: httpx.Client, max_waiting: int) -> dict[str, float]:
    """Once A holds every slot it may take: it runs sequences, has ``max_waiting`` requests
    waiting, and its running sequences stay the same over a second (several decode steps: a
    slot A may take is filled at the next step while A has requests waiting; the first steps
    admit A's requests as they arrive). The seconds that took, A's running sequences and the
    slots left free."""
    start, last = time.monotonic(), None
    while time.monotonic() - start < FILL_TIMEOUT_S:
        g = generation_gauges(client)
        now = (g["running_sequences"], g["free_slots"])
        if g["running_sequences"] and g["waiting_requests"] >= max_waiting:
            if now == last:
                return {
                    "a_fill_s": round(time.monotonic() - start, 1),
                    "a_running": g["running_sequences"],
                    "free_slots": g["free_slots"],
                }
            last = now
        else:
            last = None
        time.sleep(1.0)
    raise RuntimeError(f"A's load never held its slots with {max_waiting} requests waiting")


def b_phase(server: ServerProcess, key: str, args: argparse.Namespace) -> dict[str, Any]:
    """B's sequential streaming requests, with A's token rate over them (from ``/metrics``)."""
    with server.client() as probe:
        before, t0 = generation_gauges(probe)["tokens"], time.monotonic()
        row = asyncio.run(
            drive(server, [DEFAULT_DECODER_NAME], B_CHATS, 1, args.b_requests, args.b_tokens, key)
        )
        elapsed = time.monotonic() - t0
        # B's warm-up request generated one token, its timed ones completion_tokens.
        a_tokens = generation_gauges(probe)["tokens"] - before - row["completion_tokens"] - 1
    return {
        "b_requests": row["requests"],
        "b_errors": row["errors"],
        "ttft_p50_ms": row["ttft_p50_ms"],
        "ttft_p99_ms": row["ttft_p99_ms"],
        "b_itl_p50_ms": row["itl_p50_ms"],
        "seconds": round(elapsed, 1),
        "a_tok_s": round(max(a_tokens, 0) / elapsed, 1),
    }


def flood_phase(
    server: ServerProcess, keys: dict[str, str], slots: int, args: argparse.Namespace
) -> dict[str, Any]:
    """B's figures while A holds every slot it may take and a full waiting queue."""
    body = json.dumps(
        {
            "model": DEFAULT_DECODER_NAME,
            "messages": A_CHAT,
            "max_tokens": args.a_tokens,
            "temperature": 1.0,
            "stream": True,
        }
    ).encode()
    clients = slots + args.max_waiting
    flood = Flood(server.base_url, keys["a"], "/v1/chat/completions", body, clients, True)
    with flood, server.client() as probe:
        full = wait_full(probe, args.max_waiting)
        filled = dict(flood.statuses)
        row = b_phase(server, keys["b"], args)
    # While B measured: what A's clients got (before it, while A's first requests filled the
    # slots and the queue, more of them than the queue holds were refused at once).
    a = {k: v - filled.get(k, 0) for k, v in flood.statuses.items()}
    return {
        **row,
        **full,
        "a_clients": clients,
        "a_finished": a.get("200", 0),
        "a_503": a.get("503", 0),
        "a_statuses_while_b": a,
        "a_statuses_while_filling": filled,
    }


def kv_cache_mb(slots: int, context: int, bf16: bool) -> int:
    """MiB that hold about ``slots`` SmolLM2 sequences of ``context`` tokens."""
    return math.ceil(slots * context * KIB_PER_TOKEN_FP32 / (2 if bf16 else 1) / 1024)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from core.hardware import bf16_cpu_flags, kv_dtype, resolve_dtype

    cpu = torch.device("cpu")
    weights_dtype = resolve_dtype(args.dtype, cpu)
    dtype = str(weights_dtype).removeprefix("torch.")
    context = args.a_tokens + PROMPT_ROOM
    bf16_cache = kv_dtype(weights_dtype, cpu) == torch.bfloat16
    kv_mb = args.kv_cache_mb or kv_cache_mb(args.slots, context, bf16_cache)
    settings: dict[str, Any] = {
        "admin_key": ADMIN_KEY,
        "bases": DEFAULT_DECODER_NAME,
        "embedded_worker": "false",
        "generation_dtype": args.dtype,
        "generation_context_tokens": context,
        "generation_kv_cache_mb": kv_mb,
        "generation_max_waiting": args.max_waiting,
    }
    phases: dict[str, dict[str, Any]] = {}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraplex-gen-fair-") as tmp:
        server = ServerProcess(Path(tmp), settings=settings).start()
        try:
            keys = {t: create_tenant(server, f"bench-{t}") for t in ("a", "b")}
            with server.client() as probe:
                slots = int(generation_gauges(probe)["free_slots"])
            print(f"[gen-fair] {slots} slots, {dtype}", file=sys.stderr, flush=True)
            phases["idle"] = b_phase(server, keys["b"], args)
            print(f"[gen-fair] idle: {phases['idle']}", file=sys.stderr, flush=True)
            phases["reserved"] = flood_phase(server, keys, slots, args)
            print(f"[gen-fair] reserved: {phases['reserved']}", file=sys.stderr, flush=True)
            server.stop()
            server.settings["generation_reserved_slots"] = 0
            server.start()
            phases["no_reserve"] = flood_phase(server, keys, slots, args)
            print(f"[gen-fair] no_reserve: {phases['no_reserve']}", file=sys.stderr, flush=True)
            log = "".join(p.read_text(errors="replace") for p in Path(tmp).glob("server-*.log"))
        finally:
            server.stop()
    idle = phases["idle"]
    for row in phases.values():
        row["ttft_p50_ratio"] = round(row["ttft_p50_ms"] / idle["ttft_p50_ms"], 2)
        row["ttft_p99_ratio"] = round(row["ttft_p99_ms"] / idle["ttft_p99_ms"], 2)
    return {
        "cores": os.cpu_count(),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "dtype": dtype,
        "cpu_bf16_flags": bf16_cpu_flags(),
        "slots": slots,
        "kv_cache_mb": kv_mb,
        "context_tokens": context,
        "max_waiting": args.max_waiting,
        "a_max_tokens": args.a_tokens,
        "b_max_tokens": args.b_tokens,
        "phases": phases,
        "server_errors_logged": log.count("unhandled error on"),
    }


def print_table(f: dict[str, Any]) -> None:
    print(
        f"\nSmolLM2 {f['dtype']} (CPU bf16 flags: {', '.join(f['cpu_bf16_flags']) or 'none'}), "
        f"{f['slots']} slots ({f['kv_cache_mb']} MiB KV cache of {f['context_tokens']}-token "
        f"sequences, cut for the bench), {f['max_waiting']} waiting per tenant; A streams "
        f"{f['a_max_tokens']} tokens a request, B {f['b_max_tokens']}"
    )
    print(
        f"{'phase':<12}{'A free':>7}{'B req':>6}{'TTFT p50':>10}{'p99':>9}{'p50 x':>7}"
        f"{'p99 x':>7}{'A tok/s':>9}{'A 200':>7}{'A 503':>7}"
    )
    for name, r in f["phases"].items():
        free = f"{r['free_slots']:.0f}" if "free_slots" in r else ""
        print(
            f"{name:<12}{free:>7}{r['b_requests']:>6}{r['ttft_p50_ms']:>10}"
            f"{r['ttft_p99_ms']:>9}{r['ttft_p50_ratio']:>7}{r['ttft_p99_ratio']:>7}"
            f"{r['a_tok_s']:>9}{r.get('a_finished', ''):>7}{r.get('a_503', ''):>7}"
        )
    print(
        "A free: slots left free while A held every slot it may take (the reserve); A 200 / "
        "A 503: A's requests finished / refused (503, then Retry-After) while B measured"
    )
    print(
        f"load average {f['loadavg'][0]} -> {f['loadavg'][1]}; server errors logged: "
        f"{f['server_errors_logged']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", type=int, default=22, help="sequence slots, about")
    parser.add_argument("--kv-cache-mb", type=int, help="instead of --slots")
    parser.add_argument("--a-tokens", type=int, default=512, help="max_tokens of A's requests")
    parser.add_argument("--b-tokens", type=int, default=16, help="max_tokens of B's requests")
    parser.add_argument("--b-requests", type=int, default=20, help="B's requests per phase")
    parser.add_argument(
        "--max-waiting",
        type=int,
        default=Settings.model_fields["generation_max_waiting"].default,
        help="LORAPLEX_GENERATION_MAX_WAITING",
    )
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--quick", action="store_true", help="10 slots, A 256 tokens, B 8 requests")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.slots, args.a_tokens, args.b_requests = 10, 256, 8
    figures = run(args)
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
