"""Lending the embedded worker's cores to generation (service.serving.cores): a process's CPU
time from /proc, whether it is busy over a window, and the threads a step may use."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from service.serving.cores import WINDOW_S, CoreLender, ProcessActivity, cpu_seconds

pytestmark = pytest.mark.skipif(cpu_seconds(1) is None, reason="needs Linux's /proc")


def _child(code: str) -> Iterator[int]:
    """The pid of a Python process running ``code``, killed afterwards."""
    proc = subprocess.Popen([sys.executable, "-c", code])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def spinning() -> Iterator[int]:
    yield from _child("while True: pass")


@pytest.fixture
def sleeping() -> Iterator[int]:
    yield from _child("import time; time.sleep(600)")


def test_cpu_seconds_counts_a_process_s_cpu_time(spinning: int) -> None:
    first = cpu_seconds(spinning)
    assert first is not None
    time.sleep(0.5)
    second = cpu_seconds(spinning)
    assert second is not None and second - first > 0.1  # it spun for part of that at least


def test_cpu_seconds_of_a_process_that_is_gone_is_none() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert cpu_seconds(proc.pid) is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_process_is_busy_when_it_used_a_share_of_a_core_over_the_window(
    spinning: int, sleeping: int
) -> None:
    clock = Clock()
    pids = {"spin": spinning, "sleep": sleeping}
    for name, pid in pids.items():
        activity = ProcessActivity(lambda pid=pid: pid, clock)
        assert activity.busy()  # a first sample: unknown, so busy
        time.sleep(0.6)  # real CPU time passes while the fake clock says one window did
        clock.now += 0.6
        assert activity.busy() is (name == "spin"), name
        # Within the window the answer is kept, not sampled again.
        clock.now += WINDOW_S / 2
        assert activity.busy() is (name == "spin"), name


def test_an_unknown_or_new_process_counts_as_busy(sleeping: int) -> None:
    clock = Clock()
    pid: dict[str, int | None] = {"pid": None}
    activity = ProcessActivity(lambda: pid["pid"], clock)
    assert activity.busy()  # no worker yet
    pid["pid"] = sleeping
    clock.now += 1
    assert activity.busy()  # a first sample of it
    clock.now += 1
    assert not activity.busy()  # a sleeping process
    pid["pid"] = 1  # a restarted worker: a new pid is sampled afresh
    clock.now += 1
    assert activity.busy()


def test_the_lender_adds_the_spare_cores_only_while_nothing_is_busy() -> None:
    flags = {"worker": False, "encoder": False}
    lender = CoreLender(1, 1, [lambda: flags["worker"], lambda: flags["encoder"]])
    assert lender.threads() == 2
    flags["encoder"] = True
    assert lender.threads() == 1
    flags["encoder"], flags["worker"] = False, True
    assert lender.threads() == 1
    assert CoreLender(2, 0, []).threads() == 2  # nothing to lend


@pytest.mark.parametrize(
    ("overrides", "decoders", "lends"),
    [
        ({}, ["smol"], True),  # the default split: the worker's cores are lent
        ({"embedded_worker": False}, ["smol"], False),  # serving has every core already
        ({"torch_threads": 1}, ["smol"], False),  # a budget set by hand is kept
        ({"generation_threads": 1}, ["smol"], False),  # so is generation's
        ({}, ["smol", "other"], False),  # two generation threads would borrow the same cores
    ],
)
def test_cores_are_lent_only_with_the_default_split_and_one_decoder(
    overrides: dict[str, object], decoders: list[str], lends: bool
) -> None:
    import os

    from service.config import Settings
    from service.serving.lifespan import serving_threads, spare_cores

    settings = Settings(**{"embedded_worker": True, **overrides})  # type: ignore[arg-type]
    threads = serving_threads(settings)
    cores = os.cpu_count() or 1
    expected = cores - threads if lends else 0
    assert spare_cores(settings, threads, decoders) == expected


def test_a_sample_from_long_ago_counts_as_busy(sleeping: int) -> None:
    """Generation asks only when it steps: after it idled, the CPU time averaged over the
    whole gap could hide a job that started a moment ago, so a stale sample starts afresh."""
    clock = Clock()
    activity = ProcessActivity(lambda: sleeping, clock)
    activity.busy()
    clock.now += WINDOW_S
    assert not activity.busy()
    clock.now += 60
    assert activity.busy()  # afresh
    clock.now += WINDOW_S
    assert not activity.busy()
