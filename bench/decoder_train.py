"""One LoRA chat SFT step on SmolLM2-135M-Instruct: loraplex's trainer vs transformers + PEFT.

In one process, interleaved round by round so drift on a shared machine hits both alike:

* ``ours``: :class:`core.training.decoder.DecoderTrainer` (task ``chat``), ``--steps`` steps a
  round on a fresh trainer, each step timed through ``on_progress`` (collation, chunked
  forwards, the RNG scope, clipping, AdamW and the scheduler included); the loss and logits
  are computed at the assistant tokens only.
* ``peft``: ``LlamaForCausalLM`` loaded by transformers from the same GGUF file, wrapped by
  ``peft.get_peft_model`` with the same LoraConfig, a plain loop: forward with ``labels``
  (-100 off the assistant tokens), backward, clipping, AdamW.

Both train LoRA r=8, alpha 16, dropout 0.05 on all seven linears of every layer, AdamW lr 1e-4,
gradient clipping at 1.0, on the same ``--batch`` chat rows of exactly ``--tokens`` tokens
(rendered once with the model's chat template; the reply is about a third of each row), fp32.
Samples/s from the median step of all rounds after a warm-up step each. ``speedup`` = ours /
peft. Peak RSS is the process's (both models loaded), not a per-variant figure.

``--memory [FORWARD_TOKENS ...]`` instead runs each variant alone in a child process (ours at
each forward budget given, default the trainer's ``DECODER_FORWARD_TOKENS``): the RSS after
loading, the peak RSS (``ru_maxrss``) over a warm-up and a timed step, and that step's seconds.

    python -m bench.decoder_train --quick --json bench_decoder_train.json
    python -m bench.decoder_train --memory 512 2048 8192 --batch 8 --tokens 256
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import peak_rss_mib, rss_mib

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ["the", "a", "river", "stone", "light", "over", "under", "quiet", "bright", "morning"]


def chat_rows(tokenizer: Any, template: str, n: int, tokens: int) -> list[dict[str, Any]]:
    """``n`` rows of at least ``tokens`` tokens once rendered (the user turn grows word by word;
    the reply is a third of the budget): cut to ``max_seq_length=tokens`` from the left of the
    context, every row is exactly ``tokens`` long."""
    from core.decoder.chat import render_chat

    rows = []
    for i in range(n):
        reply = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(tokens // 3))
        words: list[str] = []
        while True:
            messages = [
                {"role": "user", "content": " ".join(words)},
                {"role": "assistant", "content": reply},
            ]
            length = len(render_chat(tokenizer, template, messages, 10**6).input_ids)
            if length >= tokens:
                break
            words.append(WORDS[(i * 7 + len(words)) % len(WORDS)])
        rows.append({"messages": messages})
    return rows


class _Case:
    """The base, the rows, and one step of each variant on them."""

    def __init__(self, batch: int, tokens: int, peft: bool = True) -> None:
        import torch

        from core.decoder.base import load_decoder_base
        from core.decoder.chat import render_chat

        self.batch, self.tokens = batch, tokens
        self.base = load_decoder_base(device="cpu")
        self.rss_after_load_mib = rss_mib()
        template = self.base.chat_template
        assert template is not None
        self.rows = chat_rows(self.base.tokenizer, template, batch, tokens)
        rendered = [
            render_chat(self.base.tokenizer, template, r["messages"], tokens) for r in self.rows
        ]
        self.ids = torch.tensor([r.input_ids for r in rendered])
        self.mask = torch.tensor([r.loss_mask for r in rendered])
        if peft:
            self._setup_peft()

    def _setup_peft(self) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(
            str(self.base.path.parent), gguf_file=self.base.path.name, dtype=torch.float32
        )
        hf.requires_grad_(False)
        self.peft_model = get_peft_model(
            hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS)
        ).train()
        self.trainable = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4, weight_decay=0.01)

    def peft_step(self) -> float:
        """Seconds of one transformers + PEFT step (rows of one length: no padding)."""
        import torch

        labels = torch.where(self.mask.bool(), self.ids, torch.full_like(self.ids, -100))
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.peft_model(input_ids=self.ids, labels=labels).loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        return time.perf_counter() - t0

    def ours_round(self, steps: int) -> list[float]:
        """Seconds of each of ``steps`` steps of a fresh DecoderTrainer, after a warm-up step."""
        from core.training.decoder import DecoderTrainer
        from core.training.trainer import ProgressEvent, TrainerCallbacks

        config = {
            "max_steps": steps + 1,
            "batch_size": self.batch,
            "learning_rate": 1e-4,
            "validation_fraction": 0.0,
            "max_seq_length": self.tokens,
        }
        lora = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS}
        events: list[ProgressEvent] = []
        cb = TrainerCallbacks(on_progress=events.append)
        DecoderTrainer(self.base, lora, {"task": "chat"}, self.rows, None, config, cb).train()
        elapsed = [0.0, *(e.elapsed for e in events)]
        return [b - a for a, b in itertools.pairwise(elapsed)][1:]


def run(batch: int, tokens: int, steps: int, rounds: int) -> dict[str, Any]:
    import torch

    case = _Case(batch, tokens)
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(rounds):
        ours.extend(case.ours_round(steps))
        case.peft_step()  # warm-up, as ours drops its first step
        theirs.extend(case.peft_step() for _ in range(steps))
    ours_s, peft_s = statistics.median(ours), statistics.median(theirs)
    return {
        "threads": torch.get_num_threads(),
        "batch": batch,
        "tokens": tokens,
        "target_tokens": int(case.mask.sum()),
        "steps_timed": {"ours": len(ours), "peft": len(theirs)},
        "ours_step_s": round(ours_s, 3),
        "peft_step_s": round(peft_s, 3),
        "ours_samples_per_s": round(batch / ours_s, 2),
        "peft_samples_per_s": round(batch / peft_s, 2),
        "speedup": round(peft_s / ours_s, 2),
        "peak_rss_mib_process": round(peak_rss_mib(), 1),
    }


def child(variant: str, batch: int, tokens: int, forward_tokens: int | None) -> dict[str, Any]:
    """One variant alone in this process: two steps (the second timed) and the peak RSS."""
    import core.training.decoder as decoder_training

    if forward_tokens is not None:
        decoder_training.DECODER_FORWARD_TOKENS = forward_tokens
    case = _Case(batch, tokens, peft=variant == "peft")
    if variant == "peft":
        case.peft_step()  # warm-up
        timed = [case.peft_step()]
    else:
        timed = case.ours_round(1)
    return {
        "variant": variant,
        "forward_tokens": forward_tokens if variant == "ours" else None,
        "step_s": round(timed[0], 2),
        "rss_after_load_mib": round(case.rss_after_load_mib, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def memory(batch: int, tokens: int, budgets: list[int]) -> list[dict[str, Any]]:
    """Each variant in its own child process, so each peak RSS is that variant's alone."""
    out = []
    cases = [("ours", b) for b in budgets] + [("peft", None)]
    for variant, budget in cases:
        cmd = [sys.executable, "-m", "bench.decoder_train", "--child", variant]
        cmd += ["--batch", str(batch), "--tokens", str(tokens)]
        if budget is not None:
            cmd += ["--forward-tokens", str(budget)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result to this file")
    p.add_argument("--quick", action="store_true", help="batch 4 x 128 tokens, 2 rounds of 2")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    p.add_argument(
        "--memory",
        type=int,
        nargs="*",
        metavar="FORWARD_TOKENS",
        help="instead: peak RSS of one step per variant, each in its own process, ours at "
        "each given forward budget (default: the trainer's)",
    )
    p.add_argument("--child", choices=["ours", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--forward-tokens", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.tokens, args.forward_tokens)))
        return
    if args.quick:
        args.batch, args.tokens, args.steps, args.rounds = 4, 128, 2, 2
    result: Any
    if args.memory is not None:
        from core.training.decoder import DECODER_FORWARD_TOKENS

        result = memory(args.batch, args.tokens, args.memory or [DECODER_FORWARD_TOKENS])
    else:
        result = run(args.batch, args.tokens, args.steps, args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.memory is None:
        print(f"LoRA SFT step: ours / transformers + PEFT = {result['speedup']}x", file=sys.stderr)


if __name__ == "__main__":
    main()
