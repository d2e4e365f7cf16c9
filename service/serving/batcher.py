"""Cross-request dynamic batching, fair across tenants, in front of a small inference pool.

Rows, not requests, are what the batcher schedules. Each request's rows wait in its tenant's
queue; the batcher thread, the engine's only owner, forms each batch row by row, always taking
the next row of the tenant that has been served the fewest tokens (a virtual token counter per
tenant, as in S-LoRA's authors' "Fairness in Serving Large Language Models", OSDI '24; a tenant
whose queue was empty starts level with the least-served busy tenant, so idling banks no
credit). A batch holds at most ``max_batch_size`` rows and ``max_batch_tokens`` padded tokens
(rows x its longest row: the forward pads to it), so another tenant's request gets into the
very next batch, and no batch costs more than the budget. A request's future resolves once all
its rows are computed, with the results in its rows' order.

A batch waits for company until it is full or its first request has waited ``max_wait_ms`` (not
at all if that request arrived alone: no other request in the ``max_wait_ms`` before it). The
batcher thread plans it (adapters made resident and pinned, :meth:`InferenceEngine.plan`; rows
arrive tokenized by their request's thread, :class:`service.serving.run.RequestTokenizer`, never
here) and hands it to a compute thread. The event loop never tokenizes or computes; it only
awaits a future.

Lanes. ``workers`` batches compute side by side, each with ``threads`` torch threads (on a
2-core CPU two workers with one torch thread each ran MiniLM 10-20 % faster at batch 32 than one
worker with two, and 2.4x faster at batch 1: see the README). One more lane is kept for a
tenant with nothing in flight: when every worker is busy and the next row (in the fair order)
is such a tenant's, its rows start at once beside the running batches instead of waiting for
one of them to end. Measured on 2 cores (avx512 fp32, one torch thread each): a one-text row
took 8 ms alone and 17 ms beside a batch of one 256-token row, which alone took 75 ms; so with
one worker a newcomer waited at least 75 ms without the lane, against a one-text /predict's
27 ms idle p99 over HTTP. Compute threads only read their plan and
tensors nobody writes while it runs; the batcher thread releases each plan (unpins its
adapters) once its thread reports it done.

Beyond ``max_queue_rows`` waiting rows, or half of them from one tenant, ``submit`` refuses at
once (HTTP 503 + Retry-After) instead of letting the queue and the latency grow without bound;
the tenant's half keeps one tenant's flood from refusing everyone else.

Parked rows. A row whose adapter fits the adapter cache alone but found its room held by
adapters in use (:class:`core.inference.residency.ResidencyBusyError`: pinned by batches in
flight, or kept for other rows of its own batch) is not answered: it is *parked*. Batches
cannot be cut by adapter bytes beforehand (a cold adapter's bytes are known only once the
engine has built it), so the batcher stops starting batches, and once none is in flight it
runs the parked rows alone, oldest first. Nothing is pinned then, so each such batch serves
at least one of them: its first row's adapter loads, or the resident adapters that held its
room belong to rows of the same batch, which run. A cache too small for the adapters in use
at once thus costs throughput (batches wait for each other), never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from service.serving.policy import AutoModePolicy, RequestMode

if TYPE_CHECKING:
    from core.adapter import Adapter
    from core.inference import Row, RowResult

logger = logging.getLogger(__name__)

_arrivals = itertools.count()  # ties between tenants go to the earlier request

# How long after its last batch a batcher still counts as busy (:meth:`Batcher.busy`): about
# the gap between one client's requests in a closed loop over HTTP, and long enough that
# generation hands back borrowed cores (service.serving.cores) before a burst's next batch.
BUSY_HOLD_S = 1.0


class ServingEngine(Protocol):
    """What the batcher drives, from its owner thread (``plan``, ``release``, ``unload``) and
    its compute threads (``execute``): core's :class:`InferenceEngine` for the encoder, or a
    decoder's :class:`service.serving.decoder_scoring.DecoderHeadEngine`. A row whose result's
    error is a :class:`~core.inference.residency.ResidencyBusyError` is parked and run again
    (see the module docstring)."""

    @property
    def base(self) -> Any: ...  # its ``max_length``: a bare-text row's cost

    def __contains__(self, key: Hashable) -> bool: ...

    def resident_keys(self) -> list[Hashable]: ...

    def unload(self, key: Hashable) -> bool: ...

    def plan(self, rows: Sequence[Row], *, loader: Callable[[Hashable], Adapter]) -> Any: ...

    def execute(self, plan: Any) -> list[RowResult]: ...

    def release(self, plan: Any) -> None: ...


class QueueFullError(RuntimeError):
    """The batcher already holds ``max_queue_rows`` rows, or its tenant half of them; the
    caller should retry later."""


@dataclass(eq=False)
class _Request:
    tenant: Hashable
    rows: list[Row]
    mode: RequestMode
    future: asyncio.Future[list[RowResult]]
    loop: asyncio.AbstractEventLoop
    # Adapters fetched by the request path because they were not resident (see ``submit``).
    adapters: dict[Hashable, Adapter] = field(default_factory=dict)
    enqueued: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=lambda: next(_arrivals))
    # Whether another request arrived within max_wait before this one (see ``_collect``).
    in_company: bool = True
    taken: int = 0  # rows handed to batches so far
    results: list[RowResult | None] = field(init=False)
    left: int = field(init=False)  # rows not computed yet
    over: bool = False  # answered with an error, or its caller went away (see ``_drop``)

    def __post_init__(self) -> None:
        self.results = [None] * len(self.rows)
        self.left = len(self.rows)


@dataclass
class _Tenant:
    """One tenant's queued requests and the tokens it has been served (its virtual counter)."""

    requests: deque[_Request] = field(default_factory=deque)
    served: int = 0
    queued: int = 0  # rows waiting, not yet in a batch (admission: at most max_queue_rows // 2)
    # Batches holding its rows and not yet finished, the one being collected included from its
    # first row of the tenant: ``_forget_idle`` keeps a tenant while any batch holds its rows.
    in_flight: int = 0


@dataclass
class _Work:
    """A batch, forming and then planned on its way to a compute thread: each row's request
    and index in it."""

    slots: list[tuple[_Request, int]] = field(default_factory=list)
    tenants: set[Hashable] = field(default_factory=set)  # counted in their ``in_flight``
    plan: Any = None  # the engine's plan, once planned


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0


class Batcher:
    def __init__(
        self,
        engine: ServingEngine,
        loader: Callable[[Hashable], Adapter],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_rows: int,
        max_batch_tokens: int | None = None,
        workers: int = 1,
        threads: int | None = None,
        policy: AutoModePolicy | None = None,
        on_batch: Callable[[int], None] | None = None,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.engine = engine
        self.loader = loader
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self.workers = max(1, workers)
        self.threads = threads
        self.policy = policy or AutoModePolicy()
        self.on_batch = on_batch
        self.on_reject = on_reject  # each request ``submit`` refuses (QueueFullError)
        self.stats = BatchStats()
        self._tenants: dict[Hashable, _Tenant] = {}
        # The least-served busy tenant's counter when a row was last taken: where a tenant
        # whose queue was empty starts again (never below what it was already served).
        self._virtual_time = 0
        self._queued_rows = 0  # parked rows included
        # Rows run again once no batch is in flight, oldest first (see the module docstring).
        self._parked: deque[tuple[_Request, int]] = deque()
        self._commands: deque[Callable[[], object]] = deque()
        self._done: deque[Any] = deque()  # computed, waiting for the owner to release them
        self._running = 0  # batches handed to compute threads and not finished
        self._cond = threading.Condition()
        self._stopping = False
        self._owner = threading.Thread(target=self._own, name="inference", daemon=True)
        # workers + 1 threads: the last lane only ever runs rows of tenants with nothing in
        # flight (see the module docstring), so at most workers + 1 batches run at once.
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._pool = [
            threading.Thread(target=self._compute_loop, name=f"inference-{i}", daemon=True)
            for i in range(self.workers + 1)
        ]
        self._fetching: dict[Hashable, asyncio.Future[Adapter]] = {}
        self._last_arrival = float("-inf")
        self._last_finished = float("-inf")  # monotonic time the last batch ended

    # --- called from the event loop / request threads ----------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def busy(self) -> bool:
        """Whether rows wait or compute, or a batch ended under :data:`BUSY_HOLD_S` ago (so
        that a stream of requests with gaps between them counts as busy throughout)."""
        if self._queued_rows or self._running:
            return True
        return time.monotonic() - self._last_finished < BUSY_HOLD_S

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

        The rows queue as their tenant's (:func:`tenant_of` the first row's key: the service
        sends one adapter per request) and are scheduled fairly against other tenants' rows
        (see the module docstring). Every row runs
        in ``mode`` (``auto``: the policy's choice for its adapter, made when the row's batch
        forms), whatever forward mode the row was built with.

        Adapters that are not resident are read and parsed here, in a worker thread, before
        the request joins the queue: a cold adapter costs its own request a database read,
        never the whole batch it lands in. The loader's errors (a deleted adapter) propagate.
        """
        if not rows:
            return []
        loop = asyncio.get_running_loop()
        adapters = await self._fetch_missing({r.key for r in rows if r.key is not None})
        tenant = tenant_of(rows[0].key)
        request = _Request(tenant, rows, mode, loop.create_future(), loop, adapters)
        with self._cond:
            if self._stopping:
                raise self._refuse("the server is shutting down")
            if self._queued_rows and self._queued_rows + len(rows) > self.max_queue_rows:
                raise self._refuse(f"{self._queued_rows} rows are already waiting")
            state = self._tenants.get(tenant)
            waiting, share = (state.queued if state is not None else 0), self.max_queue_rows // 2
            # A tenant with nothing waiting gets in whatever the request's size, as above.
            if waiting and waiting + len(rows) > share:
                raise self._refuse(
                    f"{waiting} rows of this tenant are already waiting; one tenant may hold at "
                    f"most {share}"
                )
            request.in_company = request.enqueued - self._last_arrival < self.max_wait
            self._last_arrival = request.enqueued
            if state is None:
                state = self._tenants[tenant] = _Tenant()
            if not state.requests:  # back from idle: level with the least-served busy tenant
                state.served = max(state.served, self._virtual_time)
            state.requests.append(request)
            state.queued += len(rows)
            self._queued_rows += len(rows)
            self._cond.notify()
        try:
            return await request.future
        except asyncio.CancelledError:
            with self._cond:  # its rows not yet in a batch are computed for nobody
                self._drop(request)
            raise

    def _refuse(self, reason: str) -> QueueFullError:
        """The error refusing a request (under the lock), reported to ``on_reject``."""
        if self.on_reject is not None:
            self.on_reject()
        return QueueFullError(reason)

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
        # Nothing may end this thread but stop(): without it no request is ever answered. A
        # command's error is logged; a batch's (collecting or planning it) fails its requests.
        while (step := self._next_step()) is not None:
            commands, done, work = step
            for fn in [*commands, *(partial(self.engine.release, plan) for plan in done)]:
                try:
                    fn()
                except Exception:
                    logger.exception("batcher command failed")
            if work is not None:
                self._plan(work)
        for _ in self._pool:  # queued work first, then one stop sentinel per thread
            self._work.put(None)
        for thread in self._pool:
            thread.join(timeout=30)
        for plan in self._done:
            self.engine.release(plan)

    def _next_step(
        self,
    ) -> tuple[list[Callable[[], object]], list[Any], _Work | None] | None:
        """What the owner does next: commands and plans to release, or a batch to plan (none
        if collecting it failed: its requests are answered with the error). ``None``: stop
        (stopping, nothing queued)."""
        with self._cond:
            while not (self._commands or self._done):
                if self._queued_rows and self._lane() is not None:
                    break
                if self._stopping and not self._queued_rows:
                    return None
                self._cond.wait()
            if self._commands or self._done:
                commands, done = list(self._commands), list(self._done)
                self._commands.clear()
                self._done.clear()
                return commands, done, None
            work, lane = _Work(), self._lane()
            self._running += 1  # the lane is taken until _finished frees it
            try:
                if lane == "parked":
                    self._collect_parked(work)
                else:
                    self._collect(work, only_idle=lane == "idle")
            except Exception as exc:  # a bug guard, like _plan's
                logger.exception("collecting a batch failed after %d rows", len(work.slots))
                self._finished(work, exc)
                return [], [], None
            self.stats.batches += 1
            self.stats.rows += len(work.slots)
        return [], [], work

    def _lane(self) -> str | None:
        """Which lane may take a batch now (under the lock): while rows are parked, only
        theirs (``parked``), once no batch is in flight; else a ``worker``; when every worker
        is busy, the ``idle`` lane, if the tenant whose row is next has nothing in flight;
        or none."""
        if self._parked:
            return None if self._running else "parked"
        if self._running < self.workers:
            return "worker"
        if self._running == self.workers and self._next_row(only_idle=True) is not None:
            return "idle"
        return None

    def _collect(self, work: _Work, only_idle: bool) -> None:
        """Fill ``work`` with one batch's rows (under the lock), taken fairly across tenants.

        ``only_idle``: while the next row's tenant has no other batch in flight, without
        waiting for company.
        """
        longest = 0
        deadline: float | None = None
        while len(work.slots) < self.max_batch_size:
            picked = self._next_row(only_idle, work)
            if picked is not None:
                tenant, request = picked
                row = request.rows[request.taken]
                tokens = _tokens(row, self.engine.base.max_length)
                if self._full(work, max(longest, tokens)):
                    break
                self._take(work, tenant, request, tokens)
                longest = max(longest, tokens)
                if deadline is None:
                    # Waiting pays only when company is likely: a request that arrived alone
                    # (nothing else in the max_wait before it, e.g. one client at a time) runs
                    # at once instead of idling max_wait; under load requests arrive close
                    # together and wait as set.
                    wait = self.max_wait if request.in_company and not only_idle else 0.0
                    deadline = request.enqueued + wait
                continue
            if deadline is None:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                break
            self._cond.wait(remaining)

    def _collect_parked(self, work: _Work) -> None:
        """Fill ``work`` with parked rows, oldest first (under the lock, nothing in flight)."""
        longest = 0
        while self._parked and len(work.slots) < self.max_batch_size:
            request, i = self._parked[0]
            tokens = _tokens(request.rows[i], self.engine.base.max_length)
            if self._full(work, max(longest, tokens)):
                break
            self._parked.popleft()
            self._queued_rows -= 1
            # Its tenant was charged the row's tokens when the row was first taken.
            self._join(work, request)
            work.slots.append((request, i))
            longest = max(longest, tokens)

    def _full(self, work: _Work, longest: int) -> bool:
        """Whether one more row, ``longest`` the longest of them, would pass the batch's
        token budget (padded: rows x the longest); a row longer than the budget runs alone."""
        padded = (len(work.slots) + 1) * longest
        return bool(work.slots) and bool(self.max_batch_tokens) and padded > self.max_batch_tokens

    def _next_row(
        self, only_idle: bool, collecting: _Work | None = None
    ) -> tuple[_Tenant, _Request] | None:
        """The least-served tenant with a row queued, and its oldest request (under the lock);
        ``only_idle``: none if that tenant has a batch in flight besides ``collecting``. Rows
        are taken in this one order whichever lane takes them, so the shares stay fair."""
        best: tuple[int, int, _Tenant, _Request] | None = None
        for state in self._tenants.values():
            if state.requests:
                head = state.requests[0]
                if best is None or (state.served, head.seq) < best[:2]:
                    best = (state.served, head.seq, state, head)
        if best is None:
            return None
        _, _, state, head = best
        if only_idle:
            this_batch = collecting is not None and head.tenant in collecting.tenants
            if state.in_flight > this_batch:
                return None
        return state, head

    def _take(self, work: _Work, state: _Tenant, request: _Request, tokens: int) -> None:
        """Move ``request``'s next row into ``work`` (under the lock)."""
        self._join(work, request)
        work.slots.append((request, request.taken))
        self._virtual_time = max(self._virtual_time, state.served)
        state.served += tokens
        request.taken += 1
        state.queued -= 1
        self._queued_rows -= 1
        if request.taken == len(request.rows):
            state.requests.popleft()

    def _join(self, work: _Work, request: _Request) -> None:
        """Count ``work`` in the batches in flight of ``request``'s tenant (under the lock)."""
        if request.tenant not in work.tenants:
            work.tenants.add(request.tenant)
            # From now on, not forgotten (the lock is let go in _collect). A tenant whose only
            # rows were parked may have been forgotten: it comes back with nothing queued.
            self._tenants.setdefault(request.tenant, _Tenant()).in_flight += 1

    def _drop(self, request: _Request) -> None:
        """A request is over, failed or abandoned (under the lock): its rows not yet in a batch
        leave the queue, and rows of it still computing are ignored when they finish."""
        request.over = True
        state = self._tenants.get(request.tenant)
        if state is not None and request in state.requests:
            state.requests.remove(request)
            state.queued -= len(request.rows) - request.taken
            self._queued_rows -= len(request.rows) - request.taken
        parked = len(self._parked)
        self._parked = deque(p for p in self._parked if p[0] is not request)
        self._queued_rows -= parked - len(self._parked)

    def _plan(self, work: _Work) -> None:
        fetched: dict[Hashable, Adapter] = {}
        for request in {request for request, _ in work.slots}:
            fetched.update(request.adapters)

        def load(key: Hashable) -> Adapter:
            adapter = fetched.get(key)
            return adapter if adapter is not None else self.loader(key)  # evicted meanwhile

        try:
            if self.on_batch is not None:
                self.on_batch(len(work.slots))
            rows = [self._resolve_mode(request.rows[i], request.mode) for request, i in work.slots]
            work.plan = self.engine.plan(rows, loader=load)
        except Exception as exc:  # the engine isolates row errors; this is a bug guard
            logger.exception("planning a batch of %d rows failed", len(work.slots))
            self._finished(work, exc)
            return
        self._work.put(work)

    def _finished(self, work: _Work, outcome: list[RowResult] | BaseException) -> None:
        """Back from collecting, planning or computing (any thread): each row's result goes to
        its request (a row refused for room in the adapter cache is parked instead), requests
        with every row computed (or one failed) are answered, the owner releases the plan, and
        the lane and the batch's tenants are free."""
        from core.inference.residency import ResidencyBusyError

        answered: list[tuple[_Request, list[RowResult] | BaseException]] = []
        with self._cond:
            for n, (request, i) in enumerate(work.slots):
                if request.over:
                    continue
                if isinstance(outcome, BaseException):
                    self._drop(request)
                    answered.append((request, outcome))
                    continue
                if isinstance(outcome[n].error, ResidencyBusyError):
                    self._parked.append((request, i))
                    self._queued_rows += 1
                    continue
                request.results[i] = outcome[n]
                request.left -= 1
                if not request.left:
                    answered.append((request, [r for r in request.results if r is not None]))
            if work.plan is not None:
                self._done.append(work.plan)
            self._running -= 1
            self._last_finished = time.monotonic()
            for tenant in work.tenants:
                self._tenants[tenant].in_flight -= 1
            self._forget_idle()
            self._cond.notify()
        for request, outcome in answered:
            _resolve(request, outcome)

    def _forget_idle(self) -> None:
        """Drop tenants with nothing queued or in flight whose counter carries nothing: one
        at or below the virtual time is lifted to it on their next request anyway."""
        for tenant in [
            t
            for t, s in self._tenants.items()
            if not s.requests and not s.in_flight and s.served <= self._virtual_time
        ]:
            del self._tenants[tenant]

    # --- compute threads -------------------------------------------------------------------------

    def _compute_loop(self) -> None:
        if self.threads:
            from core.hardware import set_thread_torch_threads

            set_thread_torch_threads(self.threads)
        while (work := self._work.get()) is not None:
            assert work.plan is not None
            try:
                results = self.engine.execute(work.plan)
            except Exception as exc:  # the engine isolates row errors; this is a bug guard
                logger.exception("a batch of %d rows failed", len(work.slots))
                self._finished(work, exc)
            else:
                self._finished(work, results)

    def _resolve_mode(self, row: Row, mode: RequestMode) -> Row:
        self.policy.observe(row.key)
        forward = self.policy.mode_for(row.key) if mode == "auto" else mode
        return row if row.mode == forward else replace(row, mode=forward)


def tenant_of(key: Hashable | None) -> Hashable | None:
    """Whose queue a row joins: the tenant of a service key ``(tenant_id, name, version)``.
    Core's callers and tests use other keys: each such adapter queues as its own tenant, and
    bare-base rows (``None``) share one queue."""
    return key[0] if isinstance(key, tuple) else key


def _tokens(row: Row, window: int) -> int:
    """What a row costs a forward, in tokens: its ids, or the whole window for a row given as
    bare text (core's callers), which the engine tokenizes only when planning."""
    return len(row.encoded.input_ids) if row.encoded is not None else window


def _resolve(request: _Request, outcome: list[RowResult] | BaseException) -> None:
    def settle() -> None:
        if request.future.done():  # the client went away
            return
        if isinstance(outcome, BaseException):
            request.future.set_exception(outcome)
        else:
            request.future.set_result(outcome)

    # RuntimeError: its event loop is closed, so nobody is waiting for the answer.
    with contextlib.suppress(RuntimeError):
        request.loop.call_soon_threadsafe(settle)
