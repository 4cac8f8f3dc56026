"""How long a learner needs for a notebook or an excerpt of it, the order a notebook follows, and the
instructor's plan that uses both.

The estimate is a reading model, not a measurement of a class: prose at ``PROSE_CHARS_PER_MIN``
characters a minute, lesson code at ``LESSON_LINES_PER_MIN`` lines a minute (read, run, look at the
output; a ``#@save`` cell is lesson code), scaffolding (a cell whose first line is ``# 補助コード``, and
the set-up ``#@title`` cell) skimmed at ``SCAFFOLD_LINES_PER_MIN``. Waiting for a run on a Colab T4
comes on top: the line after a notebook's time line states it (``実行の待ち (Colab T4 の見込み): 約 W 分
(発展は約 V 分)``, an expectation), and each row of the guide's timetable gives it its own column.

A notebook in the course pattern (``COURSE.md``) runs: title, ``## このノートブックで学ぶこと``, an
optional ``## セットアップ``, the core sections ``## 1. …`` …, ``## まとめ``, ``## 練習問題`` with
``### 解答例``, then optional ``## 発展: …`` sections, then optional ``## 付録: …`` sections
(:func:`pattern_problems`). Its time line reads ``所要時間: 約 N 分 (発展を含めると約 M 分)``, the
parenthesis only where 発展 exists: N covers the core (every cell before ``## 練習問題``) read at these
rates plus its waiting, and is at most :data:`CORE_LIMIT`; M adds the 発展 sections' reading and
waiting. The exercises are counted in neither. ``notebooks/INSTRUCTOR.md`` states the rates, and
``tests/test_workshop.py`` holds every notebook, the guide's timetable (reading + waiting per row) and
its totals to them; the guide's excerpts stop at ``## 練習問題``, so 発展 is never inside one.
"""

from __future__ import annotations

import ast
import builtins
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from helpers.tooling.notebooks import NOTEBOOK_DIR, SCAFFOLD_MARK, SETUP_TAG, WAIT_LABEL, notebooks

PROSE_CHARS_PER_MIN = 400
"""Japanese technical prose read carefully (everyday reading is faster, ~500-600 characters a minute)."""
LESSON_LINES_PER_MIN = 8
SCAFFOLD_LINES_PER_MIN = 30
EXERCISES = "## 練習問題"
LEARN = "## このノートブックで学ぶこと"
SETUP = "## セットアップ"
SUMMARY = "## まとめ"
SOLUTIONS = "### 解答例"
ADVANCED = "## 発展: "
APPENDIX = "## 付録: "
CORE_LIMIT = 40
"""The most minutes a notebook's core may take (N of its time line): COURSE.md section 5."""
LESSON_CELL_LINES = 20
SCAFFOLD_CELL_LINES = 40
"""The longest lesson-code and scaffolding cells a notebook in the pattern may have (solutions aside)."""
DEFERRING: tuple[str, ...] = (
    "判定のとおり",
    "上の判定",
    "記録がありません",
    "日付不明",
    "まだ測っていません",
)
"""Prose that defers to a printed verdict or disclaims a source (COURSE.md sections 2 and 6)."""
TIME_LINE = re.compile(r"^所要時間: 約 (\d+) 分(?: \(発展を含めると約 (\d+) 分\))?$")
WAIT_LINE = re.compile(rf"^{re.escape(WAIT_LABEL)} 約 (\d+) 分(?: \(発展は約 (\d+) 分\))?")
PLANS = ("## 時間割 (3 時間)", "## 2 回目の時間割 (3 時間)")
"""The headings of the guide's timetables."""
_SECTION = re.compile(r"^## (\d+)\. ", re.MULTILINE)


@dataclass(frozen=True)
class Excerpt:
    """Sections ``first..last`` of one notebook, after its opening cells (title, set-up) that every
    excerpt keeps; ``last=None``: up to the exercises. The guide's plans use ``first=1`` only."""

    number: str
    last: int | None = None
    first: int = 1

    @property
    def path(self) -> Path:
        """The notebook file (``notebooks/NN_*.ipynb``)."""
        return next(p for p in notebooks() if p.name.startswith(f"{self.number}_"))

    def cells(self) -> list[nbformat.NotebookNode]:
        """The excerpt's cells in order (the exercises and everything after them left out)."""
        kept, section = [], 0
        for cell in core_cells(self.path):
            if cell.cell_type == "markdown":
                number = _SECTION.search(cell.source)
                if number:
                    section = int(number.group(1))
                elif cell.source.lstrip().startswith("## "):
                    section = section and 10**6  # まとめ and the like, after the numbered sections
            if section == 0 or (self.first <= section and (self.last is None or section <= self.last)):
                kept.append(cell)
        return kept

    def sections(self) -> list[int]:
        """The numbered sections (``## N. …``) the excerpt contains."""
        texts = [c.source for c in self.cells() if c.cell_type == "markdown"]
        return [int(m.group(1)) for text in texts for m in _SECTION.finditer(text)]


def reading_minutes(cells: list[nbformat.NotebookNode]) -> float:
    """Minutes to read ``cells`` at the module's rates (waiting for runs not included)."""
    prose = lesson = scaffold = 0
    for cell in cells:
        text = cell.source
        if cell.cell_type == "markdown":
            prose += len(re.sub(r"\s", "", text))
        elif text.strip():
            lines = len(text.strip().splitlines())
            first = text.lstrip().splitlines()[0]
            if first.startswith((SCAFFOLD_MARK, "#@title", "# @title")):
                scaffold += lines
            else:
                lesson += lines
    return prose / PROSE_CHARS_PER_MIN + lesson / LESSON_LINES_PER_MIN + scaffold / SCAFFOLD_LINES_PER_MIN


def undefined_names(cells: list[nbformat.NotebookNode]) -> list[str]:
    """Names the code cells read that nothing before them defines (what would raise NameError), in order.

    Lenient on purpose: a name bound anywhere in a cell (assignment, import, def, loop or comprehension
    variable, argument) counts as defined for that cell, and a name read inside a function body only
    has to be defined somewhere in the cells (it is looked up when the function runs). It finds a
    skipped section, not scoping bugs.
    """
    known = set(dir(builtins)) | {"get_ipython", "display", "In", "Out"}
    missing, late = [], []
    for cell in cells:
        if cell.cell_type != "code":
            continue
        lines = cell.source.splitlines()
        code = "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))
        tree = ast.parse(code)
        inner = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for n in ast.walk(f)
        }
        bound, read = set(), []
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Store | ast.Del):
                    bound.add(node.id)
                else:
                    (late if id(node) in inner else read).append(node.id)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
        missing += [name for name in dict.fromkeys(read) if name not in known and name not in bound]
        known |= bound
    return missing + [name for name in dict.fromkeys(late) if name not in known and name not in missing]


def headings(cells: list[nbformat.NotebookNode]) -> list[tuple[int, str]]:
    """(cell index, line) of every markdown heading of levels 1-3, outside fenced code blocks."""
    found = []
    for i, cell in enumerate(cells):
        if cell.cell_type != "markdown":
            continue
        fenced = False
        for line in cell.source.splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            elif not fenced and re.match(r"#{1,3} ", line):
                found.append((i, line.rstrip()))
    return found


def core_cells(path: Path) -> list[nbformat.NotebookNode]:
    """A notebook's core: every cell before ``## 練習問題`` (what N of its time line covers)."""
    kept = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith(EXERCISES):
            break
        kept.append(cell)
    return kept


def advanced_cells(path: Path) -> list[nbformat.NotebookNode]:
    """The cells of a notebook's ``## 発展: …`` sections (each up to the next ``## `` heading that is
    not one)."""
    kept, inside = [], False
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("## "):
                    inside = line.startswith(ADVANCED)
        if inside:
            kept.append(cell)
    return kept


@dataclass(frozen=True)
class TimeLine:
    """A notebook's time line and the waiting line under it, as numbers (minutes)."""

    core: int
    """N: the core, reading and waiting."""
    with_advanced: int | None
    """M: the core and the 発展 sections (None: no 発展)."""
    wait: int
    """W: the core's waiting on a Colab T4 (an expectation)."""
    advanced_wait: int
    """V: the 発展 sections' waiting (0 when the line gives none)."""


def time_line(path: Path) -> TimeLine:
    """Read ``所要時間: 約 N 分 (発展を含めると約 M 分)`` and the waiting line below it."""
    nb = nbformat.read(path, as_version=4)
    lines = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("所要時間:")]
    if len(starts) != 1:
        raise ValueError(f"{path.name}: needs exactly one line starting '所要時間:', found {len(starts)}")
    found = TIME_LINE.match(lines[starts[0]].strip())
    if not found:
        raise ValueError(
            f"{path.name}: the time line must read '所要時間: 約 N 分', with ' (発展を含めると約 M 分)'"
            f" where 発展 exists, not {lines[starts[0]]!r}"
        )
    waited = WAIT_LINE.match(lines[starts[0] + 1].strip()) if starts[0] + 1 < len(lines) else None
    if not waited:
        raise ValueError(f"{path.name}: the line after the time line must start '{WAIT_LABEL} 約 W 分'")
    core, with_advanced = found.groups()
    wait, advanced_wait = waited.groups()
    return TimeLine(
        int(core), int(with_advanced) if with_advanced else None, int(wait), int(advanced_wait or 0)
    )


def order_problems(path: Path) -> list[str]:
    """Where a notebook's headings leave the pattern's order (module docstring), one line each."""
    cells = nbformat.read(path, as_version=4).cells
    found = headings(cells)
    name = path.name
    if not found or not found[0][1].startswith(f"# {name[:2]} "):
        return [f"{name}: the first heading must be the title '# {name[:2]} …'"]
    problems, stage, section = [], "title", 0
    for index, line in found[1:]:
        where = f"{name}: cell {index} {line!r}"
        if line.startswith("### "):
            if line == SOLUTIONS:
                if stage != "exercises":
                    problems.append(f"{where}: {SOLUTIONS} belongs under {EXERCISES}")
                else:
                    stage = "solutions"
            continue
        numbered = re.match(r"## (\d+)\. ", line)
        if line.startswith("# "):
            problems.append(f"{where}: only the title is a level-1 heading")
        elif line == LEARN:
            if stage != "title":
                problems.append(f"{where}: {LEARN} comes right after the title")
            stage = "learn"
        elif line == SETUP:
            if stage != "learn":
                problems.append(f"{where}: {SETUP} may only follow {LEARN}")
            stage = "setup"
        elif numbered:
            section += 1
            if stage not in ("learn", "setup", "core") or int(numbered.group(1)) != section:
                problems.append(
                    f"{where}: core sections are numbered 1, 2, … after {LEARN} (expected {section}.)"
                )
            if "発展" in line:
                problems.append(f"{where}: 発展 goes after the exercises, as '{ADVANCED}…'")
            stage = "core"
        elif line == SUMMARY:
            if stage != "core":
                problems.append(f"{where}: {SUMMARY} follows the numbered core sections")
            stage = "summary"
        elif line == EXERCISES:
            if stage != "summary":
                problems.append(f"{where}: {EXERCISES} follows {SUMMARY}")
            stage = "exercises"
        elif line.startswith(ADVANCED) or line.startswith(APPENDIX):
            kind = "advanced" if line.startswith(ADVANCED) else "appendix"
            allowed = (
                ("solutions", "advanced") if kind == "advanced" else ("solutions", "advanced", "appendix")
            )
            if stage not in allowed:
                problems.append(
                    f"{where}: after {EXERCISES} and {SOLUTIONS} come {ADVANCED}… then {APPENDIX}…"
                )
            stage = kind
        else:
            problems.append(
                f"{where}: not a heading of the pattern (numbered core, {ADVANCED}…, {APPENDIX}…)"
            )
    if stage not in ("solutions", "advanced", "appendix"):
        problems.append(f"{name}: the notebook must reach {SUMMARY}, {EXERCISES} and {SOLUTIONS}")
    return problems


def timing_problems(path: Path) -> list[str]:
    """Where a notebook's time line disagrees with the reading model (module docstring), one line each."""
    try:
        stated = time_line(path)
    except ValueError as error:
        return [str(error)]
    name, problems = path.name, []
    needed = reading_minutes(core_cells(path)) + stated.wait
    if stated.core > CORE_LIMIT:
        problems.append(
            f"{name}: the core takes {stated.core} minutes; at most {CORE_LIMIT} (move the rest to 発展)"
        )
    if not needed <= stated.core <= rounded_up(needed) + 5:
        problems.append(
            f"{name}: the core needs {needed:.1f} minutes (reading + {stated.wait} waiting): state"
            f" {math.ceil(needed)}–{rounded_up(needed) + 5}, not {stated.core}"
        )
    advanced = advanced_cells(path)
    if bool(advanced) != (stated.with_advanced is not None):
        has = "has" if advanced else "has no"
        problems.append(
            f"{name}: the notebook {has} 発展 sections: the time line's parenthesis says otherwise"
        )
    if not advanced and stated.advanced_wait:
        problems.append(f"{name}: the waiting line gives 発展 waiting, but there is no 発展 section")
    if advanced and stated.with_advanced is not None:
        whole = stated.core + reading_minutes(advanced) + stated.advanced_wait
        if not whole <= stated.with_advanced <= rounded_up(whole) + 10:
            problems.append(
                f"{name}: core and 発展 need {whole:.1f} minutes: state {math.ceil(whole)}–"
                f"{rounded_up(whole) + 10} after 発展を含めると, not {stated.with_advanced}"
            )
    return problems


def cell_problems(path: Path) -> list[str]:
    """Long cells, lesson code shown with ``getsource`` and deferring prose, one line each."""
    problems = []
    for i, cell in enumerate(nbformat.read(path, as_version=4).cells):
        where = f"{path.name}: cell {i}"
        if cell.cell_type == "markdown":
            deferring = [phrase for phrase in DEFERRING if phrase in cell.source]
            problems += [
                f"{where} writes {phrase!r} (COURSE.md: state the conclusion)" for phrase in deferring
            ]
            continue
        tags = cell.metadata.get("tags", [])
        if "getsource" in cell.source:
            problems.append(f"{where} shows code with getsource: put it in an editable (#@save) cell")
        if SETUP_TAG in tags or "solution" in tags:
            continue
        scaffold = cell.source.startswith(SCAFFOLD_MARK)
        limit = SCAFFOLD_CELL_LINES if scaffold else LESSON_CELL_LINES
        if len(cell.source.strip().splitlines()) > limit:
            kind = "scaffolding" if scaffold else "lesson-code"
            problems.append(
                f"{where} has {len(cell.source.strip().splitlines())} lines; a {kind} cell has ≤ {limit}"
            )
    return problems


def pattern_problems(path: Path) -> list[str]:
    """Everything that keeps a notebook from the course pattern: order, time line, cells."""
    return order_problems(path) + timing_problems(path) + cell_problems(path)


def stated_minutes(path: Path) -> int:
    """The number in a notebook's ``所要時間: 約 N 分`` line."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        found = re.search(r"^所要時間: 約 (\d+) 分", cell.source, re.MULTILINE)
        if found:
            return int(found.group(1))
    raise ValueError(f"{path.name}: no line '所要時間: 約 N 分'")


def rounded_up(minutes: float, step: int = 5) -> int:
    """``minutes`` rounded up to a multiple of ``step``."""
    return step * math.ceil(minutes / step)


@dataclass(frozen=True)
class Slot:
    """One row of the guide's timetable: ``| 0:10–0:55 | 内容 | 01 | 1〜6 節 | 読む | 待ち |`` (range also
    ``全体``, ``1 節``); ``wait`` is the last column's minutes (``N 分``), None when it is empty."""

    start: int
    end: int
    excerpt: Excerpt | None
    text: str
    wait: int | None = None

    @property
    def minutes(self) -> int:
        """Length of the slot."""
        return self.end - self.start


_ROW = re.compile(r"^\| (\d+):(\d\d)[–-](\d+):(\d\d) \|(.*)$")
_RANGE = re.compile(r"\| (\d\d) \| (全体|1 節|1〜(\d+) 節) \|")
_MINUTES = re.compile(r"(\d+) 分")


def timetable(guide: str, heading: str) -> list[Slot]:
    """The rows of the table under ``heading`` in the guide's text, in order."""
    lines = guide.split(heading, 1)[1].splitlines()[1:]
    slots = []
    for line in lines:
        if line.startswith("#"):
            break
        row = _ROW.match(line)
        if not row:
            continue
        h1, m1, h2, m2, rest = row.groups()
        found = _RANGE.search(rest)
        excerpt = None
        if found:
            last = 1 if found.group(2) == "1 節" else int(found.group(3)) if found.group(3) else None
            excerpt = Excerpt(found.group(1), last)
        last_column = line.rstrip().rstrip("|").rsplit("|", 1)[-1].strip()
        wait = _MINUTES.fullmatch(last_column)
        start, end = int(h1) * 60 + int(m1), int(h2) * 60 + int(m2)
        slots.append(Slot(start, end, excerpt, line, int(wait.group(1)) if wait else None))
    return slots


def guide_text() -> str:
    """``notebooks/INSTRUCTOR.md``."""
    return (NOTEBOOK_DIR / "INSTRUCTOR.md").read_text(encoding="utf-8")


def total_stated_minutes() -> int:
    """The sum of every notebook's ``所要時間`` (the guide's introduction states it)."""
    return sum(stated_minutes(path) for path in notebooks())


def main() -> None:
    """Print each notebook's estimate, per section, next to its ``所要時間``, then the guide's plans
    (reading + waiting per row against its length), to write and check the plan."""
    print(f"所要時間の合計: {total_stated_minutes()} 分")
    for path in notebooks():
        whole = Excerpt(path.name[:2])
        advanced = advanced_cells(path)
        print(
            f"{path.name}: 中心部分を読む {reading_minutes(core_cells(path)):.1f} 分、発展を読む"
            f" {reading_minutes(advanced):.1f} 分 (所要時間 {stated_minutes(path)} 分)"
        )
        for last in whole.sections():
            print(f"  1〜{last} 節: {reading_minutes(Excerpt(whole.number, last).cells()):.0f} 分")
        for problem in pattern_problems(path):
            print(f"  型から外れている所: {problem}")
    guide, taught = guide_text(), 0
    for heading in PLANS:
        print(heading)
        for slot in timetable(guide, heading):
            reading = reading_minutes(slot.excerpt.cells()) if slot.excerpt else 0.0
            taught += round(reading)
            spare = slot.minutes - reading - (slot.wait or 0)
            time = slot.text.split(" |")[0]
            print(f"  {time} 読む {reading:.1f} + 待ち {slot.wait or 0} 分 (余り {spare:.1f} 分)")
    print(f"授業中に読む見積もりの合計: {taught} 分、残り {total_stated_minutes() - taught} 分")


if __name__ == "__main__":
    main()
