"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc), with their files served by this server.

FastAPI's default pages load Swagger UI and ReDoc from a CDN, so they are blank on a machine
without internet access. The files come from the ``fastapi-offline`` package instead (Swagger
UI 5, ReDoc 2) and are served under :data:`ASSETS_URL`, following FastAPI's self-hosting recipe
(https://fastapi.tiangolo.com/how-to/custom-docs-ui-assets/). Like the OpenAPI document itself,
these pages need no API key: they hold no data. (No OAuth2 redirect page: keys are bearer
tokens, typed into Swagger UI's "Authorize" dialog.)
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs/assets"
# swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js and favicon.png.
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI) -> None:
    """Add the two documentation pages and their assets; create the app with
    ``docs_url=None, redoc_url=None`` so FastAPI's CDN-backed pages are not added too."""
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")

    def _url(request: Request, path: str) -> str:
        # Behind a proxy that mounts the API under a prefix, every URL the page loads carries it.
        return f"{request.scope.get('root_path', '')}{path}"

    # The pages read the app from the request, not from this closure: FastAPI keeps every
    # endpoint it has inspected in a module-level cache (4096 entries, dependencies/models.py),
    # so an endpoint that closed over its app would keep that app, and whatever its lifespan
    # left in its state, alive after shutdown.
    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        this: FastAPI = request.app
        return get_swagger_ui_html(
            openapi_url=_url(request, this.openapi_url or "/openapi.json"),
            title=f"{this.title} - Swagger UI",
            swagger_js_url=_url(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=_url(request, f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=_url(request, f"{ASSETS_URL}/favicon.png"),
            swagger_ui_parameters=this.swagger_ui_parameters,
        )

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        this: FastAPI = request.app
        return get_redoc_html(
            openapi_url=_url(request, this.openapi_url or "/openapi.json"),
            title=f"{this.title} - ReDoc",
            redoc_js_url=_url(request, f"{ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=_url(request, f"{ASSETS_URL}/favicon.png"),
            with_google_fonts=False,
        )
