"""A run's own random streams: apart from the process's, and saved exactly (CPU)."""

from __future__ import annotations

import json

import torch

from core.training.rng import TrainerRng, forked_rng

CPU = torch.device("cpu")


def test_scopes_continue_one_stream_whatever_the_process_draws_between() -> None:
    rng = TrainerRng.seeded(5, CPU)
    with rng.scope():
        first = torch.rand(4)
    torch.rand(100)
    torch.manual_seed(0)
    with rng.scope():
        second = torch.rand(4)
    with TrainerRng.seeded(5, CPU).scope():
        uninterrupted = torch.rand(8)
    assert torch.equal(torch.cat([first, second]), uninterrupted)


def test_scope_and_fork_leave_the_global_stream_where_it_was() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with TrainerRng.seeded(5, CPU).scope():
        torch.rand(10)
    with forked_rng(CPU):
        torch.manual_seed(7)
        torch.rand(10)
    assert torch.equal(torch.rand(3), expected)


def test_json_round_trip_resumes_the_stream() -> None:
    rng = TrainerRng.seeded(5, CPU)
    with rng.scope():
        torch.rand(7)
    restored = TrainerRng.from_json(json.loads(json.dumps(rng.to_json())), CPU)
    with rng.scope():
        expected = torch.rand(4)
    with restored.scope():
        assert torch.equal(torch.rand(4), expected)


def test_dropout_stream_differs_from_init_stream_and_between_seeds() -> None:
    with forked_rng(CPU):
        torch.manual_seed(5)
        init = torch.rand(4)
    draws = []
    for seed in (5, 6):
        with TrainerRng.seeded(seed, CPU).scope():
            draws.append(torch.rand(4))
    assert not torch.equal(draws[0], init)
    assert not torch.equal(draws[0], draws[1])
