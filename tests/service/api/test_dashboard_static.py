"""The dashboard's files: served from the service, locked down by CSP, nothing from outside.

The page itself is tested in a real browser by ``tests/e2e/test_dashboard.py``.
"""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.api.routes.dashboard import ASSETS, DASHBOARD_DIR


def test_root_and_bare_path_redirect_to_the_dashboard(client: TestClient) -> None:
    for path in ("/", "/dashboard"):
        resp = client.get(path, follow_redirects=False)
        assert resp.status_code == 307 and resp.headers["location"] == "/dashboard/"


def test_every_asset_is_served_with_a_strict_policy(client: TestClient) -> None:
    for name, media_type in {"": ASSETS["index.html"], **ASSETS}.items():
        resp = client.get(f"/dashboard/{name}")  # no key needed: these files hold no data
        assert resp.status_code == 200, name
        assert resp.headers["content-type"] == media_type
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp
        assert resp.headers["x-content-type-options"] == "nosniff"


def test_only_listed_files_are_served(client: TestClient) -> None:
    for name in ("nope.js", "..%2Fmain.py", "%2e%2e", "index.htm"):
        resp = client.get(f"/dashboard/{name}")
        assert resp.status_code == 404, name
        assert resp.json()["error"]["code"] in ("file_not_found", "unknown_url")
    assert client.get("/dashboard/sub/app.js").status_code == 404
    assert {p.name for p in DASHBOARD_DIR.iterdir()} == set(ASSETS)


def test_page_has_no_inline_code_and_loads_nothing_from_outside() -> None:
    html = (DASHBOARD_DIR / "index.html").read_text()
    for tag in re.findall(r"<script\b[^>]*>", html):
        assert "src=" in tag, tag
    assert not re.search(r"<script\b[^>]*>\s*[^<\s]", html), "inline script"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"
    assert not re.search(r"\sstyle=", html) and "<style" not in html
    for name in ASSETS:
        text = (DASHBOARD_DIR / name).read_text()
        urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {"http://www.w3.org/2000/svg"}
        assert not urls, f"{name} refers to {urls}"
        # Scripts never write markup or styles as strings (CSP would block inline styles).
        assert "innerHTML" not in text and 'setAttribute("style"' not in text, name
    # Every module import and every file the page links is one the server serves.
    for name in [n for n in ASSETS if n.endswith(".js")]:
        for target in re.findall(r"from \"\./([\w.-]+)\"", (DASHBOARD_DIR / name).read_text()):
            assert target in ASSETS, f"{name} imports {target}"
    for target in re.findall(r"(?:src|href)=\"/dashboard/([\w.-]+)\"", html):
        assert target in ASSETS
