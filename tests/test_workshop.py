"""The instructor's plan adds up: every 所要時間 covers its reading time, every slot its excerpt plus its
waiting, the guide's totals are the sums, every excerpt runs alone (helpers.tooling.workshop)."""

from __future__ import annotations

import itertools
import re

import nbformat
import pytest

from helpers.tooling.notebooks import notebooks
from helpers.tooling.workshop import (
    PLANS,
    Excerpt,
    guide_text,
    reading_minutes,
    rounded_up,
    stated_minutes,
    timetable,
    total_stated_minutes,
    undefined_names,
)


def _code(*sources: str) -> list[nbformat.NotebookNode]:
    return [nbformat.v4.new_code_cell(s) for s in sources]


@pytest.mark.parametrize("path", notebooks(), ids=lambda p: p.name[:2])
def test_every_stated_time_covers_the_reading_of_its_notebook(path) -> None:
    estimate = reading_minutes(Excerpt(path.name[:2]).cells())
    stated = stated_minutes(path)
    assert estimate <= stated <= rounded_up(estimate) + 10, (path.name, round(estimate, 1), stated)


@pytest.mark.parametrize("heading", PLANS)
def test_each_plan_fills_three_hours_and_every_slot_fits_its_excerpt(heading: str) -> None:
    slots = timetable(guide_text(), heading)
    assert slots and slots[0].start == 0 and slots[-1].end == 180, heading
    for before, after in itertools.pairwise(slots):
        assert before.end == after.start, after.text
    taught = [s for s in slots if s.excerpt]
    assert len(taught) >= 3, heading
    for slot in slots:
        assert (slot.wait or 0) <= slot.minutes, slot.text
    for slot in taught:
        needed = reading_minutes(slot.excerpt.cells())
        assert slot.wait is not None, slot.text  # every taught row gives its waiting (set-up, download, runs)
        assert needed + slot.wait <= slot.minutes, (slot.text, round(needed, 1), slot.wait)
        assert slot.text.endswith(f"| {round(needed)} 分 | {slot.wait} 分 |"), (
            slot.text,
            round(needed),
        )  # the reading column is computed


def test_the_guide_states_the_totals_it_computes() -> None:
    """The introduction's sum of every 所要時間, the reading the two plans teach, and the rest (homework)."""
    guide = guide_text()
    total = total_stated_minutes()
    taught = sum(
        round(reading_minutes(slot.excerpt.cells()))
        for heading in PLANS
        for slot in timetable(guide, heading)
        if slot.excerpt
    )
    sentence = r"合計は (\d+) 分.*?合わせて (\d+) 分.*?残りの約 (\d+) 分 \((\d+) − (\d+)\)"
    stated = re.search(sentence, guide, re.S)
    assert stated, "INSTRUCTOR.md: the totals sentence is missing"
    expected = [total, taught, total - taught, total, taught]
    assert [int(n) for n in stated.groups()] == expected, (total, taught)
    assert f"({total} 分・{taught} 分・{total - taught} 分)" in guide


@pytest.mark.parametrize("heading", PLANS)
def test_every_excerpt_of_the_plans_runs_alone(heading: str) -> None:
    """An excerpt is a notebook's opening cells and sections 1..N: nothing it runs is defined later."""
    for slot in timetable(guide_text(), heading):
        if slot.excerpt:
            assert slot.excerpt.first == 1 and undefined_names(slot.excerpt.cells()) == [], slot.text


def test_a_skipped_section_is_found() -> None:
    """02 from section 3 on, without 1 and 2 (where the workload and the model are made), cannot run."""
    missing = undefined_names(Excerpt("02", first=3).cells())
    assert "paths" in missing and "speed_model" in missing
    assert undefined_names(Excerpt("02", last=3).cells()) == []


def test_undefined_names_reads_cells_in_order() -> None:
    assert undefined_names(_code("x = 1", "print(x)")) == []
    assert undefined_names(_code("print(y)", "y = 1")) == ["y"]
    late = _code("def f():\n    return LATER + 1", "LATER = 2\nf()")
    assert undefined_names(late) == []  # looked up when f runs
    assert undefined_names(late[:1]) == ["LATER"]
    imports = _code("import numpy as np\nfrom os import path\n%time np.zeros(1)\n!ls", "np, path")
    assert undefined_names(imports) == []
    assert undefined_names(_code("[i for i in range(3)]", "with open('f') as fh:\n    fh")) == []


def test_the_timetable_is_read_from_its_table() -> None:
    guide = "\n".join(
        [
            "## 時間割 (3 時間)",
            "",
            "| 時刻 | 内容 | ノートブック | 範囲 | 読む時間の見積もり | 待ち |",
            "|---|---|---|---|---|---|",
            "| 0:00–0:15 | 導入 | 00 | 全体 | 12 分 | 2 分 |",
            "| 0:15–0:50 | 計算 | 01 | 1〜4 節 | 33 分 | 1 分 |",
            "| 0:50–1:00 | 休憩 | | | | 3 分 |",
            "| 1:00–1:30 | 測り方 | 05 | 1 節 | 30 分 | |",
            "",
            "## 次の節",
            "| 1:00–2:00 | ここは別の表 | 02 | 全体 | |",
        ]
    )
    slots = timetable(guide, "## 時間割 (3 時間)")
    assert [(s.start, s.end) for s in slots] == [(0, 15), (15, 50), (50, 60), (60, 90)]
    assert slots[0].excerpt == Excerpt("00") and slots[1].excerpt == Excerpt("01", 4)
    assert slots[2].excerpt is None and slots[3].excerpt == Excerpt("05", 1)
    assert slots[1].minutes == 35
    assert [s.wait for s in slots] == [2, 1, 3, None]
