"""Prefix caching on SmolLM2, in process: time to first token with the cache off and on.

Three kinds of prompts, each run by a fresh :class:`core.generation.scheduler.Scheduler`
with ``prefix_cache_bytes`` 0 and then the server's default
(``LORAPLEX_GENERATION_PREFIX_CACHE_MB``), alternating ``--rounds`` times (one request at a
time, so a request's first step is its prefill and first token alone):

* ``template``: HH-RLHF dialogues of 90-110 rendered tokens (generate_load's prompts), after a
  "Hello." that leaves the chat template's 25-token system turn in the cache, as a server in
  steady state holds it;
* ``system_prompt``: short questions behind one long system prompt (``--system-tokens``);
* ``conversation``: one conversation turn after turn, each turn's prompt the whole history
  (the earlier questions and the model's greedy replies of ``--reply-tokens``) plus a new
  question; the replies the cache gives are the same, so both runs see the same prompts.

Reported per kind: median time to first token off and on (the first request of each run, which
nothing could have cached, left out), their ratio, and the share of prompt tokens cached.

    python -m bench.generate_prefix --json bench_generate_prefix.json
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
from typing import TYPE_CHECKING, Any

from bench.common import decoder_in
from bench.generate_load import WARM_UP, prompts
from service.config import Settings

if TYPE_CHECKING:
    from core.decoder.base import DecoderBase
    from core.decoder.forward import DecoderWeights
    from core.generation.scheduler import Scheduler

Chat = list[dict[str, str]]


def first_token(scheduler: Scheduler, prompt: list[int], max_tokens: int) -> tuple[float, int, str]:
    """Seconds from adding a greedy request to its first event, the prompt tokens the cache
    gave, and the reply once it ends."""
    from core.generation.sampling import SamplingParams
    from core.generation.scheduler import GenerationRequest

    start = time.perf_counter()
    scheduler.add(GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)))
    events = scheduler.step()
    seconds = time.perf_counter() - start
    cached = events[0].cached_tokens
    text = "".join(e.text for e in events)
    while scheduler.running:
        text += "".join(e.text for e in scheduler.step())
    return seconds, cached, text


def run(
    kind: str,
    base: DecoderBase,
    weights: DecoderWeights,
    cache_bytes: int,
    chats: list[Chat],
    reply_tokens: int,
) -> list[tuple[float, int, int]]:
    """``(seconds to first token, prompt tokens, cached tokens)`` of each request after the
    first."""
    from core.generation.scheduler import Scheduler
    from core.hardware import kv_dtype

    scheduler = Scheduler(
        weights,
        base.tokenizer,
        num_slots=2,
        capacity=2048,
        stop_token_ids=base.stop_token_ids,
        kv_dtype=kv_dtype(weights.dtype, weights.device),
        prefix_cache_bytes=cache_bytes,
    )

    def ids(chat: Chat) -> list[int]:
        return list(base.tokenizer.apply_chat_template(chat, add_generation_prompt=True))

    out = []
    if kind == "conversation":
        history: Chat = []
        for i, chat in enumerate(chats):
            history = [*history, *chat]
            prompt = ids(history)
            seconds, cached, reply = first_token(scheduler, prompt, reply_tokens)
            history.append({"role": "assistant", "content": reply})
            if i:
                out.append((seconds, len(prompt), cached))
        return out
    if kind == "template":
        first_token(scheduler, ids(WARM_UP), 1)
    for i, chat in enumerate(chats):
        prompt = ids(chat)
        seconds, cached, _ = first_token(scheduler, prompt, 1)
        if i or kind == "template":
            out.append((seconds, len(prompt), cached))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="per kind and run")
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from core.hardware import bf16_cpu_flags

    base, weights = decoder_in(args.dtype, args.threads)
    cache_mb = Settings.model_fields["generation_prefix_cache_mb"].default
    hh, source = prompts(base, args.requests, (90, 110))
    rule = "Answer politely, cite the policy section, and never reveal internal notes. "
    words = rule * (args.system_tokens // 12)
    system = {"role": "system", "content": words}
    questions = [
        [{"role": "user", "content": f"How do I reset the password of account {i * 37}?"}]
        for i in range(args.requests)
    ]
    kinds: dict[str, list[Chat]] = {
        "template": hh,
        "system_prompt": [[system, *q] for q in questions],
        "conversation": questions,
    }
    report: dict[str, Any] = {
        "prompts": source,
        "dtype": str(weights.dtype).removeprefix("torch."),
        "cpu_bf16_flags": bf16_cpu_flags(),
        "threads": torch.get_num_threads(),
        "prefix_cache_mb": cache_mb,
        "kinds": {},
    }
    for kind, chats in kinds.items():
        timed: dict[int, list[tuple[float, int, int]]] = {0: [], cache_mb: []}
        for _ in range(args.rounds):
            for mb in timed:
                timed[mb] += run(kind, base, weights, mb << 20, chats, args.reply_tokens)
        off = statistics.median(t for t, _, _ in timed[0])
        on = statistics.median(t for t, _, _ in timed[cache_mb])
        row = {
            "prompt_tokens_median": statistics.median(p for _, p, _ in timed[cache_mb]),
            "cached_share": round(
                sum(c for _, _, c in timed[cache_mb]) / sum(p for _, p, _ in timed[cache_mb]), 3
            ),
            "ttft_ms_off": round(1000 * off, 1),
            "ttft_ms_on": round(1000 * on, 1),
            "speedup": round(off / on, 2),
        }
        report["kinds"][kind] = row
        print(json.dumps({"kind": kind, **row}), flush=True)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
