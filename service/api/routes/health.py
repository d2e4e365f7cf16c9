"""Liveness and readiness probes (no auth: orchestrators call them)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.deps import SessionFactoryDep
from service.api.errors import UNAVAILABLE, error_body
from service.state import app_state

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    summary="Liveness probe",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
def healthz() -> dict[str, str]:
    """Answers 200 while the process is up and serving requests. Needs no API key."""
    return {"status": "ok"}


_READY_EXAMPLE = {"status": "ready", "checks": {"database": "ok", "model": "ok"}}


@router.get(
    "/readyz",
    summary="Readiness probe",
    responses={
        200: {"content": {"application/json": {"example": _READY_EXAMPLE}}},
        503: {"description": "Not ready: the error names the failing checks, `checks` has all."},
    },
)
def readyz(request: Request, factory: SessionFactoryDep) -> Any:
    """Answers 200 once the database answers and every part started with the server (the
    base model, the inference thread, the embedded worker) is ready; 503 with the state of each
    check otherwise. Needs no API key."""
    checks = {"database": "ok", **app_state(request).readiness.snapshot()}
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


# HEAD too, with GET's status (some load balancers and uptime checks probe with it; it was a
# 405). Not in the OpenAPI document, where it would repeat GET's operation.
for _path, _probe in (("/healthz", healthz), ("/readyz", readyz)):
    router.add_api_route(_path, _probe, methods=["HEAD"], include_in_schema=False)
