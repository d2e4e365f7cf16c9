"""Training gets its own torch thread budget, so it cannot starve serving.

The API's inference thread uses ``serving_threads``; the worker process (a separate process,
embedded or standalone) uses ``train_threads``. With an embedded worker the cores are split.
The e2e fault tests check the worker really trains with its budget (the job's "Training ..."
event reports ``threads``); ``bench/serving_under_training.py`` measures the effect.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.serving.lifespan import serving_threads
from service.worker.embedded import settings_env
from service.worker.runner import train_threads
from tests.service.conftest import make_settings


@pytest.mark.parametrize("cores", [1, 2, 8, 64])
def test_embedded_worker_and_serving_split_the_cores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cores: int
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    settings = make_settings(tmp_path)
    assert settings.embedded_worker
    serve, train = serving_threads(settings), train_threads(settings)
    assert serve >= 1 and train >= 1
    assert serve + train <= max(cores, 2)


def test_without_embedded_worker_serving_takes_every_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert serving_threads(make_settings(tmp_path, embedded_worker=False)) == 8


def test_explicit_budgets_win_and_reach_the_worker_process(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, torch_threads=3, train_threads=2)
    assert serving_threads(settings) == 3
    assert train_threads(settings) == 2
    env = settings_env(settings)
    assert env["LORAPLEX_TRAIN_THREADS"] == "2"
    assert env["LORAPLEX_TORCH_THREADS"] == "3"
