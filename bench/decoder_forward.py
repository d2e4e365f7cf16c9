"""The decoder base (SmolLM2-135M-Instruct): load cost, parity with transformers, decode speed.

In one process, in this order:

* ``load``: :func:`core.decoder.base.load_decoder_base` on the wheel's GGUF file (dequantised
  to fp32): wall seconds, and the process's resident memory (VmRSS) after it; ``peak_rss_mib``
  is ``ru_maxrss`` at that point (the dequantisation's transient peak included).
* ``parity``: max |logit difference| against transformers' ``LlamaForCausalLM`` on a tiny
  random Llama config (left-padded batch) and on SmolLM2 itself, loaded a second time by
  transformers from the same GGUF file (a chat prompt).
* ``decode``: greedy decoding at batch 1 of the chat prompt "What is the capital of France?",
  ``--new-tokens`` tokens (no end-of-sequence stop on either side), loraplex's KV-cache
  loop vs transformers' ``generate(do_sample=False)``, interleaved ``--rounds`` times;
  tokens/s from the median round, and ``speedup`` = ours / transformers. Whether both chose
  the same tokens is reported.
* ``forward``: one forward pass over a batch of 4 x 128 tokens (logits of every position),
  ours vs transformers, interleaved; ``speedup`` as above.

Timings on a shared machine are noisy: compare the ratios, measured within one run.

    python -m bench.decoder_forward --quick --json bench_decoder_forward.json
"""

from __future__ import annotations

import os

# Spinning OpenMP workers steal the core a shared neighbour needs; set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import peak_rss_mib, rss_mib

QUESTION = "What is the capital of France?"


def _median_s(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _interleaved(
    ours: Callable[[], object], theirs: Callable[[], object], rounds: int
) -> tuple[float, float]:
    """Median seconds of each, alternating one round of each so drift hits both alike."""
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(rounds):
        a.append(_median_s(ours, 1))
        b.append(_median_s(theirs, 1))
    return statistics.median(a), statistics.median(b)


def tiny_parity() -> float:
    import torch
    from transformers import LlamaForCausalLM

    from core.decoder.base import load_decoder_base
    from core.decoder.forward import forward, left_pad, logits, positions_from_mask
    from tests.core.decoder.tiny_llama import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_llama(Path(tmp))
        base = load_decoder_base(folder, device="cpu")
        hf = LlamaForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, base.config.vocab_size, (n,), generator=g).tolist() for n in (40, 9)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        ours = logits(base.weights, forward(base.weights, ids, mask))
        theirs = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    return float((ours[real] - theirs[real]).abs().max())


def run(new_tokens: int, rounds: int, threads: int | None) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    from core.decoder.base import load_decoder_base
    from core.decoder.forward import forward, logits
    from core.decoder.generate import greedy_generate

    t0 = time.perf_counter()
    base = load_decoder_base(device="cpu")
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "load": {
            "seconds": round(load_s, 2),
            "rss_mib_after": round(rss_mib(), 1),
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "params": base.num_params,
            "fp32_weights_mib": round(base.num_params * 4 / 2**20, 1),
        },
    }
    hf = AutoModelForCausalLM.from_pretrained(
        str(base.path.parent), gguf_file=base.path.name, dtype=torch.float32
    ).eval()
    chat = [{"role": "user", "content": QUESTION}]
    prompt = base.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours_logits = logits(base.weights, forward(base.weights, ids))
        hf_logits = hf(ids).logits
    result["parity"] = {
        "tiny_max_abs_diff": tiny_parity(),
        "smollm2_max_abs_diff": float((ours_logits - hf_logits).abs().max()),
        "smollm2_prompt_tokens": len(prompt),
    }

    produced: dict[str, list[int]] = {}

    def decode_ours() -> None:
        produced["ours"] = greedy_generate(base.weights, [prompt], new_tokens)[0]

    # No end-of-sequence token on either side, so both decode exactly ``new_tokens`` tokens
    # (transformers' min_new_tokens would instead forbid the token and change the text).
    hf.generation_config.eos_token_id = None

    def decode_hf() -> None:
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=base.stop_token_ids[0],
            )
        produced["hf"] = out[0, len(prompt) :].tolist()

    ours_s, hf_s = _interleaved(decode_ours, decode_hf, rounds)
    result["decode"] = {
        "batch": 1,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "ours_tokens_per_s": round(new_tokens / ours_s, 1),
        "hf_generate_tokens_per_s": round(new_tokens / hf_s, 1),
        "speedup": round(hf_s / ours_s, 2),
        "same_tokens": produced["ours"] == produced["hf"],
        "reply_start": base.tokenizer.decode(produced["ours"][:12]),
    }

    g = torch.Generator().manual_seed(0)
    batch = torch.randint(3, base.config.vocab_size, (4, 128), generator=g)

    def forward_ours() -> None:
        with torch.no_grad():
            logits(base.weights, forward(base.weights, batch))

    def forward_hf() -> None:
        with torch.no_grad():
            hf(batch)

    ours_s, hf_s = _interleaved(forward_ours, forward_hf, rounds)
    result["forward"] = {
        "batch": 4,
        "tokens": 128,
        "ours_s": round(ours_s, 4),
        "hf_s": round(hf_s, 4),
        "speedup": round(hf_s / ours_s, 2),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result to this file")
    p.add_argument("--quick", action="store_true", help="32 new tokens, 3 rounds")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    args = p.parse_args(argv)
    new_tokens, rounds = (32, 3) if args.quick else (args.new_tokens, args.rounds)
    result = run(new_tokens, rounds, args.threads)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    for part in ("decode", "forward"):
        print(f"{part}: ours / transformers = {result[part]['speedup']}x", file=sys.stderr)


if __name__ == "__main__":
    main()
