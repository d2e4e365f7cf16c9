"""The app factory and its lifespan.

Start-up order: migrate the database → bootstrap the default tenant → run the lifespan hooks
in order (each may start something and must stop it on exit; they exit in reverse order).

LEAD: the base model, the inference batcher and the embedded worker are started by hooks
appended to :data:`LIFESPAN_HOOKS` (or passed to ``create_app(hooks=...)``). A hook is a
function ``hook(app) -> async context manager``; it finds the settings and the session
factory on ``app.state`` and reports readiness through ``app.state.readiness``::

    @asynccontextmanager
    async def load_base_model(app: FastAPI) -> AsyncIterator[None]:
        app.state.readiness.expect("model")
        app.state.base_model = await run_in_threadpool(core.base.load, ...)
        app.state.readiness.ready("model")
        yield
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api.errors import install_error_handlers
from service.api.middleware import BodySizeLimitMiddleware
from service.api.routes import api_router
from service.api.routes.docs import install_docs
from service.config import Settings
from service.db.migrate import upgrade
from service.db.session import make_engine, make_sessionmaker
from service.observability.metrics import (
    JobCollector,
    LookupCacheCollector,
    MetricsMiddleware,
    ServiceMetrics,
)
from service.readiness import Readiness
from service.serving.invalidation import invalidation
from service.serving.lifespan import serving
from service.serving.lookups import LookupCache
from service.tenants.bootstrap import bootstrap_default_tenant, ensure_default_tenant
from service.worker.embedded import embedded_worker

logger = logging.getLogger(__name__)

LifespanHook = Callable[[FastAPI], AbstractAsyncContextManager[None]]

# In start order: the base model + inference thread, the adapter invalidation listener
# (PostgreSQL only: drops resident adapters changed by other replicas), then the embedded
# worker (a child process, only when settings.embedded_worker). Nothing imports torch before
# these run.
LIFESPAN_HOOKS: list[LifespanHook] = [serving, invalidation, embedded_worker]

# Multipart framing (boundaries, part headers, small fields) on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024

API_VERSION = "0.1.0"


def _startup(app: FastAPI) -> None:
    """Blocking start-up steps, run in a thread so the event loop stays free."""
    settings: Settings = app.state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    factory = app.state.sessionmaker
    bootstrap_default_tenant(factory, settings.default_key_path)  # logs the key file's path
    if settings.auth_disabled:
        app.state.default_tenant_id = ensure_default_tenant(factory)
        logger.warning(
            "authentication is DISABLED (loopback only): every request acts as the default tenant"
        )


def create_app(
    settings: Settings | None = None, *, hooks: Sequence[LifespanHook] | None = None
) -> FastAPI:
    settings = settings or Settings()
    hook_list = list(LIFESPAN_HOOKS if hooks is None else hooks)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_startup, app)
        try:
            async with AsyncExitStack() as stack:
                for hook in hook_list:
                    await stack.enter_async_context(hook(app))
                yield
        finally:
            app.state.engine.dispose()

    app = FastAPI(
        title="loraplex",
        version=API_VERSION,
        description="Multi-tenant adapter fine-tuning and serving on one frozen encoder.",
        lifespan=lifespan,
        # Served by install_docs from packaged files instead of FastAPI's CDN-backed pages.
        docs_url=None,
        redoc_url=None,
    )
    engine = make_engine(settings.db_url, sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessionmaker = make_sessionmaker(engine)
    # Exact only where this process sees every write: one API process on SQLite.
    app.state.lookup_cache = LookupCache() if engine.dialect.name == "sqlite" else None
    app.state.readiness = Readiness()
    app.state.default_tenant_id = None
    app.state.metrics = ServiceMetrics()
    app.state.metrics.add_collector(JobCollector(app.state.sessionmaker))
    if app.state.lookup_cache is not None:
        app.state.metrics.add_collector(LookupCacheCollector(app.state.lookup_cache))

    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES,
        reported_limit_bytes=settings.max_upload_bytes,
    )
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.include_router(api_router)
    install_docs(app)
    return app
