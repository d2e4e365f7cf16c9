"""``GET /metrics``: Prometheus text format, unauthenticated like /healthz (counts only)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.state import app_state

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(
        generate_latest(app_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
