"""The application's state: one typed object instead of loose attributes on ``app.state``.

:func:`service.main.create_app` builds an :class:`AppState` and installs it on the app; routes
and dependencies reach it with :func:`app_state` (``StateDep`` in :mod:`service.api.deps`),
lifespan hooks receive it as their argument. Fields are in three groups by who sets them and
when:

- created with the app (``create_app``), never reassigned: settings, the database, readiness,
  metrics, the lookup cache;
- set during start-up, before the first request: the default tenant (``_startup``, only
  with auth disabled), then what each lifespan hook starts; ``None`` until then, for good
  where that hook is not installed (``create_app(hooks=[])`` in tests), and again once the
  serving hook has stopped (it lets go of the bases and the KV caches);
- set by ``loraplex serve`` before uvicorn runs: its server.

A hook part that a request needs (the bases, the encoder's batcher) is read through a
``require_*`` method, which answers 503 ``model_not_ready`` while it is missing (and 400
``no_encoder_base`` for an encoder part that a deployment without an encoder never has).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from starlette.requests import HTTPConnection

from service.errors import ErrorKind, ServiceError, not_found, unavailable

if TYPE_CHECKING:  # the serving types import torch; the state only names them
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker
    from starlette.applications import Starlette
    from starlette.types import ASGIApp

    from core.base import FrozenBase
    from core.decoder.base import DecoderBase
    from service.bases import Bases
    from service.config import Settings
    from service.observability.metrics import ServiceMetrics
    from service.readiness import Readiness
    from service.serving.batcher import Batcher
    from service.serving.decoder_scoring import DecoderScorer
    from service.serving.generation import GenerationServer
    from service.serving.invalidation import InvalidationListener
    from service.serving.lookups import LookupCache
    from service.serving.run import RequestTokenizer

T = TypeVar("T")

# The one attribute of Starlette's untyped ``app.state`` this service uses.
_ATTRIBUTE = "loraplex"


class ShutdownSignal(Protocol):
    """What long-lived responses need of uvicorn's ``Server``: the flag it sets on shutdown."""

    should_exit: bool


@dataclass
class AppState:
    # --- created with the app -------------------------------------------------------------
    settings: Settings
    # SQLAlchemy's engine (the inference engine lives in the batcher); disposed on shutdown.
    db_engine: Engine
    sessionmaker: sessionmaker[Session]
    # What /readyz reports; each lifespan hook expects its part and marks it ready.
    readiness: Readiness
    # The Prometheus registry behind /metrics; hooks add their collectors to it.
    metrics: ServiceMetrics
    # Caller and adapter lookups for the inference routes; None where another process may
    # write (anything but SQLite), since then the cache could not be kept exact.
    lookup_cache: LookupCache | None

    # --- set during start-up --------------------------------------------------------------
    # The default tenant every request acts as with auth disabled (set by start-up then);
    # None with authentication on.
    default_tenant_id: str | None = None
    # The serving hook (service.serving.lifespan): every configured base by name, the encoder
    # among them (None in a decoder-only deployment), the input-length check and the batcher
    # that owns the inference engine. Test hooks may set the base model alone.
    bases: Bases | None = None
    base_model: FrozenBase | None = None
    request_tokenizer: RequestTokenizer | None = None
    batcher: Batcher | None = None
    # Generation (/v1/chat/completions): a scheduler owner thread per decoder base, by name.
    generation: dict[str, GenerationServer] | None = None
    # A decoder's classifiers and reward models (/predict, /reward/compare, best-of-n's
    # scores): a DecoderScorer per decoder base, by name.
    decoder_scoring: dict[str, DecoderScorer] | None = None
    # The invalidation hook: listens for other replicas' adapter changes (PostgreSQL only).
    invalidation_listener: InvalidationListener | None = None
    # The embedded worker hook: its child process's pid while one runs (generation borrows
    # its cores while it idles, service.serving.cores).
    worker_pid: int | None = None

    # --- set by ``loraplex serve`` --------------------------------------------------------
    # Job event streams end themselves once this says the server is shutting down.
    uvicorn_server: ShutdownSignal | None = None

    def require_base_model(self) -> FrozenBase:
        """The encoder the encoder routes (/predict, /reward/compare) run on."""
        return self._encoder_part(self.base_model)

    def require_request_tokenizer(self) -> RequestTokenizer:
        return self._encoder_part(self.request_tokenizer)

    def require_batcher(self) -> Batcher:
        return self._encoder_part(self.batcher)

    def require_bases(self) -> Bases:
        return _started(self.bases)

    def require_base(self, name: str) -> FrozenBase | DecoderBase:
        """The loaded base ``name``: 503 while the bases load, 404 for ``model`` if unknown."""
        bases = _started(self.bases)
        if name not in bases:
            raise not_found("model", name, "model")
        return bases[name]

    def _encoder_part(self, part: T | None) -> T:
        """A part of the encoder's serving: 503 while the bases load; once they are loaded
        without an encoder (a decoder-only deployment), 400, since waiting would not help."""
        if part is None and self.bases is not None and self.bases.encoder is None:
            raise ServiceError(
                "This deployment loads no encoder base (its bases: "
                f"{', '.join(self.bases)}), so the encoder routes (/predict, /reward/compare) "
                "are unavailable; a decoder's adapters are served by /v1/chat/completions.",
                code="no_encoder_base",
                kind=ErrorKind.UNSUPPORTED,
            )
        return _started(part)


def _started(part: T | None) -> T:
    if part is None:  # the serving hook has not finished (or is not installed)
        raise unavailable(
            "The base model is still loading; retry shortly.", "model_not_ready", retry_after=5
        )
    return part


def install_state(app: Starlette, state: AppState) -> None:
    setattr(app.state, _ATTRIBUTE, state)


def app_state(owner: HTTPConnection | ASGIApp) -> AppState:
    """The state of the app that ``owner`` is, or that serves the request ``owner``.

    Takes any ASGI app so tests can pass ``TestClient.app``, which Starlette types as one.
    """
    app = owner.app if isinstance(owner, HTTPConnection) else owner
    state = getattr(getattr(app, "state", None), _ATTRIBUTE, None)
    if not isinstance(state, AppState):
        raise TypeError(f"{app!r} has no AppState: build it with service.main.create_app")
    return state
