"""The app factory and its lifespan.

Start-up order: migrate the database → bootstrap the default tenant → run the lifespan hooks
in order (each may start something and must stop it on exit; they exit in reverse order).

LEAD: the base model, the inference batcher and the embedded worker are started by hooks
appended to :data:`LIFESPAN_HOOKS` (or passed to ``create_app(hooks=...)``). A hook is a
function ``hook(state) -> async context manager`` given the app's :class:`AppState`: it finds
the settings and the session factory there, reports readiness through ``state.readiness``
and sets the fields it owns (``service.serving.lifespan.serving`` is the real one; in short)::

    @asynccontextmanager
    async def load_base_model(state: AppState) -> AsyncIterator[None]:
        state.readiness.expect("model")
        state.base_model = await run_in_threadpool(core.base.load_base_model, ...)
        state.readiness.ready("model")
        yield
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api.errors import install_error_handlers
from service.api.middleware import BodyLimit, BodySizeLimitMiddleware
from service.api.openapi import install_openapi
from service.api.routes import api_router
from service.api.routes.docs import install_docs
from service.api.schemas.inference import max_body_bytes
from service.config import Settings
from service.db.migrate import upgrade
from service.db.session import db_engine_for, make_sessionmaker
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
from service.state import AppState, install_state
from service.tenants.bootstrap import bootstrap_default_tenant, ensure_default_tenant
from service.worker.embedded import embedded_worker

logger = logging.getLogger(__name__)

LifespanHook = Callable[[AppState], AbstractAsyncContextManager[None]]

# In start order: the base model + inference thread, the adapter invalidation listener
# (PostgreSQL only: drops resident adapters changed by other replicas), then the embedded
# worker (a child process, only when settings.embedded_worker). Nothing imports torch before
# these run.
LIFESPAN_HOOKS: list[LifespanHook] = [serving, invalidation, embedded_worker]

# Multipart framing (boundaries, part headers, small fields) on top of the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024
# The body of any route without a limit of its own (a job, a tenant, a key): small.
SMALL_BODY_BYTES = 1024 * 1024
# Routes that take a file (multipart) or a dataset's JSON records: max_upload_mb.
UPLOAD_PATHS = ("/v1/datasets", "/v1/datasets/validate", "/v1/files")
# An adapter archive: max_import_mb, so the export of the largest adapter trained here fits.
IMPORT_PATH = "/v1/adapters/import"
INFERENCE_PATHS = ("/predict", "/reward/compare")

API_VERSION = "0.1.0"


def _startup(state: AppState) -> None:
    """Blocking start-up steps, run in a thread so the event loop stays free."""
    settings = state.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    factory = state.sessionmaker
    bootstrap_default_tenant(factory, settings.default_key_path)  # logs the key file's path
    if settings.auth_disabled:
        state.default_tenant_id = ensure_default_tenant(factory)
        logger.warning(
            "authentication is DISABLED (loopback only): every request acts as the default tenant"
        )


def body_limits(settings: Settings) -> dict[str, BodyLimit]:
    """Each route's body limit: an upload's is ``max_upload_mb`` exactly (a dataset's JSON
    body) or that plus multipart framing (a form's file is capped by the route); an
    inference request's is what its largest valid body needs."""
    upload = BodyLimit(settings.max_upload_bytes, multipart_overhead=MULTIPART_OVERHEAD_BYTES)
    adapter = BodyLimit(settings.max_import_bytes, multipart_overhead=MULTIPART_OVERHEAD_BYTES)
    inference = BodyLimit(max_body_bytes(settings.max_request_chars))
    return (
        {path: upload for path in UPLOAD_PATHS}
        | {IMPORT_PATH: adapter}
        | {path: inference for path in INFERENCE_PATHS}
    )


def create_app(
    settings: Settings | None = None, *, hooks: Sequence[LifespanHook] | None = None
) -> FastAPI:
    settings = settings or Settings()
    hook_list = list(LIFESPAN_HOOKS if hooks is None else hooks)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_startup, state)
        try:
            async with AsyncExitStack() as stack:
                for hook in hook_list:
                    await stack.enter_async_context(hook(state))
                yield
        finally:
            state.db_engine.dispose()

    app = FastAPI(
        title="loraplex",
        version=API_VERSION,
        description="Multi-tenant adapter fine-tuning and serving on one frozen encoder.",
        lifespan=lifespan,
        # Served by install_docs from packaged files instead of FastAPI's CDN-backed pages.
        docs_url=None,
        redoc_url=None,
    )
    db_engine = db_engine_for(settings)
    state = AppState(
        settings=settings,
        db_engine=db_engine,
        sessionmaker=make_sessionmaker(db_engine),
        readiness=Readiness(),
        metrics=ServiceMetrics(),
        # Exact only where this process sees every write: one API process on SQLite.
        lookup_cache=LookupCache() if db_engine.dialect.name == "sqlite" else None,
    )
    install_state(app, state)
    state.metrics.add_collector(JobCollector(state.sessionmaker))
    if state.lookup_cache is not None:
        state.metrics.add_collector(LookupCacheCollector(state.lookup_cache))

    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimitMiddleware,
        routes=body_limits(settings),
        default=BodyLimit(SMALL_BODY_BYTES),
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    app.include_router(api_router)
    install_docs(app)
    install_openapi(app)
    return app
