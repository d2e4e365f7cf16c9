"""HTTP generation load on the real server: /v1/chat/completions over many LoRA adapters.

Starts ``loraplex serve`` (uvicorn, temporary SQLite, SmolLM2 only, no embedded worker),
stores N random non-zero chat LoRA adapters (r=8, every linear or ``--targets``) straight into
its database (N=0: requests go to the bare base),
then for each concurrency C and adapter count N runs C streaming clients, each sending its
share of ``--requests`` requests one after another, after an untimed request per adapter has
made it resident (prompts of 20-200 tokens, or ``--prompt-tokens MIN MAX``: HH-RLHF
harmless-base dialogues when ``../shared`` has them, Rotten Tomatoes reviews otherwise; greedy,
``--new-tokens`` new tokens at most; adapters round robin). Per configuration:
aggregate output tokens/s (usage's completion tokens over the wall time), time to first token
and inter-token latency p50/p99 (between content chunks), errors. Then, in this process with
the server stopped, the references over the same prompts:

(a) transformers ``generate`` on the bare base, one request at a time, in float32 and, where
    ``auto`` picks bfloat16 (CUDA, a CPU with AMX or avx512_bf16), in bfloat16 too, each on the
    run's threads and, where those are several, on one (bf16 on 2 AMX cores ran faster on one):
    the fastest is the denominator;
(b) transformers + PEFT ``generate`` with the N adapters loaded, ``set_adapter`` per request
    (in (a)'s fastest dtype and threads);
(c) loraplex's scheduler in this process on the bare base, in the server's dtype, for each
    configuration on its own prompts and driven like the server: C clients sharing the same
    requests, each client's next added when its last ends: the engine without HTTP or
    streaming (the limit).

Each configuration sends prompts no earlier one sent: a server that had seen a prompt and its
reply would find them in its prefix cache (``--prefix-cache-mb``, the server's default), as
(c), on a fresh scheduler, could not. So configurations differ in their prompts, and in how
long the replies run, and (c) is run on each one's own.

``--dtype`` is the server's ``generation_dtype`` (auto: bfloat16 on a CPU with AMX or
avx512_bf16); the report names the dtype it resolved to and the CPU's bf16 flags.
``--threads`` sets the torch threads of the server's generation and of the references alike.

``ratio_to_bare_decode`` = server tokens/s / (c) on the same prompts at the same C;
``ratio_to_hf_sequential`` = server tokens/s / the faster (a). Client and server share the
machine: the clients' CPU is not the server's.

    nice -n 10 python -m bench.generate_load --quick --json bench_generate_load.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (see README)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from bench.common import decoder_in, fixture_reviews, reference_threads
from core.targets import DECODER_TARGET_MODULES
from service.config import Settings
from tests.e2e.server import ServerProcess

if TYPE_CHECKING:
    import torch

    from core.decoder.base import DecoderBase
    from core.decoder.forward import DecoderWeights

R = 8
MIN_PROMPT, MAX_PROMPT = 20, 200


WARM_UP = [{"role": "user", "content": "Hello."}]


def prompts(
    base: DecoderBase, k: int, lengths: tuple[int, int] = (MIN_PROMPT, MAX_PROMPT)
) -> tuple[list[list[dict[str, str]]], str]:
    """``k`` conversations of ``lengths`` (min, max) rendered tokens, and where they come
    from."""
    from bench.datasets import DEFAULT_HH_RLHF_PATH, load_jsonl
    from bench.hh_convert import HHFormatError, split_pair

    chats: list[list[dict[str, str]]] = []
    source = "hh-rlhf harmless-base test"
    if DEFAULT_HH_RLHF_PATH.is_file():
        for rec in load_jsonl(DEFAULT_HH_RLHF_PATH):
            try:
                chats.append(split_pair(rec)[0])
            except HHFormatError:
                continue
    else:
        source = "rotten tomatoes fixture"
        chats = [[{"role": "user", "content": r["text"]}] for r in fixture_reviews()]
    fits = []
    for chat in chats:
        n = len(base.tokenizer.apply_chat_template(chat, add_generation_prompt=True))
        if lengths[0] <= n <= lengths[1]:
            fits.append(chat)
        if len(fits) == k:
            break
    return fits, source


def random_adapters(base: DecoderBase, n: int, targets: tuple[str, ...]) -> list[dict[str, Any]]:
    """``n`` LoRA state dicts (PEFT names) on ``targets`` with random non-zero A and B."""
    from core.methods.lora.model import lora_key
    from tests.core.generation.helpers import random_lora

    out = []
    for i in range(n):
        lora = random_lora(base, f"g{i}", R, targets, seed=i, std=0.02)
        out.append(
            {
                lora_key(layer, t, part): weight
                for (layer, t), (a, b) in lora.pairs.items()
                for part, weight in (("A", a), ("B", b))
            }
        )
    return out


def store(
    data_dir: Path, base: DecoderBase, states: list[dict[str, Any]], targets: tuple[str, ...]
) -> list[str]:
    """Insert the adapters as the default tenant's chat adapters ``g0`` ...; their names."""
    from core.adapter import Adapter
    from core.heads import HeadConfig
    from core.methods import parse_method_config
    from service.adapters.store import adapter_row_from
    from service.db.models import ApiKey
    from service.db.session import make_db_engine, make_sessionmaker
    from service.tenants.keys import hash_api_key

    key = (data_dir / "default_api_key").read_text().strip()
    db_engine = make_db_engine(f"sqlite:///{data_dir / 'loraplex.db'}")
    cfg = parse_method_config(
        "lora", {"r": R, "alpha": 16, "target_modules": list(targets)}, base_kind="decoder"
    )
    names = []
    with make_sessionmaker(db_engine)() as session:
        tenant_id = session.query(ApiKey).filter_by(key_hash=hash_api_key(key)).one().tenant_id
        for i, state in enumerate(states):
            adapter = Adapter(
                method=cfg,
                head=HeadConfig(task="chat"),
                method_state=state,
                head_state={},
                base_name=base.name,
                base_fingerprint=base.fingerprint,
                trainable_params=sum(v.numel() for v in state.values()),
            )
            row = adapter_row_from(adapter, base, name=f"g{i}")
            row.tenant_id, row.version = tenant_id, i + 1
            session.add(row)
            names.append(f"g{i}")
        session.commit()
    db_engine.dispose()
    return names


def pct(values: list[float], p: float) -> float:
    ms = sorted(v * 1000 for v in values)
    return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1) if ms else float("nan")


async def drive(
    server: ServerProcess,
    models: list[str],
    chats: list[list[dict[str, str]]],
    concurrency: int,
    requests: int,
    new_tokens: int,
    key: str | None = None,
) -> dict[str, Any]:
    """``concurrency`` streaming clients sharing ``requests`` requests, as ``key``'s tenant
    (default: the server's default key)."""
    ttft: list[float] = []
    itl: list[float] = []
    tokens = errors = prompt_tokens = cached_tokens = 0
    headers = {"Authorization": f"Bearer {key or server.api_key}"}
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers=headers, timeout=600, limits=limits
    ) as client:

        async def one(i: int) -> None:
            nonlocal tokens, errors, prompt_tokens, cached_tokens
            body = {
                "model": models[i % len(models)],
                "messages": chats[i % len(chats)],
                "max_tokens": new_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            t0 = time.perf_counter()
            last = None
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code != 200:
                        errors += 1
                        return
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if usage := chunk.get("usage"):
                            tokens += usage["completion_tokens"]
                            prompt_tokens += usage["prompt_tokens"]
                            cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
                        if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                            now = time.perf_counter()
                            (itl if last is not None else ttft).append(now - (last or t0))
                            last = now
            except httpx.HTTPError:
                errors += 1

        # Warm-up, untimed: every adapter read from the database into the bank once, and the
        # prefix cache holding what a server in steady state holds for it (the template's
        # system turn); main gives each configuration prompts no earlier one sent. Then C
        # requests at once, so the timed run meets no decode batch size for the first time:
        # a server's first configuration ran ~1.5x slower than the same one repeated later
        # (the base at C=32, 2 avx512_bf16 EPYC cores: 117.9 tokens/s first, then 184.2
        # and 182.6, alternating with 64 adapters).
        for model in models:
            await client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": WARM_UP, "max_tokens": 1},
            )
        await asyncio.gather(
            *(
                client.post(
                    "/v1/chat/completions",
                    json={"model": models[i % len(models)], "messages": WARM_UP, "max_tokens": 16},
                )
                for i in range(concurrency)
            )
        )

        async def client_loop(c: int) -> None:
            for i in range(c, requests, concurrency):
                await one(i)

        start = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": requests,
        "completion_tokens": tokens,
        "output_tok_s": round(tokens / elapsed, 1),
        "ttft_p50_ms": pct(ttft, 50),
        "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50),
        "itl_p99_ms": pct(itl, 99),
        "errors": errors,
        # Of the prompts' tokens, those the prefix cache held (--prefix-cache-mb).
        "cached_prompt_share": round(cached_tokens / max(prompt_tokens, 1), 3),
    }


def hf_sequential(
    base: DecoderBase,
    ids: list[list[int]],
    new_tokens: int,
    peft_states: list[Any] | None,
    dtype: torch.dtype,
    targets: tuple[str, ...] = DECODER_TARGET_MODULES,
) -> float:
    """Output tokens/s of transformers ``generate`` in ``dtype`` one request at a time (with
    PEFT and ``set_adapter`` per request when ``peft_states`` is given)."""
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, set_peft_model_state_dict

    from tests.core.decoder.test_forward import hf_model

    model: Any = hf_model(base)
    names: list[str] = []
    if peft_states:
        cfg = PeftLoraConfig(r=R, lora_alpha=16, target_modules=list(targets))
        model = get_peft_model(model, cfg, adapter_name="g0")
        for i, state in enumerate(peft_states):
            name = f"g{i}"
            if i:
                model.add_adapter(name, cfg)
            prefixed = {f"base_model.model.{k}": v for k, v in state.items()}
            set_peft_model_state_dict(model, prefixed, adapter_name=name)
            names.append(name)
        model.eval()
    model.to(dtype)
    tokens = 0
    start = time.perf_counter()
    for i, prompt in enumerate(ids):
        if names:
            model.set_adapter(names[i % len(names)])
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=list(base.stop_token_ids),
                pad_token_id=0,
            )
        tokens += out.shape[1] - len(prompt)
    return tokens / (time.perf_counter() - start)


def bare_decode(
    weights: DecoderWeights,
    base: DecoderBase,
    ids: list[list[int]],
    concurrency: int,
    requests: int,
    new_tokens: int,
    prefix_cache_mb: int,
) -> float:
    """Output tokens/s of loraplex's scheduler in this process on the bare base, driven as
    :func:`drive` drives the server: ``concurrency`` clients sharing ``requests`` requests,
    each client's next request added when its last one ends (prefill included, no HTTP).

    Not all at once and then drained: as rows end, a drained batch shrinks, and a smaller
    batch makes fewer tokens a second; the server kept C in flight, and beat that reference
    by 1.23x on its own base (2 avx512_bf16 EPYC cores, C=32), so the ratio flattered it.
    """
    from core.generation.sampling import SamplingParams
    from core.generation.scheduler import GenerationRequest, Scheduler
    from core.hardware import kv_dtype

    scheduler = Scheduler(
        weights,
        base.tokenizer,
        num_slots=concurrency,
        capacity=max(map(len, ids)) + new_tokens,
        stop_token_ids=base.stop_token_ids,
        kv_dtype=kv_dtype(weights.dtype, weights.device),  # as the server's
        prefix_cache_bytes=prefix_cache_mb << 20,
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    # Each client's requests in order, as drive's client_loop sends them.
    queues = [list(range(c, requests, concurrency)) for c in range(concurrency)]
    client_of: dict[int, int] = {}

    def send(client: int) -> None:
        if queues[client]:
            i = queues[client].pop(0)
            client_of[scheduler.add(GenerationRequest(ids[i % len(ids)], params))] = client

    start = time.perf_counter()
    for client in range(concurrency):
        send(client)
    while scheduler.running or scheduler.waiting:
        for event in scheduler.step():
            if event.finish_reason is not None or event.error is not None:
                send(client_of.pop(event.request_id))
    return scheduler.generated_tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="C 1/8, N 1/16, 32 new tokens")
    parser.add_argument("--concurrency", type=int, nargs="+")
    parser.add_argument(
        "--adapters", type=int, nargs="+", help="adapter counts N; 0 = the bare base over HTTP"
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        choices=DECODER_TARGET_MODULES,
        default=list(DECODER_TARGET_MODULES),
        help="the random adapters' LoRA targets (default every linear, loraplex's default; "
        "q_proj v_proj is PEFT's default for Llama)",
    )
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        nargs=2,
        default=[MIN_PROMPT, MAX_PROMPT],
        metavar=("MIN", "MAX"),
        help="rendered prompt lengths to draw (issue 17's TTFT target is for 100 tokens: 90 110)",
    )
    parser.add_argument("--requests", type=int, help="per configuration (default 2 x C, >= 4)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of the server's generation (LORAPLEX_TORCH_THREADS) and of the "
        "references here (default: every core, the server's count without an embedded worker)",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=Settings.model_fields["generation_prefix_cache_mb"].default,
        help="the server's LORAPLEX_GENERATION_PREFIX_CACHE_MB, and (c)'s the same (default: "
        "the server's default; 0: off). Every prompt here opens with SmolLM2's 25-token "
        "system turn, which each tenant's and adapter's later requests find cached",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    lengths = tuple(args.prompt_tokens)
    if not 1 <= lengths[0] <= lengths[1] <= MAX_PROMPT:
        parser.error(f"--prompt-tokens: 1 <= MIN <= MAX <= {MAX_PROMPT} (the server's context)")
    concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    counts = args.adapters or ([1, 16] if args.quick else [1, 16, 64])
    new_tokens = args.new_tokens or (32 if args.quick else 128)

    def requests_at(c: int) -> int:
        return args.requests or max(4, 2 * c)

    import torch

    from core.decoder.base import DEFAULT_DECODER_NAME
    from core.hardware import bf16_cpu_flags, resolve_dtype, torch_threads

    base, weights = decoder_in(args.dtype, args.threads)
    fast_bf16 = resolve_dtype("auto", base.weights.device) == torch.bfloat16
    # Each configuration its own prompts: a server that had seen one (and its reply) would
    # find it in its prefix cache. Where too few fit --prompt-tokens they repeat (warned).
    sent = len(counts) * sum(map(requests_at, concurrency))
    chats, source = prompts(base, max(64, sent), lengths)
    if len(chats) < sent:
        print(
            f"[generate_load] {len(chats)} prompts of {lengths} tokens for {sent} requests: "
            "later configurations repeat earlier prompts, which the prefix cache holds",
            file=sys.stderr,
        )
    offset = 0
    ids = [list(base.tokenizer.apply_chat_template(c, add_generation_prompt=True)) for c in chats]
    targets = tuple(args.targets)
    states = random_adapters(base, max(counts), targets)
    rows: list[dict[str, Any]] = []
    prompts_of: list[list[int]] = []  # each row's prompts, as indices into chats and ids
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            Path(tmp),
            {
                "bases": DEFAULT_DECODER_NAME,
                "embedded_worker": "false",
                "generation_context_tokens": MAX_PROMPT + new_tokens,
                "generation_kv_cache_mb": 2048,
                "generation_dtype": args.dtype,
                "generation_prefix_cache_mb": args.prefix_cache_mb,
                **({"torch_threads": args.threads} if args.threads else {}),
            },
        ).start()
        try:
            names = store(Path(tmp), base, states, targets)
            for n in counts:
                for c in concurrency:
                    requests = requests_at(c)
                    models = names[:n] or [base.name]
                    mine = [(offset + i) % len(chats) for i in range(requests)]
                    offset += requests
                    sent_chats = [chats[i] for i in mine]
                    row = asyncio.run(drive(server, models, sent_chats, c, requests, new_tokens))
                    row = {"concurrency": c, "adapters": n, **row}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    prompts_of.append(mine)
        finally:
            server.stop()
    k = max(4, min(8, len(ids)))
    hf_dtypes = (torch.float32, torch.bfloat16) if fast_bf16 else (torch.float32,)
    hf_by: dict[tuple[torch.dtype, int], float] = {}
    for dtype in hf_dtypes:
        for threads in reference_threads():
            with torch_threads(threads):
                hf_by[dtype, threads] = hf_sequential(base, ids[:k], new_tokens, None, dtype)
    hf_dtype, hf_threads = max(hf_by, key=hf_by.__getitem__)
    hf = hf_by[hf_dtype, hf_threads]
    with torch_threads(hf_threads):
        peft = hf_sequential(base, ids[:k], new_tokens, states[: max(counts)], hf_dtype, targets)
    for row, mine in zip(rows, prompts_of, strict=True):
        c = row["concurrency"]
        row_ids = [ids[i] for i in mine]
        bare = bare_decode(weights, base, row_ids, c, len(mine), new_tokens, args.prefix_cache_mb)
        row["bare_decode_tok_s"] = round(bare, 1)
        row["ratio_to_bare_decode"] = round(row["output_tok_s"] / bare, 3)
        row["ratio_to_hf_sequential"] = round(row["output_tok_s"] / hf, 3)
    report = {
        "prompts": source,
        "new_tokens": new_tokens,
        "prompt_tokens": {
            "min": min(map(len, ids)),
            "median": statistics.median(map(len, ids)),
            "max": max(map(len, ids)),
        },
        "lora_targets": list(targets),
        "dtype": str(weights.dtype).removeprefix("torch."),
        "cpu_bf16_flags": bf16_cpu_flags(),
        "threads": torch.get_num_threads(),
        "prefix_cache_mb": args.prefix_cache_mb,
        "hf_sequential_tok_s": round(hf, 1),
        "hf_sequential_dtype": str(hf_dtype).removeprefix("torch."),
        "hf_sequential_threads": hf_threads,
        "hf_sequential_tok_s_by_setting": {
            f"{str(d).removeprefix('torch.')}, {t} thread{'s' if t > 1 else ''}": round(v, 1)
            for (d, t), v in hf_by.items()
        },
        f"hf_peft_sequential_{max(counts)}_adapters_tok_s": round(peft, 1),
        "results": rows,
        "median_ratio_to_bare_decode": statistics.median(r["ratio_to_bare_decode"] for r in rows),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print("[generate_load] done", file=sys.stderr)


if __name__ == "__main__":
    main()
