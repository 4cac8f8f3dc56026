"""The course pattern and the instructor's plan add up (helpers.tooling.workshop): every notebook in the
pattern has its order, a core of at most 40 minutes that covers its reading and waiting, and 発展 after the
exercises; every slot fits its excerpt plus its waiting, the guide's totals are the sums, every excerpt
runs alone and holds no 発展."""

from __future__ import annotations

import itertools
import re

import nbformat
import pytest

from helpers.tooling.notebooks import notebooks
from helpers.tooling.workshop import (
    CORE_LIMIT,
    PLANS,
    Excerpt,
    TimeLine,
    advanced_cells,
    core_cells,
    guide_text,
    headings,
    pattern_problems,
    reading_minutes,
    time_line,
    timetable,
    total_stated_minutes,
    undefined_names,
)

IN_PATTERN = notebooks()
"""Every notebook follows the course pattern (COURSE.md); a new one does from the start."""


def _code(*sources: str) -> list[nbformat.NotebookNode]:
    return [nbformat.v4.new_code_cell(s) for s in sources]


def test_every_notebook_in_the_pattern_follows_it() -> None:
    """Order, time line (core N <= 40 covers reading and waiting; M adds 発展), short cells, no getsource."""
    problems = [problem for path in IN_PATTERN for problem in pattern_problems(path)]
    assert problems == [], "\n".join(problems)


def _md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(text)


def _pattern_notebook(
    folder,
    minutes: str = "所要時間: 約 5 分 (発展を含めると約 10 分)",
    wait: str = "実行の待ち (Colab T4 の見込み): 約 1 分 (発展は約 1 分)。1000 枚を 1 回通す見込み。",
    core: tuple[nbformat.NotebookNode, ...] = (),
    advanced: tuple[nbformat.NotebookNode, ...] = (
        _md("## 発展: もっと深く"),
        nbformat.v4.new_code_cell("y = x"),
    ),
    order: tuple[str, ...] = (),
):
    """A small notebook in the pattern (99_pattern.ipynb); ``order`` replaces its headings' sequence."""
    solution = nbformat.v4.new_code_cell("\n".join(f"s{i} = {i}" for i in range(25)))
    solution.metadata["tags"] = ["solution"]
    cells = [
        _md("# 99 型どおりのノートブック"),
        _md(f"## このノートブックで学ぶこと\n\n- 型\n\n{minutes}\n{wait}"),
        _md("## セットアップ"),
        _md("## 1. 最初の節\n\n本文。"),
        nbformat.v4.new_code_cell("x = 1"),
        *core,
        _md("## 2. 次の節\n\n```python\n# コードの中の見出しではない行\n```"),
        _md("## まとめ\n\n- 結論。"),
        _md("## 練習問題\n\n1. 問い"),
        _md("### 解答例"),
        solution,
        *advanced,
        _md("## 付録: CI 用"),
    ]
    if order:
        cells = [_md(line) for line in order]
    path = folder / "99_pattern.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=cells), path)
    return path


def test_a_notebook_in_the_pattern_passes_and_its_parts_are_found(tmp_path) -> None:
    path = _pattern_notebook(tmp_path)
    assert pattern_problems(path) == []
    assert time_line(path) == TimeLine(core=5, with_advanced=10, wait=1, advanced_wait=1)
    assert [c.source for c in advanced_cells(path)] == ["## 発展: もっと深く", "y = x"]
    assert core_cells(path)[-1].source == "## まとめ\n\n- 結論。"
    assert [line for _, line in headings(core_cells(path))][-2:] == ["## 2. 次の節", "## まとめ"]


_OPENING = ("# 99 題", "## このノートブックで学ぶこと")


@pytest.mark.parametrize(
    ("change", "symptom"),
    [
        ({"minutes": "所要時間: 約 45 分 (発展を含めると約 50 分)"}, f"at most {CORE_LIMIT}"),
        ({"minutes": "所要時間: 約 1 分 (発展を含めると約 10 分)"}, "the core needs"),
        ({"minutes": "所要時間: 約 30 分 (発展を含めると約 35 分)"}, "the core needs"),  # padded
        ({"minutes": "所要時間: 約 5 分"}, "has 発展 sections"),
        ({"minutes": "所要時間: 約 5 分 (発展を含めると約 6 分)"}, "core and 発展 need"),
        ({"minutes": "所要時間: 約 5 分 (読む時間。練習問題は別)"}, "the time line must read"),
        ({"wait": "待ちは数分"}, "the line after the time line"),
        ({"advanced": ()}, "has no 発展 sections"),
        ({"core": (_md("### 補足\n\n" + "あ" * 2400),)}, "the core needs"),  # six more minutes of prose
        ({"core": (_md("上の判定のとおりです。"),)}, "'判定のとおり'"),
        ({"core": (nbformat.v4.new_code_cell("import inspect\ninspect.getsource(len)"),)}, "getsource"),
        ({"core": (nbformat.v4.new_code_cell("\n".join(f"a{i} = {i}" for i in range(21))),)}, "≤ 20"),
        ({"core": (_md("## 補足"),)}, "not a heading of the pattern"),
        ({"core": (_md("## 3. 発展: ここではない"),)}, "発展 goes after the exercises"),
        ({"order": (*_OPENING, "## 1. 一", "## 3. 三", "## まとめ")}, "numbered 1, 2"),
        ({"order": (*_OPENING, "## 1. 一", "## 発展: 早すぎる")}, "after ## 練習問題"),
        ({"order": (*_OPENING, "## 1. 一", "## まとめ", "## 練習問題")}, "must reach"),
        ({"order": ("# 98 題", "## このノートブックで学ぶこと")}, "the title '# 99"),
    ],
)  # fmt: skip
def test_the_pattern_check_names_what_is_wrong(tmp_path, change: dict, symptom: str) -> None:
    problems = pattern_problems(_pattern_notebook(tmp_path, **change))
    assert any(symptom in problem for problem in problems), problems


def test_advanced_reading_counts_toward_m_not_n(tmp_path) -> None:
    long_advanced = (_md("## 発展: 長い話\n\n" + "い" * 4000), nbformat.v4.new_code_cell("y = x"))
    assert any(
        "core and 発展 need" in p
        for p in pattern_problems(_pattern_notebook(tmp_path, advanced=long_advanced))
    )
    fits = _pattern_notebook(
        tmp_path, minutes="所要時間: 約 5 分 (発展を含めると約 20 分)", advanced=long_advanced
    )
    assert pattern_problems(fits) == []


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


@pytest.mark.parametrize("heading", PLANS)
def test_no_excerpt_of_the_plans_holds_advanced_material(heading: str) -> None:
    """Excerpts stop at the exercises, and 発展 comes after them: a class never reads a deep dive."""
    for slot in timetable(guide_text(), heading):
        if slot.excerpt:
            inside = [line for _, line in headings(slot.excerpt.cells()) if "発展" in line]
            assert inside == [], slot.text


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
