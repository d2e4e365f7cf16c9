"""Cross-request dynamic batching (LoRAX / S-LoRA style) in front of one inference thread.

Requests for any mix of adapters and modes wait in one bounded queue. The inference thread —
the engine's only owner — takes the oldest request, adds whatever else is queued until the
batch holds ``max_batch_size`` rows or the oldest request has waited ``max_wait_ms`` (not at
all if it arrived alone: no other request in the ``max_wait_ms`` before it), runs the
whole batch through the engine (one base forward for all LoRA rows), and hands each request
its own rows' results. The event loop never tokenizes or computes; it only awaits a future.

Beyond ``max_queue_rows`` waiting rows, ``submit`` refuses at once (HTTP 503 + Retry-After)
instead of letting the queue and the latency grow without bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from service.serving.policy import AutoModePolicy

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.inference.engine import InferenceEngine, Row, RowResult

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue_rows`` rows; the caller should retry later."""


@dataclass
class _Request:
    rows: list[Row]
    future: asyncio.Future[list[RowResult]]
    loop: asyncio.AbstractEventLoop
    # Adapters fetched by the request path because they were not resident (see ``submit``).
    adapters: dict[Hashable, Adapter] = field(default_factory=dict)
    enqueued: float = field(default_factory=time.monotonic)
    # Whether another request arrived within max_wait before this one (see ``_next_batch``).
    in_company: bool = True


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
        threads: int | None = None,
        policy: AutoModePolicy | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loader = loader
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.threads = threads
        self.policy = policy or AutoModePolicy()
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._commands: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="inference", daemon=True)
        self._fetching: dict[Hashable, asyncio.Future[Adapter]] = {}
        self._last_arrival = float("-inf")

    # --- called from the event loop / request threads ----------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    async def submit(self, rows: list[Row]) -> list[RowResult]:
        """Results for ``rows`` in order; raises :class:`QueueFullError` when over the bound.

        Adapters that are not resident are read and parsed here, in a worker thread, before
        the request joins the queue: a cold adapter costs its own request a database read,
        never the whole batch it lands in. The loader's errors (a deleted adapter) propagate.
        """
        loop = asyncio.get_running_loop()
        adapters = await self._fetch_missing({r.key for r in rows if r.key is not None})
        request = _Request(rows, loop.create_future(), loop, adapters)
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
            if key in self.engine:  # a racy read is fine: the inference thread re-checks
                continue
            pending = self._fetching.get(key)
            if pending is None:  # one fetch per key, however many requests want it
                pending = asyncio.ensure_future(asyncio.to_thread(self.loader, key))
                self._fetching[key] = pending
                pending.add_done_callback(lambda _f, k=key: self._fetching.pop(k, None))
            out[key] = await asyncio.shield(pending)
        return out

    def invalidate(self, tenant_id: str, name: str) -> None:
        """Drop every resident version of an adapter, before the next batch runs."""

        def drop() -> None:
            for key in self.engine.resident_keys():
                if isinstance(key, tuple) and key[:2] == (tenant_id, name):
                    self.engine.unload(key)

        self.call_soon(drop)

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the inference thread between batches (the engine's only owner)."""
        with self._cond:
            self._commands.append(fn)
            self._cond.notify()

    # --- the inference thread ----------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue and not self._commands and not self._stopping:
                self._cond.wait()
            self._run_commands()
            if self._stopping and not self._queue:
                return None
            if not self._queue:
                return []
            batch = [self._queue.popleft()]
            rows = len(batch[0].rows)
            # Waiting pays only when company is likely: a request that arrived alone (nothing
            # else in the max_wait before it, e.g. one client at a time) runs at once instead
            # of idling max_wait; under load requests arrive close together and wait as set.
            deadline = batch[0].enqueued + (self.max_wait if batch[0].in_company else 0.0)
            while rows < self.max_batch_size:
                if self._queue:
                    if rows + len(self._queue[0].rows) > self.max_batch_size:
                        break
                    nxt = self._queue.popleft()
                    batch.append(nxt)
                    rows += len(nxt.rows)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            self._queued_rows -= rows
            return batch

    def _run_commands(self) -> None:
        while self._commands:
            fn = self._commands.popleft()
            try:
                fn()
            except Exception:
                logger.exception("inference-thread command failed")

    def _run(self, batch: list[_Request]) -> None:
        rows: list[Row] = []
        for request in batch:
            for row in request.rows:
                rows.append(self._resolve_mode(row))
        self.stats.batches += 1
        self.stats.rows += len(rows)
        if self.on_batch is not None:
            self.on_batch(len(rows))
        fetched: dict[Hashable, Adapter] = {}
        for request in batch:
            fetched.update(request.adapters)
        try:
            results = self._run_rows(rows, fetched)
        except Exception as exc:  # the engine isolates row errors; this is a bug guard
            logger.exception("batch of %d rows failed", len(rows))
            for request in batch:
                _resolve(request, exc=exc)
            return
        start = 0
        for request in batch:
            end = start + len(request.rows)
            _resolve(request, results[start:end])
            start = end

    def _run_rows(self, rows: list[Row], fetched: dict[Hashable, Adapter]) -> list[RowResult]:
        def load(key: Hashable) -> Adapter:
            adapter = fetched.get(key)
            return adapter if adapter is not None else self.loader(key)  # evicted meanwhile

        out: list[RowResult] = []
        # One oversized request runs alone, in chunks the size of a batch.
        for i in range(0, len(rows), self.max_batch_size):
            out += self.engine.run(rows[i : i + self.max_batch_size], loader=load)
        return out

    def _resolve_mode(self, row: Row) -> Row:
        self.policy.observe(row.key)
        if row.mode != "auto":  # type: ignore[comparison-overlap]
            return row
        return replace(row, mode=self.policy.mode_for(row.key))


def _resolve(request: _Request, results: Any = None, exc: BaseException | None = None) -> None:
    def settle() -> None:
        if request.future.done():  # the client went away
            return
        if exc is not None:
            request.future.set_exception(exc)
        else:
            request.future.set_result(results)

    request.loop.call_soon_threadsafe(settle)
