"""Decoder quality on real preference pairs: LoRA chat SFT and DPO on SmolLM2-135M-Instruct.

Data: the Anthropic HH-RLHF harmless-base test file, split as :mod:`bench.reward_quality`
splits it (``np.random.RandomState(0).permutation``, 1,850 train / 462 held out of 2,312),
converted by :mod:`bench.hh_convert` (chat rows: ``chosen`` as the SFT target, earlier replies
at weight 0; DPO rows: the shared prompt, the two final replies). The first ``train_pairs`` of
the training part and the first ``test_pairs`` of the held-out part are used (2 shared CPU
cores cannot afford more in a run of minutes); the budget is printed and saved.

Arms, each on the same model, rows, ``max_seq_length``, epochs, batch, learning rate and LoRA
(r 8, alpha 16, dropout 0.05, all seven linears of every layer), no validation split (the
final weights are scored; nothing is selected on the held-out pairs):

* ``base``: the base itself: the held-out loss and token accuracy of the chosen final replies
  (SFT's "before"), and the reference log-probabilities of both replies for DPO.
* ``sft``: :class:`core.training.decoder.DecoderTrainer` task ``chat`` on the chat rows; the
  same held-out loss and token accuracy after.
* ``dpo``: task ``dpo`` from the base (the reference is the base with the adapter off):
  held-out preference accuracy of the implicit reward r = beta * (log pi - log pi_ref) of the
  chosen reply above the rejected one (ties count as wrong) and the mean margin. Goal 0.60.
* ``sft_dpo``: DPO with the ``sft`` adapter as ``reference_adapter`` (policy starts from it),
  scored against that reference. Not cheap here (another DPO run, two more scoring passes):
  it runs only when ``--arms`` names it.
* ``trl``: TRL's ``DPOTrainer`` + PEFT on ``LlamaForCausalLM`` loaded by transformers from the
  same GGUF file, run in a child process whose ``PYTHONPATH`` starts with ``--trl-path`` (TRL
  and ``datasets`` are no dependency of the project). Its policy log-probabilities are computed
  on this bench's own token ids and masks, against the ``base`` arm's reference
  (``reference_max_abs_diff``: transformers' reference on the first pairs against ours).
* ``samples``: greedy replies (``--new-tokens``) to the first 5 held-out prompts from the base
  and each trained adapter.
* ``reward``: a LoRA reward model on the decoder
  (:class:`core.training.decoder_head.DecoderHeadTrainer`, head on the last token) on the
  whole HH dialogues, split at their shared turns as training splits them: held-out pair
  accuracy and mean margin; beside it (``minilm``) bench.reward_quality's default MiniLM case
  on the same rows, epochs and batch.

Each arm reports its train seconds and its peak RSS (``VmHWM``, reset before the arm through
``/proc/self/clear_refs``; the loaded base is in every arm's figure; the ``trl`` child's is
its own process's). ``peak_rss_scope`` says what the peak covers: ``phase`` (that arm), or
``process`` where the reset was refused (the process's peak so far, earlier arms included).

    nice -n 10 python -m bench.decoder_quality --quick --json decoder_quality.json
    pip install --no-deps --target /tmp/trl_site trl==0.24.0 datasets==4.4.1 pyarrow pandas \
        dill==0.4.0 multiprocess==0.70.18 xxhash python-dateutil tzdata pytz
    nice -n 10 python -m bench.decoder_quality --trl-path /tmp/trl_site --json decoder_quality.json
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.common import ROOT, peak_rss_mib, peak_rss_since_reset_mib, reset_peak_rss
from bench.datasets import DEFAULT_HH_RLHF_PATH
from bench.hh_convert import to_chat, to_dpo
from bench.reward_quality import hh_pairs
from core.adapter import Adapter
from core.base import FrozenBase
from core.decoder.base import DecoderBase
from core.decoder.forward import NO_HOOKS, LinearHooks, forward
from core.decoder.generate import greedy_generate
from core.decoder.losses import targets
from core.training.data import eval_batches, forward_chunks
from core.training.decoder import DECODER_FORWARD_TOKENS, DecoderTrainer
from core.training.decoder_data import DecoderData, coerce_decoder_examples, encode_decoder

LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.05}
TRL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ARMS = ("base", "sft", "dpo", "sft_dpo", "trl", "samples", "reward")
# SFT -> DPO costs another DPO run and two more scoring passes: asked for by name only.
DEFAULT_ARMS = tuple(a for a in ARMS if a != "sft_dpo")
EVAL_BATCH = 8
N_SAMPLES = 5
Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class Budget:
    train_pairs: int
    test_pairs: int
    max_seq_length: int
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 5e-4
    beta: float = 0.1
    warmup_ratio: float = 0.1
    seed: int = 0

    def training(self) -> dict[str, Any]:
        """The TrainingConfig every arm of ours trains with (TRL's arm gets the same)."""
        return {
            "n_epochs": self.epochs,
            "batch_size": self.batch_size,
            "learning_rate": self.learning_rate,
            "warmup_ratio": self.warmup_ratio,
            "lr_scheduler": "linear",
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "max_seq_length": self.max_seq_length,
            "validation_fraction": 0.0,
            "beta": self.beta,
            "seed": self.seed,
        }


# Sized on 2 cores shared with five other jobs (load average 7-8), where at 128 tokens a LoRA
# SFT row took 2.7 s, a DPO pair 5.4 s (ours and TRL's alike) and scoring a held-out pair 2 s:
# the full run took 28 minutes there (with --arms reward another 9), --quick 7. Batch 4 gives
# DPO 16 steps.
FULL = Budget(train_pairs=64, test_pairs=64, max_seq_length=128, batch_size=4)
QUICK = Budget(train_pairs=8, test_pairs=8, max_seq_length=128, batch_size=4)
REFERENCE_CHECK_PAIRS = 4  # held-out pairs whose reference transformers also scores


# --- scoring ----------------------------------------------------------------------------------


@dataclass
class Scores:
    """Per held-out row and sequence (``[n, 1]`` chat, ``[n, 2]`` chosen/rejected pairs)."""

    logp: Tensor  # summed log-probability of the reply's tokens
    tokens: Tensor  # how many reply tokens
    correct: Tensor  # how many of them the greedy prediction gets right


def score(base: DecoderBase, data: DecoderData, hooks: LinearHooks = NO_HOOKS) -> Scores:
    """Every row's reply log-probability, target count and greedy hits under ``hooks``."""
    n_seq = len(data.rows[0])
    logp, tokens, correct = (torch.zeros(len(data), n_seq) for _ in range(3))
    w = base.weights
    with torch.inference_mode():
        for batch in eval_batches(data.lengths, EVAL_BATCH):
            for part in forward_chunks(data, batch, DECODER_FORWARD_TOKENS):
                ids, attention, mask = data.collate(part, base.device)
                t = targets(w, forward(w, ids, attention, hooks=hooks), ids, mask)
                token_lp = -F.cross_entropy(t.logits.float(), t.tokens, reduction="none")
                hits = (t.logits.argmax(-1) == t.tokens).float()
                rows = ids.shape[0]
                for out, values in ((logp, token_lp), (correct, hits)):
                    per_row = torch.zeros(rows).index_add(0, t.rows.cpu(), values.cpu())
                    out[part] = per_row.view(n_seq, len(part)).T
                counts = torch.zeros(rows).index_add(0, t.rows.cpu(), torch.ones(len(t.rows)))
                tokens[part] = counts.view(n_seq, len(part)).T
    return Scores(logp, tokens, correct)


def sft_metrics(s: Scores) -> dict[str, float]:
    """Token-mean loss and accuracy of the chosen replies (column 0), as the trainer's."""
    n = float(s.tokens[:, 0].sum())
    return {
        "loss": round(-float(s.logp[:, 0].sum()) / n, 4),
        "token_accuracy": round(float(s.correct[:, 0].sum()) / n, 4),
        "target_tokens": int(n),
    }


def dpo_metrics(policy: Tensor, reference: Tensor, beta: float) -> dict[str, float]:
    """Preference accuracy and mean margin of the implicit reward over ``[n, 2]`` log-probs."""
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {
        "preference_accuracy": round(float((margin > 0).float().mean()), 4),
        "mean_margin": round(float(margin.mean()), 4),
        "reward_chosen": round(float(rewards[:, 0].mean()), 4),
        "reward_rejected": round(float(rewards[:, 1].mean()), 4),
        "test_pairs": len(margin),
    }


# --- the arms ---------------------------------------------------------------------------------


@dataclass
class Split:
    """The HH rows of a run, converted, and the held-out rows encoded for scoring."""

    train_hh: list[dict[str, str]]
    test_hh: list[dict[str, str]]
    test_pairs: DecoderData = dataclasses.field(init=False)
    test_chat: DecoderData = dataclasses.field(init=False)

    def encode(self, base: DecoderBase, max_length: int) -> None:
        tok, template = base.tokenizer, base.chat_template
        dpo = coerce_decoder_examples([to_dpo(r) for r in self.test_hh], "dpo", "test")
        chat = coerce_decoder_examples([to_chat(r) for r in self.test_hh], "chat", "test")
        self.test_pairs = encode_decoder(dpo, tok, template, max_length, "test")
        self.test_chat = encode_decoder(chat, tok, template, max_length, "test")


def _timed(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """``fn()`` and its seconds and peak RSS (the peak reset first where Linux allows; where
    not, the process's peak, and ``peak_rss_scope`` says so)."""
    was_reset = reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    seconds = round(time.perf_counter() - t0, 3)  # a tiny model's run is well under 0.1 s
    peak, scope = peak_rss_since_reset_mib(was_reset)
    return out, {"train_s": seconds, "peak_rss_mib": round(peak, 1), "peak_rss_scope": scope}


def train_adapter(
    base: DecoderBase,
    task: str,
    rows: Rows,
    budget: Budget,
    reference: Adapter | None = None,
) -> tuple[Adapter, dict[str, Any]]:
    """A LoRA adapter trained on ``rows`` with the budget's settings, and its run's figures."""
    trainer = DecoderTrainer(
        base, LORA, {"task": task}, rows, None, budget.training(), reference_adapter=reference
    )
    result, figures = _timed(trainer.train)
    trainer.close()
    return result.adapter, {**figures, "steps": result.steps, "train_rows": len(rows)}


def run_arms(
    base: DecoderBase,
    split: Split,
    budget: Budget,
    arms: Sequence[str],
    trl_path: Path | None = None,
    new_tokens: int = 60,
    log: Callable[[dict[str, Any]], None] = lambda row: None,
    encoder: FrozenBase | None = None,
) -> list[dict[str, Any]]:
    """Every requested arm's row (``base`` runs with any arm it is the reference of)."""
    split.encode(base, min(budget.max_seq_length, base.max_length))
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        log(row)

    if {"base", "sft", "dpo", "sft_dpo", "trl"} & set(arms):
        ref, figures = _timed(lambda: score(base, split.test_pairs))
        emit({"arm": "base", **sft_metrics(ref), **dpo_metrics(ref.logp, ref.logp, budget.beta),
              "score_s": figures["train_s"], "peak_rss_mib": figures["peak_rss_mib"],
              "peak_rss_scope": figures["peak_rss_scope"]})  # fmt: skip
    adapters: dict[str, Adapter] = {}
    chat_rows = [to_chat(r) for r in split.train_hh]
    dpo_rows = [to_dpo(r) for r in split.train_hh]
    if "sft" in arms or "sft_dpo" in arms:
        adapters["sft"], figures = train_adapter(base, "chat", chat_rows, budget)
        sft = adapters["sft"].load_method(base).hooks()
        after = score(base, split.test_chat, sft)
        emit({"arm": "sft", **sft_metrics(after), **figures})
    if "dpo" in arms:
        adapters["dpo"], figures = train_adapter(base, "dpo", dpo_rows, budget)
        policy = score(base, split.test_pairs, adapters["dpo"].load_method(base).hooks())
        emit({"arm": "dpo", **dpo_metrics(policy.logp, ref.logp, budget.beta), **figures})
    if "sft_dpo" in arms:
        adapters["sft_dpo"], figures = train_adapter(
            base, "dpo", dpo_rows, budget, reference=adapters["sft"]
        )
        sft_ref = score(base, split.test_pairs, adapters["sft"].load_method(base).hooks())
        policy = score(base, split.test_pairs, adapters["sft_dpo"].load_method(base).hooks())
        emit({"arm": "sft_dpo", **dpo_metrics(policy.logp, sft_ref.logp, budget.beta),
              **figures})  # fmt: skip
    if "trl" in arms:
        emit(trl_arm(base, split, dpo_rows, ref.logp, budget, trl_path))
    if "samples" in arms:
        emit(samples(base, split.test_hh[:N_SAMPLES], adapters, budget, new_tokens))
    if "reward" in arms:
        emit(reward_arm(base, split, budget, encoder))
    return rows


def samples(
    base: DecoderBase,
    test_hh: Rows,
    adapters: Mapping[str, Adapter],
    budget: Budget,
    new_tokens: int,
) -> dict[str, Any]:
    """Greedy replies to held-out prompts (their last ``max_seq_length`` tokens) per model."""
    prompts, ids = [], []
    for r in test_hh:
        messages = to_dpo(r)["input"]["messages"]
        rendered = base.tokenizer.apply_chat_template(
            messages, chat_template=base.chat_template, add_generation_prompt=True, tokenize=True
        )
        prompts.append(messages[-1]["content"])
        ids.append(list(rendered)[-budget.max_seq_length :])
    out: dict[str, Any] = {"arm": "samples", "prompts": prompts}
    models: dict[str, LinearHooks] = {"base": NO_HOOKS}
    models.update({name: a.load_method(base).hooks() for name, a in adapters.items()})
    for name, hooks in models.items():
        replies = greedy_generate(base.weights, ids, new_tokens, base.stop_token_ids, hooks=hooks)
        out[name] = [base.tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    return out


def reward_arm(
    base: DecoderBase, split: Split, budget: Budget, encoder: FrozenBase | None = None
) -> dict[str, Any]:
    """A LoRA reward model on the decoder (its head on the last token) and MiniLM's default
    reward case (bench.reward_quality) on the same HH rows and epochs/batch: held-out pair
    accuracy (ties wrong) and mean margin of each."""
    from core.decoder.scoring import score_decoder_pairs
    from core.pair_encoding import split_shared_prefix
    from core.training.decoder_head import DecoderHeadTrainer

    cfg = {k: v for k, v in budget.training().items() if k != "beta"}
    trainer = DecoderHeadTrainer(base, LORA, {"task": "reward"}, split.train_hh, None, cfg)
    result, figures = _timed(trainer.train)
    model = result.adapter.build_decoder_head(base)
    # Whole dialogues split at their shared turns, as training split them.
    triples = [
        split_shared_prefix(r["chosen"], r["rejected"]) or (None, r["chosen"], r["rejected"])
        for r in split.test_hh
    ]
    prompts = [t[0] for t in triples]
    chosen = score_decoder_pairs(model, prompts, [t[1] for t in triples])
    rejected = score_decoder_pairs(model, prompts, [t[2] for t in triples])
    row: dict[str, Any] = {
        "arm": "reward",
        "pair_accuracy": round(float((chosen > rejected).float().mean()), 4),
        "mean_margin": round(float((chosen - rejected).mean()), 4),
        "test_pairs": len(triples),
        **figures,
        "steps": result.steps,
        "train_rows": len(split.train_hh),
    }
    row["minilm"] = _minilm_reward(split, budget, encoder)
    return row


def _minilm_reward(split: Split, budget: Budget, encoder: FrozenBase | None) -> dict[str, Any]:
    """bench.reward_quality's default case (MiniLM unless ``encoder``, LoRA, 128 tokens) on
    the same rows."""
    from bench.reward_quality import BY_NAME, run_case
    from core.base import load_base_model

    training = {"n_epochs": budget.epochs, "batch_size": budget.batch_size,
                "validation_fraction": 0.0, "seed": budget.seed}  # fmt: skip
    encoder = encoder or load_base_model(device="cpu")
    out = run_case(encoder, BY_NAME["default"], split.train_hh, split.test_hh, training)
    keep = ("accuracy", "mean_margin", "train_s", "steps", "test_pairs", "max_seq_length")
    return {k: out[k] for k in keep if k in out}


# --- TRL's DPOTrainer + PEFT, in a child process ----------------------------------------------


def trl_arm(
    base: DecoderBase,
    split: Split,
    dpo_rows: Rows,
    reference: Tensor,
    budget: Budget,
    trl_path: Path | None,
) -> dict[str, Any]:
    """TRL's DPO on the same rows and budget, scored on our ids against our reference."""
    test = [
        [list(s.input_ids) for s in seqs] + [list(s.loss_mask) for s in seqs]
        for seqs in split.test_pairs.rows
    ]
    job = {"gguf": str(base.path), "train": list(dpo_rows), "test": test,
           "budget": dataclasses.asdict(budget)}  # fmt: skip
    env = dict(os.environ)
    if trl_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(trl_path), str(ROOT)])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        cmd = [sys.executable, "-m", "bench.decoder_quality", "--trl-child", tmp]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        result = Path(tmp) / "result.json"
        if proc.returncode != 0 or not result.is_file():
            why = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or ["no output"]
            return {"arm": "trl", "skipped": f"TRL's run failed: {why[0]}"}
        out = json.loads(result.read_text())
    if "skipped" in out:
        return {"arm": "trl", **out}
    policy = torch.tensor(out.pop("logp"))
    hf_ref = torch.tensor(out.pop("reference_logp"))
    out["reference_max_abs_diff"] = float((hf_ref - reference[: len(hf_ref)]).abs().max())
    return {"arm": "trl", **dpo_metrics(policy, reference, budget.beta), **out}


def _trl_child(folder: Path) -> None:
    """Train with TRL in this process and write ``result.json`` (or why it could not)."""
    result = folder / "result.json"
    try:
        import trl
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer
    except ImportError as e:
        why = f"TRL does not import here ({e}); pass --trl-path to a folder it is installed in"
        result.write_text(json.dumps({"skipped": why}))
        return
    job = json.loads((folder / "job.json").read_text())
    b = Budget(**job["budget"])
    gguf = Path(job["gguf"])
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    )
    data = Dataset.from_list(
        [
            {
                "prompt": r["input"]["messages"],
                "chosen": r["preferred_output"],
                "rejected": r["non_preferred_output"],
            }
            for r in job["train"]
        ]
    )
    args = DPOConfig(
        output_dir=str(folder / "out"),
        per_device_train_batch_size=b.batch_size,
        num_train_epochs=b.epochs,
        learning_rate=b.learning_rate,
        lr_scheduler_type="linear",
        warmup_ratio=b.warmup_ratio,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=b.beta,
        # Like ours: the sequence cut from its start (the prompt's), the reply kept.
        max_length=b.max_seq_length,
        max_prompt_length=None,
        truncation_mode="keep_end",
        seed=b.seed,
        # fp32 as ours: TRL's default bf16=True would train under autocast, and accelerate
        # leaves the model's forward wrapped in it afterwards (its reference moved by 0.9 nats).
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TRL_TARGETS, task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=model, args=args, train_dataset=data, processing_class=tok, peft_config=lora
    )
    t0 = time.perf_counter()
    state = trainer.train()
    train_s = time.perf_counter() - t0
    peft_model = trainer.model
    peft_model.eval()
    logp = _hf_logprobs(peft_model, job["test"])
    with peft_model.disable_adapter():
        reference = _hf_logprobs(peft_model, job["test"][:REFERENCE_CHECK_PAIRS])
    last = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    out = {
        "logp": logp,
        "reference_logp": reference,
        "train_s": round(train_s, 1),
        "peak_rss_mib": round(peak_rss_mib()),
        "steps": state.global_step,
        "train_rows": len(job["train"]),
        "trl_version": trl.__version__,
        "last_step_train_rewards_accuracies": last[-1]["rewards/accuracies"] if last else None,
    }
    result.write_text(json.dumps(out))


def _hf_logprobs(model: Any, test: list[list[list[int]]]) -> list[list[float]]:
    """``[n, 2]`` summed reply log-probabilities of (ids_c, ids_r, mask_c, mask_r) rows, one
    sequence at a time (no padding, so positions need no care)."""
    out = []
    with torch.inference_mode():
        for ids_c, ids_r, mask_c, mask_r in test:
            pair = []
            for ids, mask in ((ids_c, mask_c), (ids_r, mask_r)):
                x = torch.tensor([ids])
                lp = model(input_ids=x).logits[0, :-1].float().log_softmax(-1)
                picked = lp.gather(-1, x[0, 1:, None])[:, 0]
                pair.append(float((picked * torch.tensor(mask[1:])).sum()))
            out.append(pair)
    return out


# --- driver -----------------------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """The bf16 flags of this CPU as ``lscpu`` lists them."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return []
    return sorted({f for f in ("avx512_bf16", "amx_bf16") if f in text.split()})


def _line(r: Mapping[str, Any]) -> str:
    if "skipped" in r:
        return f"{r['arm']:8} skipped: {r['skipped']}"
    if r["arm"] == "samples":
        return f"{r['arm']:8} " + json.dumps({k: v for k, v in r.items() if k != "arm"}, indent=1)
    parts = [f"{r['arm']:8}"]
    for key in ("loss", "token_accuracy", "preference_accuracy", "pair_accuracy", "mean_margin"):
        if key in r:
            parts.append(f"{key} {r[key]:.4f}")
    keys = ("steps", "train_s", "score_s", "peak_rss_mib", "peak_rss_scope")
    for key in (*keys, "reference_max_abs_diff", "minilm"):
        if key in r:
            parts.append(f"{key} {r[key]}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"smoke budget: {QUICK}")
    p.add_argument("--json", type=Path, help="write the budget and the arms' rows here")
    p.add_argument("--hh", type=Path, default=DEFAULT_HH_RLHF_PATH, help="the HH-RLHF file")
    p.add_argument(
        "--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated subset of {ARMS}"
    )
    p.add_argument("--trl-path", type=Path, help="a folder TRL and datasets are installed in")
    p.add_argument("--train-pairs", type=int, help="override the budget's training pairs")
    p.add_argument("--test-pairs", type=int, help="override the budget's held-out pairs")
    p.add_argument("--max-seq-length", type=int, help="override the budget's token window")
    p.add_argument("--new-tokens", type=int, help="greedy tokens per sample (60; --quick 20)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--trl-child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.trl_child:
        _trl_child(args.trl_child)
        return
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        p.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    budget = QUICK if args.quick else FULL
    overrides = {"train_pairs": args.train_pairs, "test_pairs": args.test_pairs,
                 "max_seq_length": args.max_seq_length}  # fmt: skip
    budget = dataclasses.replace(budget, **{k: v for k, v in overrides.items() if v})
    pairs = hh_pairs(args.hh, quick=False)
    if pairs is None:
        raise SystemExit(f"[decoder_quality] {args.hh} absent: nothing to measure")
    train, test = pairs
    split = Split(train[: budget.train_pairs], test[: budget.test_pairs])
    from core.decoder.base import load_decoder_base

    base = load_decoder_base(device="cpu")
    head = {"model": base.name, "budget": dataclasses.asdict(budget), "lora": LORA,
            "split": f"RandomState(0) 80/20 of {len(train) + len(test)}: first "
                     f"{len(split.train_hh)} of {len(train)} train, first "
                     f"{len(split.test_hh)} of {len(test)} held out",
            "threads": args.threads, "cpu_flags": cpu_flags()}  # fmt: skip
    print(json.dumps(head), flush=True)
    new_tokens = args.new_tokens or (20 if args.quick else 60)
    head["new_tokens"] = new_tokens
    rows = run_arms(
        base, split, budget, arms, args.trl_path, new_tokens,
        log=lambda row: print(_line(row), flush=True),
    )  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({**head, "arms": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
