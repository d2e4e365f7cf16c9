"""In-process measurements of merged decode steps and chunked prefill on SmolLM2.

Merged steps (:mod:`core.generation.merged`): one LoRA adapter (r=8, all seven targets,
non-zero B) merged into a copy of the base's linears, against the per-row deltas through the
bank (:class:`core.generation.adapters.BagLoraHooks`) and the bare base. Reported:
``merge_s`` (median time to build the merged copy), ``merged_mb``, and per batch size B
(``--batch``) the median ms of one decode step (and its logits) of B sequences all on that
adapter, over ``--rounds`` alternations of bare / hooked / merged on the same cache.

Chunked prefill (:mod:`core.generation.scheduler`): 4 sequences decode; a prompt of
``--long-tokens`` tokens arrives. With a per-step budget of ``--budget`` tokens (each
given) it is prefilled in chunks between their decode steps; with a budget above its length,
in one pass
(what the scheduler did with every prompt longer than the budget before chunking). Reported:
the longest wall gap between two consecutive tokens of the decoding sequences while the long
prompt is prefilled, and the steps until its first token.

    nice -n 10 python -m bench.generate_merged --json bench_generate_merged.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench.common import peak_rss_mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--budget", type=int, nargs="+", default=[2048, 512])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--skip-chunked", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from core.decoder.base import load_decoder_base
    from core.decoder.forward import NO_HOOKS, logits
    from core.generation.adapters import AdapterSlots
    from core.generation.decode import decode_step
    from core.generation.kv import SlotCache
    from core.generation.merged import MergedLinears
    from core.generation.sampling import SamplingParams
    from core.generation.scheduler import GenerationRequest, Scheduler
    from core.hardware import kv_dtype
    from tests.core.generation.helpers import random_lora

    base = load_decoder_base(device="cpu")
    weights, cfg = base.weights.to(getattr(torch, args.dtype)), base.config
    cache_dtype = kv_dtype(weights.dtype, weights.device)  # as the server's
    g = torch.Generator().manual_seed(0)
    adapter = random_lora(base, "bench", 8, std=0.02)  # every decoder target, non-zero B

    merge_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        merged = MergedLinears(weights, adapter)
        merge_times.append(time.perf_counter() - t0)
    report: dict[str, Any] = {
        "model": base.name,
        "dtype": str(weights.dtype),
        "threads": torch.get_num_threads(),
        "merge_s": round(statistics.median(merge_times), 3),
        "merged_mb": round(merged.num_bytes / 2**20, 1),
        "steps": [],
    }
    print(json.dumps({k: report[k] for k in ("merge_s", "merged_mb")}), flush=True)

    @torch.inference_mode()
    def step_ms(b: int) -> dict[str, float]:
        slots = AdapterSlots(weights, 1)
        rows = torch.tensor([slots.acquire(adapter) for _ in range(b)])
        cache = SlotCache(weights, b, args.prompt_tokens + 2, cache_dtype)
        which = torch.arange(b)
        tokens = torch.randint(100, cfg.vocab_size, (b,), generator=g)
        lengths = torch.full((b,), args.prompt_tokens)
        ways = {"bare": NO_HOOKS, "hooked": None, "merged": merged.hooks()}
        times: dict[str, list[float]] = {w: [] for w in ways}
        for _ in range(args.rounds):
            for way, hooks in ways.items():
                hooks = slots.hooks(rows) if hooks is None else hooks
                t0 = time.perf_counter()
                logits(weights, decode_step(weights, cache, which, tokens, lengths, hooks))
                times[way].append((time.perf_counter() - t0) * 1000)
        return {f"step_ms_{w}": round(statistics.median(t), 2) for w, t in times.items()}

    for b in args.batch:
        row: dict[str, Any] = {"batch": b, **step_ms(b)}
        row["merged_saves_ms"] = round(row["step_ms_hooked"] - row["step_ms_merged"], 2)
        report["steps"].append(row)
        print(json.dumps(row), flush=True)

    def longest_gap(budget: int) -> dict[str, Any]:
        decoding, capacity = 4, args.long_tokens + 64
        sched = Scheduler(
            weights,
            base.tokenizer,
            num_slots=decoding + 1,
            capacity=capacity,
            prefill_tokens_per_step=budget,
            kv_dtype=cache_dtype,
        )
        many = SamplingParams(max_tokens=capacity - args.prompt_tokens, temperature=0.0)
        prompts = torch.randint(100, cfg.vocab_size, (decoding + 1, capacity), generator=g)
        ids = {
            sched.add(GenerationRequest(p[: args.prompt_tokens].tolist(), many))
            for p in prompts[:decoding]
        }
        for _ in range(3):
            sched.step()
        long_id = sched.add(
            GenerationRequest(
                prompts[-1][: args.long_tokens].tolist(),
                SamplingParams(max_tokens=4, temperature=0.0),
            )
        )
        gaps, steps, last = [], 0, time.perf_counter()
        while True:
            events = sched.step()
            now = time.perf_counter()
            steps += 1
            assert sum(1 for e in events if e.request_id in ids and e.token_ids) == decoding
            gaps.append(now - last)
            last = now
            if any(e.request_id == long_id for e in events):
                break
        return {
            "budget": budget,
            "longest_gap_s": round(max(gaps), 2),
            "steps_to_first_token": steps,
            "prefill_s": round(sum(gaps), 2),
        }

    if not args.skip_chunked:
        report["chunked"] = []
        for budget in (args.long_tokens + 1, *args.budget):
            row = longest_gap(budget)
            report["chunked"].append(row)
            print(json.dumps(row), flush=True)
    report["peak_rss_mib"] = round(peak_rss_mib())
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
