"""helpers.timing: median of repeats, throughput, the results table (no timing asserts)."""

from __future__ import annotations

import pytest
import torch

from helpers.timing import ResultsTable, Timing, measure, op_counts


def test_measure_counts_calls_and_keeps_median() -> None:
    calls = []
    timing = measure(lambda: calls.append(1), name="noop", n_items=10, warmup=2, repeats=5)
    assert len(calls) == 7  # 2 warm-up + 5 timed
    assert len(timing.runs) == 5
    assert sorted(timing.runs)[2] == timing.seconds
    assert timing.items_per_s > 0


def test_measure_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError):
        measure(lambda: None, name="x", repeats=0)


def test_table_speedup_against_first_and_named_baseline() -> None:
    table = ResultsTable(title="t")
    table.add(Timing("slow", seconds=2.0, n_items=10))
    table.add(Timing("fast", seconds=0.5, n_items=10))
    rows = table.rows()
    assert rows[0]["speedup"] == pytest.approx(1.0)
    assert rows[1]["speedup"] == pytest.approx(4.0)
    table.baseline = "fast"
    assert table.rows()[0]["speedup"] == pytest.approx(0.25)
    table.baseline = "missing"
    with pytest.raises(KeyError):
        table.rows()


def test_markdown_has_one_line_per_variant() -> None:
    table = ResultsTable()
    table.add(Timing("a", 1.0, 4))
    table.add(Timing("b", 0.5, 4))
    markdown = table.to_markdown()
    assert markdown.count("\n") == 3
    assert "2.00×" in markdown
    assert "8.0" in markdown  # 4 items / 0.5 s
    assert "揺れ (最小〜最大)" in markdown and "1 回" in markdown  # no runs: no range to show


def test_markdown_shows_the_range_of_the_runs() -> None:
    table = ResultsTable()
    table.add(Timing("a", 1.0, 4, runs=(0.9, 1.0, 1.2)))
    assert "0.900〜1.200 s (30%)" in table.to_markdown()


def test_spread() -> None:
    assert Timing("x", 1.0, 1, runs=(0.9, 1.0, 1.2)).spread == pytest.approx(0.3)
    assert Timing("x", 1.0, 1).spread == 0.0


def test_op_counts_sees_the_nonzero_of_a_boolean_index() -> None:
    x = torch.arange(12.0).view(3, 4)
    mask = x > 5
    index = mask.nonzero(as_tuple=True)
    boolean, integer = op_counts(lambda: x[mask], calls=5), op_counts(lambda: x[index], calls=5)
    assert boolean["aten::nonzero"] == 1.0
    assert "aten::nonzero" not in integer
