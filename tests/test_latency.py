"""helpers.latency: per-call samples, percentiles, warm-up removal, table, histogram (no timing asserts)."""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from helpers.latency import Latency, time_calls, time_calls_interleaved, to_markdown
from helpers.plots import latency_histogram as histogram


def test_time_calls_times_every_call_without_warmup() -> None:
    calls = []
    lat = time_calls(lambda: calls.append(1), n=7, name="noop")
    assert len(calls) == 7 and len(lat.samples) == 7
    assert lat.name == "noop" and all(s >= 0 for s in lat.samples)
    with pytest.raises(ValueError):
        time_calls(lambda: None, n=0)


def test_time_calls_interleaved_alternates_and_times_each_call() -> None:
    order: list[str] = []
    lats = time_calls_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, n=3)
    assert order == ["a", "b"] * 3
    assert list(lats) == ["a", "b"]
    assert all(len(lat.samples) == 3 and lat.name == name for name, lat in lats.items())
    slow = time_calls_interleaved({"fast": lambda: None, "slow": lambda: time.sleep(0.01)}, n=2)
    assert min(slow["slow"].samples) >= 0.009 > max(slow["fast"].samples)
    with pytest.raises(ValueError):
        time_calls_interleaved({"a": lambda: None}, n=0)


def test_time_calls_stops_at_the_time_budget() -> None:
    calls = []
    lat = time_calls(lambda: (calls.append(1), time.sleep(0.01)), n=1000, max_seconds=0.03)
    assert 1 <= len(calls) <= 4 and len(lat.samples) == len(calls)
    assert len(time_calls(lambda: None, n=1, max_seconds=0.0).samples) == 1  # always at least one call


def test_percentiles_first_worst_and_row() -> None:
    lat = Latency("x", (1.0, *([0.001] * 98), 0.002))  # a slow first call, then steady calls
    assert lat.first == 1.0 and lat.worst == 1.0
    assert lat.p50 == pytest.approx(0.001)
    assert lat.percentile(100) == pytest.approx(1.0)
    row = lat.row()
    assert row["calls"] == 100 and row["max_ms"] == pytest.approx(1000.0)
    assert row["max_over_p50"] == pytest.approx(1000.0)
    assert set(row) == {"name", "calls", "p50_ms", "p90_ms", "p99_ms", "max_ms", "max_over_p50"}


def test_steady_drops_the_warm_up() -> None:
    lat = Latency("x", (5.0, 2.0, 1.0, 1.0))
    steady = lat.steady(2)
    assert steady.samples == (1.0, 1.0) and steady.name == "x"
    assert lat.steady(0) == lat
    with pytest.raises(ValueError):
        lat.steady(4)
    with pytest.raises(ValueError):
        Latency("empty", ())


def test_markdown_has_one_line_per_variant() -> None:
    text = to_markdown([Latency("a", (0.001, 0.002)), Latency("b", (0.004,))])
    lines = text.splitlines()
    assert len(lines) == 4 and lines[0].startswith("| 方式 |")
    assert lines[3].startswith("| b | 1 | 4.000 |")
    assert lines[2].endswith("| 2.000 | 1.3 倍 |")  # max/p50 in 倍, as STYLE.md writes ratios


def test_slowest_keeps_the_tail() -> None:
    lat = Latency("x", tuple(float(i) for i in range(1, 31)))  # 30 calls: 1 .. 30 s
    assert lat.slowest(0.1).samples == (28.0, 29.0, 30.0) and lat.slowest().name == "x"
    assert lat.slowest(0.01).samples == (29.0, 30.0)  # never fewer than 2
    assert Latency("one", (1.0,)).slowest().samples == (1.0,)
    with pytest.raises(ValueError):
        lat.slowest(0)


def test_histogram_draws_one_series_per_variant(tmp_path) -> None:
    fig = histogram([Latency("a", (0.001, 0.002, 0.003)), Latency("b", (0.01, 0.02))], title="テスト")
    ax = fig.axes[0]
    assert len(ax.get_legend().get_texts()) == 2
    assert ax.get_xscale() == "log"
    fig.savefig(tmp_path / "hist.png")
    plt.close(fig)
    same = histogram([Latency("c", (0.001, 0.001))])  # all samples equal: linear bins, no crash
    plt.close(same)
