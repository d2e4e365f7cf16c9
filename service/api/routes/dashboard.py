"""The dashboard: a static page in ``service/dashboard/``, served at ``/dashboard/``.

Plain files, no build step: ``index.html``, ES modules and a stylesheet. The page signs in
with an API key (kept in the browser's session storage, sent as ``Authorization: Bearer``)
and calls the same API as any client. These routes need no key: they serve no data.

Only the files listed in :data:`ASSETS` are served (no path from the URL reaches the disk),
each with a strict Content-Security-Policy: scripts, styles and connections to this origin
only, no inline script or style, no framing.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from service.errors import not_found

router = APIRouter(include_in_schema=False)

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "dashboard"

ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "chart.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "records.js": "text/javascript; charset=utf-8",
    "widgets.js": "text/javascript; charset=utf-8",
    "schema-field.js": "text/javascript; charset=utf-8",
    "login.js": "text/javascript; charset=utf-8",
    "jobs.js": "text/javascript; charset=utf-8",
    "new-job.js": "text/javascript; charset=utf-8",
    "adapters.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "compare.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Small files: revalidate each load, so an upgraded server never runs an old page.
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise not_found("file", name)
    body = (DASHBOARD_DIR / name).read_bytes()
    return Response(body, media_type=media_type, headers=SECURITY_HEADERS)


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard")
def dashboard_redirect() -> RedirectResponse:
    return RedirectResponse("/dashboard/", status_code=307)


@router.get("/dashboard/")
def dashboard_index() -> Response:
    return _asset("index.html")


@router.get("/dashboard/{name}")
def dashboard_asset(name: str) -> Response:
    return _asset(name)
