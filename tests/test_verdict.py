"""helpers.verdict: a difference is called only beyond the run's own spread."""

from __future__ import annotations

import math

import numpy as np
import pytest

from helpers import verdict
from helpers.latency import Latency
from helpers.timing import Timing


def _timing(name: str, *runs: float, n: int = 100) -> Timing:
    ordered = sorted(runs)
    return Timing(name, ordered[len(ordered) // 2], n, tuple(runs))


def test_a_clear_difference_is_called_with_its_ratio_and_noise() -> None:
    a, b = _timing("a", 1.0, 1.02, 0.98), _timing("b", 0.13, 0.131, 0.129)
    v = verdict.compare(a, b)
    assert v.differs and v.ratio == pytest.approx(1.0 / 0.13)
    assert str(v) == "b は a より 7.7 倍速い (揺れ ±2 % を超える差)"
    slower = verdict.compare(b, a)
    assert slower.differs and "7.7 倍遅い" in str(slower)


def test_small_differences_are_in_percent() -> None:
    v = verdict.compare(_timing("e", 1.0, 1.01, 0.99), _timing("g", 0.8, 0.81, 0.79))
    assert v.differs and "25 % 速い" in str(v)


def test_overlapping_runs_are_within_the_noise() -> None:
    a, b = _timing("a", 1.0, 1.3, 0.9), _timing("b", 0.95, 1.2, 0.85)
    v = verdict.compare(a, b)
    assert not v.differs
    assert str(v).startswith("b と a の差は揺れの範囲内 (速さの比 b/a = 1.05、揺れ ±")


def test_far_medians_with_overlapping_runs_are_unclear() -> None:
    # medians 14 % apart, spread ±6 %, but one slow run of b reaches into a's range
    a, b = _timing("e", 1.0, 1.02, 0.98), _timing("f", 0.877, 0.87, 1.0)
    v = verdict.compare(a, b)
    assert not v.differs
    expected = (
        "f と e の差ははっきりしない (速さの比 f/e = 1.14。揺れ ±7 % より大きいが、3 回の測定の範囲が重なる)"
    )
    assert str(v) == expected


def test_apart_but_smaller_than_the_spread_is_not_a_difference() -> None:
    # ranges do not overlap, yet the 5 % gap is smaller than b's ±8 % spread
    a, b = _timing("a", 1.00, 1.001, 0.999), _timing("b", 0.952, 0.953, 0.80)
    assert not verdict.compare(a, b).differs


def test_a_much_slower_b_is_a_difference_even_with_a_wide_spread() -> None:
    # b is ~100 times slower, its runs spread ±50 %, a's ±100 %+: the ranges are far apart
    a, b = _timing("a", 0.01, 0.005, 0.03), _timing("b", 1.0, 0.6, 1.6)
    v = verdict.compare(a, b)
    assert v.differs and "倍遅い" in str(v) and v.ratio < 0.02


def test_a_single_run_says_so_and_needs_a_large_factor() -> None:
    one, other = _timing("a", 1.0), _timing("b", 0.9)
    v = verdict.compare(one, other)
    assert not v.differs and math.isnan(v.noise) and "1 回だけの測定" in str(v)
    v = verdict.compare(one, _timing("b", 0.5))
    assert v.differs and "2.0 倍速い" in str(v) and "1 回だけの測定" in str(v)


def test_labels_override_the_names() -> None:
    v = verdict.compare(_timing("long name a", 1.0, 1.0), _timing("long name b", 0.5, 0.5), "e", "g")
    assert str(v).startswith("g は e より 2.0 倍速い")


def test_largest_stage() -> None:
    line = verdict.largest_stage({"デコード": 6.0, "モデル": 3.0, "コピー": 1.0})
    assert line == "いちばん長い段階は「デコード」(6 ms、全体の 60 %)"
    with pytest.raises(ValueError):
        verdict.largest_stage({})


def test_distributions_call_a_clear_shift_despite_rare_spikes() -> None:
    rng = np.random.default_rng(1)
    idle = rng.normal(0.004, 0.0004, 30)
    busy = rng.normal(0.020, 0.002, 30)
    busy[[3, 11, 25]] = 0.3  # rare 300 ms stalls: compare() would call everything noise
    assert not verdict.compare(
        Timing("a", float(np.median(idle)), 1, tuple(idle)),
        Timing("b", float(np.median(busy)), 1, tuple(busy)),
    ).differs
    v = verdict.compare_distributions(idle, busy, "仕事なし", "取り合う")
    assert v.differs and v.ratio < 0.25 and "倍遅い" in str(v) and "1 をまたがない" in str(v)
    assert str(v).startswith("取り合う は 仕事なし より ")
    assert verdict.compare_distributions(busy, idle).differs  # symmetric: the other way round too


def test_distributions_two_draws_of_one_distribution_are_not_a_difference() -> None:
    rng = np.random.default_rng(2)
    draws = [rng.lognormal(np.log(0.004), 0.3, 40) for _ in range(20)]
    verdicts = [verdict.compare_distributions(draws[i], draws[i + 1]) for i in range(0, 20, 2)]
    assert sum(v.differs for v in verdicts) <= 1  # a 95 % interval: rarely, never often
    v = verdicts[0]
    assert str(v).startswith("b と a の中央値の差は揺れの範囲内 (速さの比 b/a = ")
    assert "95 % 区間" in str(v) and "1 を含む" in str(v)


def test_distributions_are_seeded_take_latency_names_and_need_enough_calls() -> None:
    a = Latency("eager", (0.004, 0.005, 0.0045, 0.0042, 0.0048, 0.2))
    b = Latency("compile", (0.002, 0.0021, 0.0022, 0.0019, 0.002, 0.0023))
    assert str(verdict.compare_distributions(a, b)) == str(verdict.compare_distributions(a, b))
    assert str(verdict.compare_distributions(a, b)).startswith("compile は eager より ")
    few = verdict.compare_distributions([0.001] * 3, [0.002] * 10)
    assert not few.differs and math.isnan(few.noise) and "判定できない" in str(few)
    with pytest.raises(ValueError):
        verdict.compare_distributions([], [0.001])


def test_this_run_is_one_line_that_starts_with_the_prefix() -> None:
    a, b = _timing("e", 1.0, 1.02, 0.98), _timing("g", 0.45, 0.46, 0.44)
    line = verdict.this_run(verdict.compare(a, b), "64 枚、GPU なし。")
    assert line == "この実行では: g は e より 2.2 倍速い (揺れ ±2 % を超える差)。64 枚、GPU なし"
    assert "\n" not in line and line.startswith(verdict.RUN_PREFIX)


def test_say_prints_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    verdict.say(verdict.largest_stage({"デコード": 3.0, "モデル": 1.0}))
    assert capsys.readouterr().out == "この実行では: いちばん長い段階は「デコード」(3 ms、全体の 75 %)\n"


def test_this_run_refuses_nothing_an_empty_finding_and_a_doubled_prefix() -> None:
    for findings in [(), ("",), ("この実行では: b は a より速い",)]:
        with pytest.raises(ValueError):
            verdict.this_run(*findings)


@pytest.mark.parametrize(
    ("ratio", "words"),
    [(1.25, "25 % 速い"), (1.949, "95 % 速い"), (1.96, "2.0 倍速い"), (2.4, "2.4 倍速い"), (0.8, "25 % 遅い"),
     (0.5, "2.0 倍遅い"), (0.1, "10.0 倍遅い")],
)  # fmt: skip
def test_ratio_words_switch_from_percent_to_times_at_195(ratio: float, words: str) -> None:
    assert verdict.ratio_words(ratio) == words
