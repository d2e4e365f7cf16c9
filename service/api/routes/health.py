"""Liveness and readiness probes (no auth: orchestrators call them)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import SessionFactoryDep
from service.api.errors import UNAVAILABLE, error_body
from service.readiness import Readiness

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready"}})
def readyz(request: Request, factory: SessionFactoryDep) -> Any:
    """The database answers and every part started by the lifespan hooks is ready."""
    readiness: Readiness = request.app.state.readiness
    checks = {"database": "ok", **readiness.snapshot()}
    try:
        with factory() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready", never a 500
        logger.warning("readiness: database check failed: %s", exc)
        checks["database"] = "unreachable"
    failing = [name for name, state in checks.items() if state != "ok"]
    if failing:
        body = error_body(f"Not ready: {', '.join(failing)}.", UNAVAILABLE, None, "not_ready")
        return JSONResponse({**body, "checks": checks}, status_code=503)
    return {"status": "ready", "checks": checks}
