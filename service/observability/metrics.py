"""Prometheus metrics for ``GET /metrics``.

Each app gets its own registry (tests create many apps in one process). Counters that other
components already keep — the engine's cache statistics, job rows in the database — are read
at scrape time by a collector instead of being mirrored into a second set of counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.db.models import Job, JobStatus
from service.serving.lookups import LookupCache

if TYPE_CHECKING:  # imports torch; this module is imported by the API
    from service.serving.generation import GenerationServer

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraplex_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "loraplex_http_request_duration_seconds",
            "HTTP request latency by route template and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "loraplex_batch_rows",
            "Rows per inference batch.",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_rows = Gauge(
            "loraplex_queue_rows", "Rows waiting to join a batch.", registry=self.registry
        )
        self.rejected = Counter(
            "loraplex_queue_rejected_requests",
            "Requests refused with 503 because the queue was full.",
            registry=self.registry,
        )
        self._engine_stats: EngineCollector | None = None

    def watch_engine(self, stats: Callable[[], Any], queued_rows: Callable[[], int]) -> None:
        """The encoder engine's cache statistics and its batcher's queue, read at scrape time."""
        self._engine_stats = EngineCollector(stats)
        self.registry.register(self._engine_stats)
        self.queue_rows.set_function(queued_rows)

    def unwatch_engine(self) -> None:
        """Let go of the engine and its batcher (the serving hook has stopped them): an app
        outlives its lifespan wherever something holds it, and so would they, through these
        functions."""
        if self._engine_stats is not None:
            self.registry.unregister(self._engine_stats)
            self._engine_stats = None
        self.queue_rows.set_function(lambda: 0)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)


class EngineCollector(Collector):
    """Adapter cache statistics straight from the engine (plain ints; reading them is safe)."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        for name, value, help_ in (
            ("hits", s.hits, "Rows whose adapter was already resident."),
            ("misses", s.misses, "Rows whose adapter had to be loaded."),
            ("evictions", s.evictions, "Adapters evicted to stay within the memory budget."),
            ("loads", s.loads, "Adapters loaded into memory."),
        ):
            yield CounterMetricFamily(f"loraplex_adapter_cache_{name}", help_, value=value)
        yield GaugeMetricFamily(
            "loraplex_adapter_resident_bytes", "Bytes of resident adapters.", s.resident_bytes
        )
        yield GaugeMetricFamily(
            "loraplex_adapter_resident_count", "Resident adapters.", s.resident_count
        )
        yield GaugeMetricFamily(
            "loraplex_merged_cache_bytes", "Bytes of merged LoRA weights.", s.merged_cache_bytes
        )


class GenerationCollector(Collector):
    """Each decoder base's scheduler (/v1/chat/completions), read at scrape time: plain ints
    its owner thread writes, so reading them is safe."""

    def __init__(self, servers: Mapping[str, GenerationServer]) -> None:
        self._servers = servers

    def collect(self) -> Iterator[Any]:
        gauges = (
            ("running_sequences", "Sequences generating now.", lambda s: s.running),
            ("waiting_requests", "Requests waiting for free sequence slots.", lambda s: s.waiting),
            ("free_slots", "KV-cache slots free for new sequences.", lambda s: s.free_slots),
            (
                "merged_bytes",
                "Bytes of the one adapter's merged copy held for merged decode steps.",
                lambda s: s.merged_copy_bytes,
            ),
            (
                "prefix_cache_blocks",
                "Blocks of the prefix cache holding a prompt prefix's keys and values.",
                lambda s: s.prefixes.used if s.prefixes is not None else 0,
            ),
            (
                "prefix_cache_capacity_blocks",
                "Blocks the prefix cache holds at most (its memory budget; 0 when off).",
                lambda s: s.prefixes.capacity if s.prefixes is not None else 0,
            ),
            (
                "adapter_copy_bytes",
                "Bytes of the running adapters' LoRA pairs copied into the decode step's layout.",
                lambda s: s.adapters.gathered.num_bytes,
            ),
        )
        counters = (
            ("tokens", "Tokens generated (stop tokens included).", lambda s: s.generated_tokens),
            ("prefill_tokens", "Prompt tokens prefilled (once for n).", lambda s: s.prefill_tokens),
            (
                "prefix_cached_tokens",
                "Prompt tokens copied from the prefix cache instead of prefilled (once for n).",
                lambda s: s.prefixes.hit_tokens if s.prefixes is not None else 0,
            ),
            ("cancelled_sequences", "Sequences cancelled.", lambda s: s.cancelled_sequences),
            ("merges", "Merged adapter copies built.", lambda s: s.merges),
            ("merge_seconds", "Seconds spent building merged copies.", lambda s: s.merge_seconds),
            (
                "merged_prefills",
                "Prefill passes run on a merged copy (every prompt of the pass on its adapter).",
                lambda s: s.merged_prefills,
            ),
            (
                "adapter_copies",
                "Adapters' LoRA pairs copied into the decode step's layout: one per adapter that "
                "starts running, every running one when the bank adds a site or grows a rank.",
                lambda s: s.adapters.gathered.copies,
            ),
        )
        for name, help_, read in gauges:
            family = GaugeMetricFamily(f"loraplex_generation_{name}", help_, labels=["base"])
            for base, server in self._servers.items():
                family.add_metric([base], read(server.scheduler))
            yield family
        for name, help_, read in counters:
            counter = CounterMetricFamily(f"loraplex_generation_{name}", help_, labels=["base"])
            for base, server in self._servers.items():
                counter.add_metric([base], read(server.scheduler))
            yield counter
        steps = CounterMetricFamily(
            "loraplex_generation_decode_steps",
            "Decode steps, on one adapter's merged copy or on the base's weights plus each "
            "row's LoRA delta.",
            labels=["base", "weights"],
        )
        for base, server in self._servers.items():
            steps.add_metric([base, "merged"], server.scheduler.merged_steps)
            steps.add_metric([base, "unmerged"], server.scheduler.unmerged_steps)
        yield steps
        threads = GaugeMetricFamily(
            "loraplex_generation_step_threads",
            "Torch threads the last generation step computed on: the budget, or more while it "
            "borrowed the idle embedded worker's cores (in bf16 on an AMX CPU its passes of "
            "fewer than 768 tokens run on one).",
            labels=["base"],
        )
        for base, server in self._servers.items():
            threads.add_metric([base], server.step_threads)
        yield threads


class LookupCacheCollector(Collector):
    """The inference request path's lookups answered from memory (SQLite only)."""

    def __init__(self, cache: LookupCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "loraplex_lookup_cache_hits",
            "Inference requests whose key and adapter were known without a query.",
            value=self._cache.hits,
        )
        yield CounterMetricFamily(
            "loraplex_lookup_cache_misses",
            "Inference requests that looked their key and adapter up in the database.",
            value=self._cache.misses,
        )


class JobCollector(Collector):
    """Jobs by status and the training speed of running jobs, from the database."""

    def __init__(self, factory: sessionmaker[Session]) -> None:
        self._factory = factory

    def collect(self) -> Iterator[Any]:
        by_status = GaugeMetricFamily("loraplex_jobs", "Jobs by status.", labels=["status"])
        # Summed: /metrics answers without a key, and a label per job showed every tenant's
        # running job ids (a new series per job, too). A job's own rate is in its metrics.
        speed = GaugeMetricFamily(
            "loraplex_training_steps_per_second",
            "Optimizer steps per second of the running jobs, together.",
        )
        with self._factory() as session:
            counts = dict(
                session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
            )
            running = session.scalars(
                select(Job.metrics).where(Job.status == JobStatus.RUNNING)
            ).all()
        for status in JobStatus:
            by_status.add_metric([status.value], counts.get(status.value, 0))
        rates = ((metrics or {}).get("steps_per_second") for metrics in running)
        speed.add_metric([], sum(r for r in rates if isinstance(r, int | float)))
        yield by_status
        yield speed


class MetricsMiddleware:
    """Counts and times every request under its route template (``/v1/jobs/{job_id}``)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            labels = (template, scope.get("method", ""), str(status["code"]))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - start)
