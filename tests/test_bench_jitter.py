"""bench/jitter.py: the machine's wake-up lateness, printed by bench/run.py before the scenarios."""

from __future__ import annotations

import os

import pytest

from bench import jitter, run

pytestmark = pytest.mark.anyio


def test_lateness_counts_every_wake_up_and_orders_its_percentiles() -> None:
    got = jitter.lateness(0.3, period=0.002)
    assert 50 <= got["n"] <= 150  # one wake-up per 2 ms, fewer only when late
    assert 0 <= got["p50_ms"] <= got["p99_ms"] <= got["p999_ms"] <= got["max_ms"]


def test_a_late_wake_up_is_counted_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """A virtual clock whose third sleep overruns by 50 ms: that wake-up, and only it, is late."""
    now = [100.0]
    sleeps = [0]

    def sleep(seconds: float) -> None:
        sleeps[0] += 1
        now[0] += seconds + (0.05 if sleeps[0] == 3 else 0.0)

    monkeypatch.setattr(jitter.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(jitter.time, "sleep", sleep)
    got = jitter.lateness(0.2, period=0.001)
    assert got["max_ms"] == pytest.approx(50.0)
    assert got["p99_ms"] == 0.0
    assert got["n"] == 150  # 200 ms, less the 50 ms lost, at one wake-up per ms


async def test_run_measures_each_core() -> None:
    cores = sorted(os.sched_getaffinity(0))[:2]
    line = await run.wakeup_lateness(cores, seconds=0.2)
    for core in cores:
        assert f"core {core} p50 " in line
    assert "not measured" not in line
