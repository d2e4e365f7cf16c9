from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.config import Settings, is_loopback_host, setting_variable, settings_errors
from service.serving.lifespan import CPU_BATCH_TOKENS, CUDA_BATCH_TOKENS, max_batch_tokens
from tests.service.conftest import make_settings


def test_defaults_derive_the_sqlite_url_from_data_dir(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert settings.database_url == f"sqlite:///{(tmp_path / 'loraplex.db').as_posix()}"
    assert settings.max_upload_mb == 50
    assert settings.max_upload_bytes == 50 * 1024 * 1024
    assert settings.embedded_worker is True
    assert settings.auth_disabled is False
    assert settings.lease_seconds == 30
    assert (settings.max_batch_size, settings.max_wait_ms, settings.max_queue_rows) == (
        64,
        5,
        4096,
    )
    assert settings.adapter_cache_mb == 512
    assert settings.max_adapters_per_tenant == 1000
    assert settings.max_concurrent_jobs_per_tenant == 4
    assert settings.default_key_path == tmp_path / "default_api_key"


def test_environment_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LORAPLEX_MAX_UPLOAD_MB", "7")
    monkeypatch.setenv("LORAPLEX_ADMIN_KEY", "s3cret")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.data_dir == tmp_path
    assert settings.max_upload_mb == 7
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)  # secrets never show in logs


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "example.com", "::"])
def test_auth_disabled_refused_off_loopback(tmp_path: Path, host: str) -> None:
    with pytest.raises(ValidationError, match="loopback"):
        make_settings(tmp_path, auth_disabled=True, host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_auth_disabled_allowed_on_loopback(tmp_path: Path, host: str) -> None:
    assert make_settings(tmp_path, auth_disabled=True, host=host).auth_disabled
    assert is_loopback_host(host)


def test_heartbeat_must_be_shorter_than_lease(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="LORAPLEX_HEARTBEAT_SECONDS"):
        make_settings(tmp_path, lease_seconds=5, heartbeat_seconds=5)


FLOAT_SETTINGS = [
    name
    for name, field in Settings.model_fields.items()
    if field.annotation in (float, float | None)
]


@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_every_float_setting_refuses_infinity_and_nan(tmp_path: Path, name: str) -> None:
    # inf passes every bound (> 0), then breaks what it times (Event.wait, timedelta).
    assert "lease_seconds" in FLOAT_SETTINGS and "max_job_seconds" in FLOAT_SETTINGS
    for value in ("inf", "-inf", "nan"):
        with pytest.raises(ValidationError) as refused:
            make_settings(tmp_path, **{name: value})
        assert settings_errors(refused.value) == [
            f"{setting_variable(name)}={value!r}: Input should be a finite number"
        ]


def test_batch_tokens_default_by_device_and_a_setting_wins(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    assert settings.max_batch_tokens is None  # decided when the device is known
    assert max_batch_tokens(settings, on_cuda=False) == CPU_BATCH_TOKENS == 256
    assert max_batch_tokens(settings, on_cuda=True) == CUDA_BATCH_TOKENS > CPU_BATCH_TOKENS
    for on_cuda in (False, True):
        assert max_batch_tokens(make_settings(tmp_path, max_batch_tokens=512), on_cuda) == 512
