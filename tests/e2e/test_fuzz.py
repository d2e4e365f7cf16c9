"""Schemathesis over the whole OpenAPI schema against a live server: no response is a 5xx.

A real ``loraplex serve`` (tiny base model, so inference is cheap; no worker, so fuzzed jobs
only queue) with real objects seeded for the fuzzed tenant and for another tenant; the
fuzzer's dictionaries point path, query and body ids at them part of the time. The key is
an admin *and* tenant key, so every route is reachable. Small and seeded for CI (about a
thousand requests); ``python -m bench.fuzz`` runs the long version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from core.base import load_base_model
from tests.e2e.fuzzing import config_toml, run_schemathesis, seed_objects, server_errors_in_log
from tests.e2e.server import ServerProcess
from tests.tiny_bert import TINY_NAME

CI_MAX_EXAMPLES = 8
CI_SEED = 20261129


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[ServerProcess]:
    server = ServerProcess(
        tmp_path_factory.mktemp("fuzz"),
        settings={
            "embedded_worker": False,
            "base_model_path": tiny_model_dir,
            "base_model_name": TINY_NAME,
            "torch_threads": 1,
            "max_upload_mb": 2,
            "log_level": "WARNING",
        },
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_fuzzing_the_openapi_schema_finds_no_server_error(
    fuzz_server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    base = load_base_model(tiny_model_dir, name=TINY_NAME, device="cpu")
    seeded = seed_objects(fuzz_server.base_url, fuzz_server.data_dir, base)
    config = tmp_path / "schemathesis.toml"
    config.write_text(config_toml(seeded))

    result = run_schemathesis(
        fuzz_server.base_url,
        seeded.key,
        config,
        max_examples=CI_MAX_EXAMPLES,
        seed=CI_SEED,
        timeout=600,
    )
    print(f"\nschemathesis: {result.generated} requests, {result.failed} failed")
    assert result.returncode == 0, result.output[-8000:]
    assert result.failed == 0, result.output[-8000:]
    assert result.generated is not None and result.generated > 300, result.output[-3000:]
    log = (fuzz_server.data_dir / f"server-{fuzz_server.port}.log").read_text(errors="replace")
    assert server_errors_in_log(log) == [], log[-5000:]
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None, "still serving"
