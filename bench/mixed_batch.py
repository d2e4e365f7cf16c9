"""Mixed-adapter batches: loraplex's bank vs the bare base vs PEFT's ``adapter_names``.

Batch: 32 rows x 64 real tokens of Rotten Tomatoes reviews (the fixture in tests/fixtures),
LoRA r=8 on query+value with random non-zero weights, N = 1, 4, 64, 1024 distinct adapters with
rows spread uniformly (row i of batch b uses adapter (32*b + i) mod N, so consecutive batches
touch different adapters). Every timed call is a full ``engine.run`` (tokenize, forward, heads,
Python results); the base case is the same call with ``key=None`` rows. Base and adapter runs
are interleaved so a neighbour stealing a core hits both: ``seq_per_s`` is the median call,
``ratio_to_base`` the median of per-repetition ratios. PEFT is timed against Hugging Face's own
``BertModel`` (its base) the same way; its N is capped (``--peft-max``) because ``add_adapter``
slows down as adapters accumulate (0.5 s per call at 256 resident, so 1024 takes many minutes).

    python -m bench.mixed_batch --quick --json bench_mixed.json

Also measures the bare base with OMP_WAIT_POLICY unset vs PASSIVE and 1 vs 2 threads, each in a
fresh process (OpenMP reads the policy once, at start-up).
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
if not os.environ.get("_LORAPLEX_OMP_DEFAULT"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.adapter import Adapter
from core.base import FrozenBase, load_base_model
from core.heads import HeadConfig
from core.inference import InferenceEngine, MixedLoraHooks, Row
from core.methods.lora import LoraConfig
from core.methods.lora.model import lora_key

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "rotten_tomatoes_small.jsonl"
BATCH = 32
TOKENS = 64
TARGETS = ["query", "value"]


# --- inputs -------------------------------------------------------------------------------


def bench_texts(base: FrozenBase, n: int = BATCH, tokens: int = TOKENS) -> list[str]:
    """``n`` texts of exactly ``tokens`` tokens ([CLS] and [SEP] included) of real reviews."""
    reviews = [json.loads(line)["text"] for line in FIXTURE.read_text().splitlines() if line]
    tok = base.tokenizer
    out: list[str] = []
    i = 0
    while len(out) < n:
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tok(reviews[i % len(reviews)], add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            i += 1
        text = tok.decode(ids[: tokens - 2])  # type: ignore[attr-defined]
        if len(tok(text)["input_ids"]) == tokens:  # type: ignore[operator]
            out.append(text)
    return out


def lora_adapter(base: FrozenBase, r: int, seed: int) -> Adapter:
    """A random non-zero LoRA (both A and B drawn) with a 2-label head."""
    g = torch.Generator().manual_seed(seed)
    cfg = LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS)
    h = base.hidden_size
    state: dict[str, torch.Tensor] = {}
    for layer in range(base.num_layers):
        for t in TARGETS:
            state[lora_key(layer, t, "A")] = torch.randn(r, h, generator=g) * 0.05
            state[lora_key(layer, t, "B")] = torch.randn(h, r, generator=g) * 0.05
    head = HeadConfig(task="classification", label_names=["rotten", "fresh"])
    head_state = {"out.weight": torch.randn(2, h, generator=g) * 0.02, "out.bias": torch.zeros(2)}
    return Adapter(cfg, head, state, head_state, base.name, base.fingerprint)


def row_keys(n_adapters: int, batch_no: int) -> list[int]:
    return [(BATCH * batch_no + i) % n_adapters for i in range(BATCH)]


# --- timing -------------------------------------------------------------------------------


def interleaved(
    fns: dict[str, Callable[[int], Any]], reps: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved; ``fn(i)`` gets the repetition.

    Wall time under ``name``, this process's CPU time under ``name + "_cpu"``: CPU time barely
    moves when a neighbour steals a core, so it shows the work an adapter adds even when wall
    times are noisy (with OMP_WAIT_POLICY=PASSIVE idle workers do not burn CPU time).
    """
    times: dict[str, list[float]] = {k: [] for name in fns for k in (name, name + "_cpu")}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn(i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
                times[name + "_cpu"].append(time.process_time() - c)
    return times


def best_ratio(base: list[float], other: list[float]) -> float:
    """``min(t_base) / min(t_other)``: a neighbour only ever adds time, so the fastest call of
    each is the closest to the intrinsic cost (reported next to the median-based ratio)."""
    return round(min(base) / min(other), 3)


def paired_ratio(base: list[float], other: list[float]) -> float:
    """Median of per-repetition ``t_base / t_other``: neighbours stealing a core for a few
    seconds slow both calls of a pair, so the ratio is steadier than a ratio of medians."""
    return round(statistics.median(b / o for b, o in zip(base, other, strict=True)), 3)


def sps(seconds: float | list[float]) -> float:
    """Sequences per second of the median call."""
    if isinstance(seconds, list):
        seconds = statistics.median(seconds)
    return round(BATCH / seconds, 2)


def against_base(t: dict[str, list[float]]) -> dict[str, float]:
    """The result fields of one interleaved ``{"base", "mixed"}`` timing."""
    return {
        "seq_per_s": sps(t["mixed"]),
        "ratio_to_base": paired_ratio(t["base"], t["mixed"]),
        "cpu_ratio_to_base": paired_ratio(t["base_cpu"], t["mixed_cpu"]),
        "best_ratio_to_base": best_ratio(t["base"], t["mixed"]),
        "base_seq_per_s": sps(t["base"]),
    }


def lora_hooks_cpu(engine: InferenceEngine, n: int, reps: int) -> float:
    """Median CPU seconds of the bank hooks alone on every site for one batch (32 x 64).

    Component timing: the hooks' share of a base run's CPU time estimates the adapter overhead
    without the scatter that neighbours on shared cores put into end-to-end ratios.
    """
    slots = torch.tensor([engine.slot_of(k) for k in row_keys(n, 0)], device=engine.device)
    h = engine.base.hidden_size
    x = torch.randn(BATCH, TOKENS, h, device=engine.device, dtype=engine.dtype)
    y = {
        s: torch.zeros(BATCH, TOKENS, engine.base.config.linear_shape(s[1])[1], dtype=engine.dtype)
        for s in engine.bank.sites
    }
    times = []
    with torch.inference_mode():
        for i in range(reps + 1):
            c = time.process_time()
            hooks = MixedLoraHooks(engine.bank, slots)
            for (layer, target), out in y.items():
                hooks.linear(layer, target, x, out)
            if i:
                times.append(time.process_time() - c)
    return statistics.median(times)


# --- loraplex -----------------------------------------------------------------------------


def bench_loraplex(
    base: FrozenBase, texts: list[str], ns: list[int], reps: int, warmup: int, dtype: torch.dtype
) -> tuple[list[dict[str, Any]], list[str]]:
    rows_out: list[dict[str, Any]] = []
    notes: list[str] = []
    engine = InferenceEngine(base, dtype=dtype, max_resident_bytes=4 << 30)
    loaded = 0
    base_rows = [Row(None, t) for t in texts]
    base_times: list[float] = []

    def base_run(_: int) -> None:
        engine.run(base_rows)

    for n in sorted(ns):
        t0 = time.perf_counter()
        for k in range(loaded, n):
            engine.load(k, lora_adapter(base, 8, seed=k))
        load_s = time.perf_counter() - t0
        if n > loaded:
            notes.append(f"loaded {n - loaded} adapters in {load_s:.1f}s")
        loaded = max(loaded, n)

        def mixed_run(i: int, n: int = n) -> None:
            keys = row_keys(n, i)
            res = engine.run([Row(k, t) for k, t in zip(keys, texts, strict=True)])
            assert all(r.ok for r in res)

        t = interleaved({"base": base_run, "mixed": mixed_run}, reps, warmup)
        base_times += t["base"]
        share = lora_hooks_cpu(engine, n, 10) / statistics.median(t["base_cpu"])
        rows_out.append(
            {
                "case": "loraplex",
                "n_adapters": n,
                "lora_hooks_cpu_share": round(share, 4),
                **against_base(t),
            }
        )
        if n == 1024 or n == max(ns):
            st = engine.stats
            rows_out.append(
                {
                    "case": "bank_memory",
                    "n_adapters": st.resident_count,
                    "bank_bytes": st.bank_bytes,
                    "bank_mib": round(st.bank_bytes / 2**20, 1),
                    "bank_capacity": st.bank_capacity,
                    "dtype": str(dtype).removeprefix("torch."),
                }
            )
    rows_out.insert(
        0,
        {
            "case": "base",
            "n_adapters": 0,
            "seq_per_s": sps(base_times),
            "ratio_to_base": 1.0,
        },
    )

    # Mixed ranks: 64 adapters of r = 4, 8, 16 in one bank (padded to r=16 per site).
    mixed = InferenceEngine(base, dtype=dtype)
    for k in range(64):
        mixed.load(k, lora_adapter(base, (4, 8, 16)[k % 3], seed=k))

    def ranks_run(i: int) -> None:
        mixed.run([Row(k, t) for k, t in zip(row_keys(64, i), texts, strict=True)])

    t = interleaved({"base": base_run, "mixed": ranks_run}, reps, warmup)
    share = lora_hooks_cpu(mixed, 64, 10) / statistics.median(t["base_cpu"])
    rows_out.append(
        {
            "case": "loraplex",
            "n_adapters": 64,
            "ranks": "4/8/16",
            "lora_hooks_cpu_share": round(share, 4),
            **against_base(t),
            "bank_mib": round(mixed.stats.bank_bytes / 2**20, 1),
        }
    )
    return rows_out, notes


# --- PEFT ---------------------------------------------------------------------------------


def bench_peft(
    base: FrozenBase, texts: list[str], ns: list[int], reps: int, warmup: int
) -> tuple[list[dict[str, Any]], list[str]]:
    import peft
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler weights warning
    # The base case is a separate plain BertModel: PEFT's ``disable_adapter()`` walks every
    # LoRA module on entry and exit, a cost that grows with N and would flatter PEFT.
    hf_plain = BertModel.from_pretrained(str(base.path), add_pooling_layer=False).eval()
    hf = BertModel.from_pretrained(str(base.path), add_pooling_layer=False).eval()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)

    def encode(model: Any, **kw: Any) -> None:
        batch = base.tokenize(texts)
        hidden = model(**batch, **kw).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        (hidden * m).sum(1) / m.sum(1)

    rows_out: list[dict[str, Any]] = []
    notes: list[str] = []
    model = peft.get_peft_model(hf, cfg, adapter_name="a0")
    loaded = 0
    for n in sorted(ns):
        t0 = time.perf_counter()
        for k in range(loaded, n):
            if k:
                model.add_adapter(f"a{k}", cfg)
            a = lora_adapter(base, 8, seed=k)
            state = {"base_model.model." + name: v for name, v in a.method_state.items()}
            peft.set_peft_model_state_dict(model, state, adapter_name=f"a{k}")
        if n > loaded:
            notes.append(f"PEFT: add_adapter x{n - loaded} took {time.perf_counter() - t0:.1f}s")
        loaded = max(loaded, n)
        model.eval()

        def hf_base(_: int) -> None:
            encode(hf_plain)

        def peft_run(i: int, n: int = n) -> None:
            encode(model, adapter_names=[f"a{k}" for k in row_keys(n, i)])

        with torch.inference_mode():
            t = interleaved({"base": hf_base, "peft": peft_run}, reps, warmup)
        rows_out.append(
            {
                "case": "peft",
                "n_adapters": n,
                "seq_per_s": sps(t["peft"]),
                "ratio_to_base": paired_ratio(t["base"], t["peft"]),
                "cpu_ratio_to_base": paired_ratio(t["base_cpu"], t["peft_cpu"]),
                "best_ratio_to_base": best_ratio(t["base"], t["peft"]),
                "base": "hf_bert_model",
                "base_seq_per_s": sps(t["base"]),
            }
        )
    return rows_out, notes


# --- OpenMP wait policy x threads ---------------------------------------------------------


def base_probe(reps: int) -> dict[int, float]:
    """Median seconds per bare-base ``engine.run`` with 1 and 2 torch threads, this process's
    OpenMP wait policy (the thread count can change at run time; the policy cannot)."""
    base = load_base_model(device="cpu")
    texts = bench_texts(base)
    engine = InferenceEngine(base, device="cpu")
    rows = [Row(None, t) for t in texts]
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out[threads] = statistics.median(
            interleaved({"base": lambda _: engine.run(rows)}, reps, 1)["base"]
        )
    return out


def bench_threads(reps: int) -> list[dict[str, Any]]:
    """Bare base with OMP_WAIT_POLICY unset vs PASSIVE (a fresh process each) x 1 vs 2 threads."""
    out = []
    for policy in ("default", "PASSIVE"):
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if policy == "default":
            env["_LORAPLEX_OMP_DEFAULT"] = "1"
        else:
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, "-m", "bench.mixed_batch", "--probe", "--reps", str(reps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        seconds = json.loads(proc.stdout.strip().splitlines()[-1])
        for threads, s in seconds.items():
            out.append(
                {
                    "case": "base_threads",
                    "omp_wait_policy": policy,
                    "threads": int(threads),
                    "seq_per_s": sps(s),
                }
            )
    best = max(out, key=lambda r: r["seq_per_s"])
    for r in out:
        r["fastest"] = r is best
    return out


# --- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result rows to this file")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (< 2 min on 2 cores)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--reps", type=int, help="timed repetitions per case")
    p.add_argument("--n", type=int, nargs="+", default=[1, 4, 64, 1024], help="adapter counts")
    p.add_argument("--peft-max", type=int, help="largest N run through PEFT")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--no-threads", action="store_true", help="skip the OMP/threads probe")
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 15)
    warmup = 1 if args.quick else 3
    if args.probe:
        print(json.dumps(base_probe(reps)))
        return
    peft_max = args.peft_max or (64 if args.quick else 256)
    dtype = getattr(torch, args.dtype)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, dtype {args.dtype}",
        flush=True,
    )

    base = load_base_model(device="cpu")
    texts = bench_texts(base)
    assert base.tokenize(texts)["input_ids"].shape == (BATCH, TOKENS)
    results, notes = bench_loraplex(base, texts, args.n, reps, warmup, dtype)
    if not args.no_peft:
        # Quick: only N=64, the comparison point (PEFT's add_adapter is the slow part).
        ns = [64] if args.quick and not args.peft_max else [n for n in args.n if n <= peft_max]
        skipped = [n for n in args.n if n > peft_max]
        if skipped and not args.quick:
            ns = sorted({*ns, peft_max})  # the largest N PEFT loads in reasonable time
        if skipped:
            notes.append(f"PEFT capped at N={peft_max} (skipped {skipped}): add_adapter time")
        peft_rows, peft_notes = bench_peft(base, texts, ns, reps, warmup)
        results += peft_rows
        notes += peft_notes
    if not args.no_threads:
        results += bench_threads(2 if args.quick else 8)

    for r in results:
        print(json.dumps(r))
    for note in notes:
        print("#", note)
    if args.json:
        meta = {"threads": torch.get_num_threads(), "dtype": args.dtype, "quick": args.quick}
        args.json.write_text(json.dumps({"meta": meta, "rows": results, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
