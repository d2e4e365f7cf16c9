"""Lifespan hook: load the bases once; start the encoder's batcher (engine owner + compute pool)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from anyio.to_thread import run_sync

from service.config import Settings
from service.observability.metrics import GenerationCollector
from service.serving.batcher import Batcher
from service.serving.cores import CoreLender, ProcessActivity
from service.serving.decoder_scoring import start_decoder_scoring
from service.serving.generation import start_generation
from service.serving.queries import DatabaseLoader
from service.serving.run import RequestTokenizer
from service.state import AppState

if TYPE_CHECKING:
    from core.base import FrozenBase

logger = logging.getLogger(__name__)


MAX_DEFAULT_WORKERS = 4
CPU_BATCH_TOKENS = 256  # measured on 2 cores: see Settings.max_batch_tokens
CUDA_BATCH_TOKENS = 8192  # not measured: no GPU was available


def serving_threads(settings: Settings) -> int:
    """Torch threads for inference; with an embedded worker the cores are split in two."""
    if settings.torch_threads:
        return settings.torch_threads
    cores = os.cpu_count() or 2
    return max(1, cores // 2) if settings.embedded_worker else cores


def spare_cores(settings: Settings, threads: int, decoders: Sequence[str]) -> int:
    """Cores a generation step may borrow while the embedded worker idles: those outside the
    serving budget, where that budget is the default split with an embedded worker, the
    generation threads are not set, and one decoder base generates (two would borrow the same
    cores)."""
    if (
        not settings.embedded_worker
        or settings.torch_threads
        or settings.generation_threads
        or len(decoders) != 1
    ):
        return 0
    return max(0, (os.cpu_count() or 2) - threads)


def inference_workers(settings: Settings, threads: int, on_cuda: bool) -> int:
    """Inference threads sharing the engine: by default one per serving core on a CPU.

    Measured on 2 cores: two workers with one torch thread each beat one with two (intra-op
    threads wait at barriers on MiniLM's small matrices). Capped at 4 by default because each
    worker's Python op dispatch takes the GIL; unmeasured beyond 2 cores. One on CUDA, where
    the device, not the host threads, does the work.
    """
    if settings.inference_workers:
        return settings.inference_workers
    return 1 if on_cuda else max(1, min(threads, MAX_DEFAULT_WORKERS))


def max_batch_tokens(settings: Settings, on_cuda: bool) -> int:
    """Padded tokens one batch may hold: by default small on a CPU, where a batch's time grows
    with its tokens and bounds another tenant's wait, and large on CUDA, where a few hundred
    tokens leave the device mostly idle."""
    if settings.max_batch_tokens:
        return settings.max_batch_tokens
    return CUDA_BATCH_TOKENS if on_cuda else CPU_BATCH_TOKENS


@asynccontextmanager
async def serving(state: AppState) -> AsyncIterator[None]:
    import torch

    from service.bases import load_bases

    settings = state.settings
    readiness = state.readiness
    readiness.expect("model", "loading the base models")
    threads = serving_threads(settings)
    torch.set_num_threads(threads)
    bases = await run_sync(lambda: load_bases(settings))
    # One adapter loader (stateless but for its session factory) for every engine's misses.
    loader = DatabaseLoader(state.sessionmaker, bases)
    base = bases.encoder
    batcher = _start_encoder(state, base, threads, loader) if base is not None else None
    decoders = [name for name in bases if bases.kind(name) == "decoder"]
    # A scheduler owner thread per decoder base (/v1/chat/completions, /v1/completions).
    generation_threads = settings.generation_threads or threads
    generation = await run_sync(
        lambda: start_generation(bases, decoders, settings, loader, generation_threads)
    )
    state.generation = generation
    # A decoder's classifiers and reward models (/predict, /reward/compare, best-of-n).
    scoring = start_decoder_scoring(bases, decoders, settings, loader, threads)
    state.decoder_scoring = scoring
    spare = spare_cores(settings, threads, decoders)
    if spare:
        # The worker's cores while it and every other engine here idle (service/serving/cores.py).
        worker = ProcessActivity(lambda: state.worker_pid)
        engines = [b for b in (batcher, *(s.batcher for s in scoring.values())) if b is not None]
        lender = CoreLender(threads, spare, [worker.busy, *(b.busy for b in engines)])
        for server in generation.values():
            server.lender = lender
    state.metrics.add_collector(GenerationCollector(generation))
    state.bases = bases
    readiness.ready("model")
    try:
        yield
    finally:
        for server in generation.values():
            server.stop()
        for scorer in scoring.values():
            scorer.stop()
        if batcher is not None:
            batcher.stop()
            state.metrics.unwatch_engine()
        # Let go of what this hook loaded: the app may outlive its lifespan (a test's client
        # holds it; its own reference cycles wait for Python's collector), and through its
        # state it would keep the KV caches (1 GiB each by default), the bf16 and merged
        # copies and the bases. GenerationCollector reads the same dict, so it is emptied.
        generation.clear()
        scoring.clear()
        state.generation = state.decoder_scoring = None
        state.bases = state.base_model = state.request_tokenizer = state.batcher = None


def _start_encoder(
    state: AppState, base: FrozenBase, threads: int, loader: DatabaseLoader
) -> Batcher:
    """The encoder's serving: the inference engine, its batcher (started) and input check."""
    import torch

    from core.inference import InferenceEngine

    settings = state.settings
    engine = InferenceEngine(
        base,
        dtype=getattr(torch, settings.serve_dtype),
        max_resident_bytes=settings.adapter_cache_mb << 20,
        merged_cache_bytes=settings.merged_cache_mb << 20,
    )
    on_cuda = engine.device.type == "cuda"
    workers = inference_workers(settings, threads, on_cuda)
    metrics = state.metrics
    batcher = Batcher(
        engine,
        loader,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=max_batch_tokens(settings, on_cuda),
        max_wait_ms=settings.max_wait_ms,
        max_queue_rows=settings.max_queue_rows,
        workers=workers,
        threads=max(1, threads // workers),
        on_batch=metrics.batch_rows.observe,
        on_reject=metrics.rejected.inc,
    )
    metrics.watch_engine(lambda: engine.stats, lambda: batcher.queued_rows)
    state.base_model = base
    state.request_tokenizer = RequestTokenizer(base)
    state.batcher = batcher
    batcher.start()
    logger.info(
        "serving %s (%d params) on %s: %d inference workers x %d torch threads, %d tokens a batch",
        base.name,
        base.num_params,
        engine.device,
        workers,
        batcher.threads,
        batcher.max_batch_tokens,
    )
    return batcher
