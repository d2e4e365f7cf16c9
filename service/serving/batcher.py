"""Cross-request dynamic batching (LoRAX / S-LoRA style) in front of a small inference pool.

Requests for any mix of adapters and modes wait in one bounded queue. The batcher thread, the
engine's only owner, takes the oldest request, adds whatever else is queued until the batch
holds ``max_batch_size`` rows or the oldest request has waited ``max_wait_ms`` (not at all if
it arrived alone: no other request in the ``max_wait_ms`` before it), and plans the batch: its
adapters made resident and pinned (:meth:`InferenceEngine.plan`); rows arrive tokenized by
their request's thread (:class:`service.serving.run.RequestTokenizer`), never here. The
forward pass (one base forward for all LoRA rows) runs on the batcher thread itself with one
worker, or on one of ``workers`` compute threads; each request gets its own rows' results.
The event loop never tokenizes or computes; it only awaits a future.

With several workers the batcher forms the next batch as soon as one of them is free, so
batches compute side by side, each with ``threads`` torch threads. On a 2-core CPU two workers
with one torch thread each ran MiniLM 10-20 % faster at batch 32 than one worker with two, and
2.4x faster at batch 1 (intra-op threads idle at barriers on small matrices): see the README.
Compute threads only read their plan and tensors nobody writes while it runs; the batcher
thread releases each plan (unpins its adapters) once its worker reports it done.

Beyond ``max_queue_rows`` waiting rows, ``submit`` refuses at once (HTTP 503 + Retry-After)
instead of letting the queue and the latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from service.serving.policy import AutoModePolicy, RequestMode

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.inference import InferenceEngine, Plan, Row, RowResult

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue_rows`` rows; the caller should retry later."""


@dataclass
class _Request:
    rows: list[Row]
    mode: RequestMode
    future: asyncio.Future[list[RowResult]]
    loop: asyncio.AbstractEventLoop
    # Adapters fetched by the request path because they were not resident (see ``submit``).
    adapters: dict[Hashable, Adapter] = field(default_factory=dict)
    enqueued: float = field(default_factory=time.monotonic)
    # Whether another request arrived within max_wait before this one (see ``_collect``).
    in_company: bool = True


@dataclass
class _Work:
    """A planned batch on its way to a compute thread: one plan, or one per chunk of an
    oversized request (run one after another, like one batch)."""

    requests: list[_Request]
    plans: list[Plan]


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0


class Batcher:
    def __init__(
        self,
        engine: InferenceEngine,
        loader: Callable[[Hashable], Adapter],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_rows: int,
        workers: int = 1,
        threads: int | None = None,
        policy: AutoModePolicy | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loader = loader
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.workers = max(1, workers)
        self.threads = threads
        self.policy = policy or AutoModePolicy()
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._commands: deque[Callable[[], object]] = deque()
        self._done: deque[Plan] = deque()  # computed, waiting for the owner to release them
        self._free = self.workers  # compute workers without a batch
        self._cond = threading.Condition()
        self._stopping = False
        self._owner = threading.Thread(target=self._own, name="inference", daemon=True)
        # One worker: the owner computes itself. More: compute threads fed through a queue.
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._pool = [
            threading.Thread(target=self._compute_loop, name=f"inference-{i}", daemon=True)
            for i in range(self.workers if self.workers > 1 else 0)
        ]
        self._fetching: dict[Hashable, asyncio.Future[Adapter]] = {}
        self._last_arrival = float("-inf")

    # --- called from the event loop / request threads ----------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        for thread in [self._owner, *self._pool]:
            thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop every thread (waits up to 30 s)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._owner.join(timeout=30)

    async def submit(self, rows: list[Row], mode: RequestMode) -> list[RowResult]:
        """Results for ``rows`` in order; raises :class:`QueueFullError` when over the bound.

        Every row runs in ``mode`` (``auto``: the policy's choice for its adapter, made when
        the row's batch forms), whatever forward mode the row was built with.

        Adapters that are not resident are read and parsed here, in a worker thread, before
        the request joins the queue: a cold adapter costs its own request a database read,
        never the whole batch it lands in. The loader's errors (a deleted adapter) propagate.
        """
        loop = asyncio.get_running_loop()
        adapters = await self._fetch_missing({r.key for r in rows if r.key is not None})
        request = _Request(rows, mode, loop.create_future(), loop, adapters)
        with self._cond:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if self._queued_rows and self._queued_rows + len(rows) > self.max_queue_rows:
                raise QueueFullError(f"{self._queued_rows} rows are already waiting")
            request.in_company = request.enqueued - self._last_arrival < self.max_wait
            self._last_arrival = request.enqueued
            self._queue.append(request)
            self._queued_rows += len(rows)
            self._cond.notify()
        return await request.future

    async def _fetch_missing(self, keys: set[Hashable]) -> dict[Hashable, Adapter]:
        out: dict[Hashable, Adapter] = {}
        for key in keys:
            if key in self.engine:  # a racy read is fine: plan() re-checks
                continue
            pending = self._fetching.get(key)
            if pending is None:  # one fetch per key, however many requests want it
                pending = asyncio.ensure_future(asyncio.to_thread(self.loader, key))
                self._fetching[key] = pending
                pending.add_done_callback(lambda _f, k=key: self._fetching.pop(k, None))
            out[key] = await asyncio.shield(pending)
        return out

    def invalidate(self, tenant_id: str, name: str) -> None:
        """Drop every resident version of an adapter, before the next batch is planned."""

        def drop() -> None:
            for key in self.engine.resident_keys():
                if isinstance(key, tuple) and key[:2] == (tenant_id, name):
                    self.engine.unload(key)

        self.call_soon(drop)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the batcher thread (the engine's only owner) before its next batch.

        What ``fn`` returns is dropped, so any callable will do (``event.set``, a lambda).
        """
        with self._cond:
            self._commands.append(fn)
            self._cond.notify()

    # --- the batcher thread: the engine's owner ------------------------------------------------

    def _own(self) -> None:
        self._set_threads()
        while True:
            commands, done, batch = self._next_step()
            # Nothing may end this thread but stop(): without it no request is ever answered.
            for fn in [*commands, *(partial(self.engine.release, plan) for plan in done)]:
                try:
                    fn()
                except Exception:
                    logger.exception("batcher command failed")
            if batch is None:
                if not commands and not done:
                    break
                continue
            work = self._plan(*batch)
            if work is not None and self._pool:
                self._work.put(work)
            elif work is not None:
                self._compute(work)
                self._finished(work)
        for _ in self._pool:  # queued work first, then one stop sentinel per thread
            self._work.put(None)
        for thread in self._pool:
            thread.join(timeout=30)
        for plan in self._done:
            self.engine.release(plan)

    def _next_step(
        self,
    ) -> tuple[list[Callable[[], object]], list[Plan], tuple[list[_Request], list[Row]] | None]:
        """What the owner does next: commands and plans to release, or a batch to plan.

        ``(no commands, no plans, None)`` means stop: stopping, nothing queued.
        """
        with self._cond:
            while not (self._commands or self._done):
                if self._queue and self._free:
                    break
                if self._stopping and not self._queue:
                    return [], [], None
                self._cond.wait()
            if self._commands or self._done:
                commands, done = list(self._commands), list(self._done)
                self._commands.clear()
                self._done.clear()
                return commands, done, None
            batch, rows = self._collect()
            self._free -= 1
            self._queued_rows -= len(rows)
            self.stats.batches += 1
            self.stats.rows += len(rows)
        if self.on_batch is not None:
            self.on_batch(len(rows))
        return [], [], (batch, rows)

    def _collect(self) -> tuple[list[_Request], list[Row]]:
        """Requests for one batch (under the lock), and their rows with ``auto`` resolved."""
        batch = [self._queue.popleft()]
        n = len(batch[0].rows)
        # Waiting pays only when company is likely: a request that arrived alone (nothing else
        # in the max_wait before it, e.g. one client at a time) runs at once instead of idling
        # max_wait; under load requests arrive close together and wait as set.
        deadline = batch[0].enqueued + (self.max_wait if batch[0].in_company else 0.0)
        while n < self.max_batch_size:
            if self._queue:
                if n + len(self._queue[0].rows) > self.max_batch_size:
                    break
                nxt = self._queue.popleft()
                batch.append(nxt)
                n += len(nxt.rows)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                break
            self._cond.wait(remaining)
        return batch, [self._resolve_mode(row, r.mode) for r in batch for row in r.rows]

    def _plan(self, batch: list[_Request], rows: list[Row]) -> _Work | None:
        fetched: dict[Hashable, Adapter] = {}
        for request in batch:
            fetched.update(request.adapters)

        def load(key: Hashable) -> Adapter:
            adapter = fetched.get(key)
            return adapter if adapter is not None else self.loader(key)  # evicted meanwhile

        plans: list[Plan] = []
        try:
            # One oversized request runs alone, in chunks the size of a batch.
            for i in range(0, len(rows), self.max_batch_size):
                plans.append(self.engine.plan(rows[i : i + self.max_batch_size], loader=load))
        except Exception as exc:  # the engine isolates row errors; this is a bug guard
            logger.exception("planning a batch of %d rows failed", len(rows))
            for plan in plans:
                self.engine.release(plan)
            self._fail(batch, exc)
            with self._cond:
                self._free += 1
            return None
        return _Work(batch, plans)

    def _finished(self, work: _Work) -> None:
        """Back from computing (any thread): the owner releases the plans, the worker is free."""
        with self._cond:
            self._done.extend(work.plans)
            self._free += 1
            self._cond.notify()

    # --- compute (the owner with one worker, else the pool's threads) ----------------------------

    def _set_threads(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)

    def _compute_loop(self) -> None:
        self._set_threads()
        while (work := self._work.get()) is not None:
            try:
                self._compute(work)
            finally:
                self._finished(work)

    def _compute(self, work: _Work) -> None:
        try:
            results = [r for plan in work.plans for r in self.engine.execute(plan)]
        except Exception as exc:  # the engine isolates row errors; this is a bug guard
            logger.exception("a batch of %d requests failed", len(work.requests))
            self._fail(work.requests, exc)
            return
        start = 0
        for request in work.requests:
            end = start + len(request.rows)
            _resolve(request, results[start:end])
            start = end

    @staticmethod
    def _fail(requests: list[_Request], exc: BaseException) -> None:
        for request in requests:
            _resolve(request, exc=exc)

    def _resolve_mode(self, row: Row, mode: RequestMode) -> Row:
        self.policy.observe(row.key)
        forward = self.policy.mode_for(row.key) if mode == "auto" else mode
        return row if row.mode == forward else replace(row, mode=forward)


def _resolve(request: _Request, results: Any = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if request.future.done():  # the client went away
            return
        if exc is not None:
            request.future.set_exception(exc)
        else:
            request.future.set_result(results)

    # RuntimeError: its event loop is closed, so nobody is waiting for the answer.
    with contextlib.suppress(RuntimeError):
        request.loop.call_soon_threadsafe(settle)
