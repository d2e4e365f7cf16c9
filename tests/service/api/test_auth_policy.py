"""Auth on every route, and the rules around running without it.

- Every operation of the OpenAPI schema except the probes needs a key: none, a wrong one or a
  revoked one is a 401 in the standard error shape (with ``WWW-Authenticate: Bearer``).
- Running without auth needs the explicit setting *and* a loopback bind: ``loraplex serve``
  refuses otherwise, before anything listens.
- First start writes the default key to an owner-only file and logs where it is.
"""

from __future__ import annotations

import logging
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.cli import EXIT_STARTUP_ERROR, main
from service.config import Settings
from service.main import create_app
from tests.service.conftest import make_settings
from tests.service.helpers import Headers, assert_error

UNAUTHENTICATED = {"/healthz", "/readyz"}


def _operations(client: TestClient) -> list[tuple[str, str]]:
    spec: dict[str, Any] = client.app.openapi()  # type: ignore[attr-defined]
    ops = []
    for path, methods in spec["paths"].items():
        if path in UNAUTHENTICATED:
            continue
        for method in methods:
            # Any value for path parameters: auth is checked before the object is looked up.
            ops.append((method.upper(), re.sub(r"\{[^}]+\}", "x", path)))
    return ops


def test_schema_lists_the_protected_operations(client: TestClient) -> None:
    ops = _operations(client)
    assert ("POST", "/predict") in ops and ("GET", "/v1/tenants") in ops
    assert len(ops) >= 25


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"Authorization": "Bearer lpx_wrong"}, "invalid_api_key"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, None),
        ({"Authorization": "Bearer "}, None),
    ],
    ids=["missing", "wrong", "basic-scheme", "empty-bearer"],
)
def test_every_operation_needs_a_key(
    client: TestClient, headers: Headers, code: str | None
) -> None:
    for method, path in _operations(client):
        resp = client.request(method, path, headers=headers)
        error = assert_error(resp, 401, type="authentication_error", code=code)
        assert resp.headers.get("www-authenticate") == "Bearer", (method, path)
        assert "lpx_wrong" not in error["message"]


def test_revoked_key_is_refused_on_every_operation(client: TestClient, admin: Headers) -> None:
    created = client.post("/v1/tenants", json={"name": "revoked"}, headers=admin).json()
    key = created["api_key"]
    client.delete(f"/v1/tenants/{created['id']}/keys/{key['id']}", headers=admin)
    headers = {"Authorization": f"Bearer {key['key']}"}
    for method, path in _operations(client):
        assert_error(client.request(method, path, headers=headers), 401, code="revoked_api_key")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_serve_refuses_auth_disabled_off_loopback(
    host: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    def never(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the server must not start")

    monkeypatch.setattr(uvicorn.Server, "run", never)
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_AUTH_DISABLED", "true")
    assert main(["serve", "--host", host, "--port", "18999"]) == EXIT_STARTUP_ERROR
    assert "loopback" in capsys.readouterr().err
    # The same through the environment instead of the flag.
    monkeypatch.setenv("LORAPLEX_HOST", host)
    assert main(["serve"]) == EXIT_STARTUP_ERROR
    assert "loopback" in capsys.readouterr().err


def test_auth_disabled_is_off_by_default(tmp_path: Path) -> None:
    assert make_settings(tmp_path).auth_disabled is False
    with pytest.raises(ValueError, match="loopback"):
        Settings(_env_file=None, data_dir=tmp_path, auth_disabled=True, host="0.0.0.0")  # type: ignore[call-arg]


def test_default_key_file_is_owner_only_and_its_path_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path / "fresh")
    with caplog.at_level(logging.WARNING), TestClient(create_app(settings, hooks=[])):
        pass
    path = settings.default_key_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text
    secret = path.read_text().strip()
    assert secret not in caplog.text, "the key itself is never logged"
