"""In-process generation throughput on SmolLM2: the bare decode loop vs the scheduler.

For each batch size B (``--batch``), B prompts of ``--prompt-tokens`` tokens each generate
``--new-tokens`` tokens greedily (no end-of-sequence stop), three ways, one after another:

* ``bare_loop``: :func:`core.decoder.generate.greedy_generate`, the whole batch at once (one
  batched prefill, then one decode step per token): the limit the scheduler is measured by,
  run on the run's threads and on one, the faster counting (the scheduler runs small passes
  on one thread where that is faster, :func:`core.hardware.one_thread_below`);
* ``sched_bare``: :class:`core.generation.scheduler.Scheduler`, all B requests on the base;
* ``sched_mixed``: the scheduler with request i on adapter ``i % N`` of N (``--adapters``)
  random LoRA adapters (r=8, every linear target or ``--targets``, non-zero B): mixed adapters
  in every step.

Reported per B: output tokens/s (B x new tokens / wall seconds, prefill included) and
``ratio_to_bare_decode`` = sched_mixed / bare_loop. Timings on a shared machine are noisy, so
the decode step itself is also timed in isolation: ``--rounds`` alternating pairs of one decode
step of the B sequences on the bare base and one with their mixed adapters (same cache, same
lengths), medians ``step_ms_bare`` / ``step_ms_mixed`` and ``step_ratio`` = bare / mixed (the
throughput ratio of the decode loop, which load drifting over the run does not bias). A third
step in each round, ``step_ms_churn``, has one sequence's adapter replaced by one that was not
running (where N > B), as when one request ends and another starts under staggered traffic:
what a change of the running set costs (hooks included in every timing).

What the side path can cost at the least: ``pairs_mb``, the running adapters' LoRA pairs a
mixed step reads (each site's gathered tables, :class:`core.generation.gathered.SiteGroup`), and
``step_ms_read_pairs``, the median time one thread takes just to read them once, site after
site in the step's order (``torch.sum`` of each table: the kernel that streams memory fastest,
one call per table, as any side path makes one per site at least). ``step_ratio_ceiling`` =
bare / (bare + that): the step ratio of a side path that did no arithmetic, on one thread
after the base's matmuls (as the hooks run, ``SIDE_PATH_THREADS``).

``--dtype`` is the ``generation_dtype`` setting's (auto: bfloat16 on a CPU with AMX or
avx512_bf16), the KV cache's dtype the server's; the report names both and the CPU's bf16
flags.

    nice -n 10 python -m bench.generate_engine --json bench_generate_engine.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import decoder_in, peak_rss_mib, reference_threads
from core.targets import DECODER_TARGET_MODULES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=DECODER_TARGET_MODULES,
        help="the random adapters' LoRA targets (default every linear)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import statistics

    import torch

    from core.decoder.forward import NO_HOOKS, logits
    from core.decoder.generate import greedy_generate
    from core.generation.adapters import SIDE_PATH_THREADS, AdapterSlots, BagLoraHooks
    from core.generation.decode import decode_step
    from core.generation.kv import SlotCache
    from core.generation.sampling import SamplingParams
    from core.generation.scheduler import GenerationRequest, Scheduler
    from core.hardware import bf16_cpu_flags, kv_dtype, torch_threads
    from tests.core.generation.helpers import random_lora

    base, weights = decoder_in(args.dtype, args.threads)
    cache_dtype = kv_dtype(weights.dtype, weights.device)  # as the server's
    cfg = base.config
    g = torch.Generator().manual_seed(0)
    targets = tuple(args.targets or DECODER_TARGET_MODULES)
    # Non-zero B, one seed each.
    adapters = [
        random_lora(base, f"bench-{k}", 8, targets, seed=k, std=0.02) for k in range(args.adapters)
    ]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0)

    def prompts(b: int) -> list[list[int]]:
        return torch.randint(100, cfg.vocab_size, (b, args.prompt_tokens), generator=g).tolist()

    def scheduled(rows: list[list[int]], mixed: bool) -> float:
        sched = Scheduler(
            weights,
            base.tokenizer,
            num_slots=len(rows),
            capacity=args.prompt_tokens + args.new_tokens,
            max_adapters=max(args.adapters, 1),
            kv_dtype=cache_dtype,
        )
        t0 = time.perf_counter()
        for i, row in enumerate(rows):
            adapter = adapters[i % args.adapters] if mixed else None
            sched.add(GenerationRequest(row, params, adapter))
        tokens = 0
        while sched.running or sched.waiting:
            tokens += sum(len(e.token_ids) for e in sched.step())
        wall = time.perf_counter() - t0
        assert tokens == len(rows) * args.new_tokens
        return tokens / wall

    @torch.inference_mode()
    def step_ms(b: int) -> dict[str, float]:
        """Median ms of one decode step of b sequences: bare base, mixed adapters (the running
        set of the step before), mixed with one adapter that starts running."""
        slots = AdapterSlots(weights, max(args.adapters, 1))
        bank = [slots.acquire(a) for a in adapters]
        # Round robin, as requests arrive: the scheduler keeps a step's rows in KV slot order.
        rows = [bank[i % args.adapters] for i in range(b)]
        cache = SlotCache(weights, b, args.prompt_tokens + 2, cache_dtype)
        which = torch.arange(b)
        tokens = torch.randint(100, cfg.vocab_size, (b,), generator=g)
        lengths = torch.full((b,), args.prompt_tokens)
        times: dict[str, list[float]] = {"bare": [], "mixed": [], "churn": [], "read": []}
        running = slots.hooks(torch.tensor(rows))
        assert isinstance(running, BagLoraHooks)
        tables = [
            t
            for group in running.pairs.values()
            for t in (group.a, *(bt for _, _, bt in group.parts.values()))
        ]
        for r in range(args.rounds):
            for case, samples in times.items():
                if case == "churn":  # row r's request ends, the next adapter's starts
                    rows[r % b] = bank[(b + r) % args.adapters]
                t0 = time.perf_counter()
                if case == "read":
                    with torch_threads(SIDE_PATH_THREADS):
                        for table in tables:
                            table.sum()
                    samples.append((time.perf_counter() - t0) * 1000)
                    continue
                hooks = slots.hooks(torch.tensor(rows)) if case != "bare" else NO_HOOKS
                logits(weights, decode_step(weights, cache, which, tokens, lengths, hooks))
                samples.append((time.perf_counter() - t0) * 1000)
        result = {case: statistics.median(samples) for case, samples in times.items()}
        result["pairs_mb"] = sum(t.numel() * t.element_size() for t in tables) / 1e6
        return result

    results: list[dict[str, Any]] = []
    for b in args.batch:
        rows = prompts(b)
        bare = 0.0
        for threads in reference_threads():
            with torch_threads(threads):
                t0 = time.perf_counter()
                greedy_generate(weights, rows, args.new_tokens)
                bare = max(bare, b * args.new_tokens / (time.perf_counter() - t0))
        sched_bare = scheduled(rows, mixed=False)
        mixed = scheduled(rows, mixed=True)
        ms = step_ms(b)
        row = {
            "batch": b,
            "bare_loop_tok_s": round(bare, 1),
            "sched_bare_tok_s": round(sched_bare, 1),
            "sched_mixed_tok_s": round(mixed, 1),
            "ratio_to_bare_decode": round(mixed / bare, 3),
            "step_ms_bare": round(ms["bare"], 1),
            "step_ms_mixed": round(ms["mixed"], 1),
            "step_ms_churn": round(ms["churn"], 1),
            "step_ratio": round(ms["bare"] / ms["mixed"], 3),
            "step_ratio_churn": round(ms["bare"] / ms["churn"], 3),
            "pairs_mb": round(ms["pairs_mb"], 1),
            "step_ms_read_pairs": round(ms["read"], 1),
            "step_ratio_ceiling": round(ms["bare"] / (ms["bare"] + ms["read"]), 3),
        }
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "model": base.name,
        "dtype": str(weights.dtype).removeprefix("torch."),
        "kv_dtype": str(cache_dtype).removeprefix("torch."),
        "cpu_bf16_flags": bf16_cpu_flags(),
        "adapters": args.adapters,
        "lora_targets": list(targets),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": round(peak_rss_mib()),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
