"""How long a learner needs for a notebook or an excerpt of it, and the instructor's plan that uses it.

The estimate is a reading model, not a measurement of a class: prose at ``PROSE_CHARS_PER_MIN``
characters a minute, lesson code at ``LESSON_LINES_PER_MIN`` lines a minute (read, run, look at the
output), scaffolding (``# 補助コード`` and the set-up cell) skimmed at ``SCAFFOLD_LINES_PER_MIN``. Waiting
for a run on Colab comes on top; each notebook's ``所要時間`` line says it, and each row of the guide's
timetable gives it its own column (``待ち``, minutes, an expectation). The exercises (``## 練習問題``
onwards) are not counted. ``notebooks/INSTRUCTOR.md`` states the rates, and ``tests/test_workshop.py``
holds every ``所要時間`` line, the guide's timetable (reading + waiting per row) and its totals to them.
"""

from __future__ import annotations

import ast
import builtins
import math
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from helpers.tooling.notebooks import NOTEBOOK_DIR, SCAFFOLD_MARK, notebooks

PROSE_CHARS_PER_MIN = 400
"""Japanese technical prose read carefully (everyday reading is faster, ~500-600 characters a minute)."""
LESSON_LINES_PER_MIN = 8
SCAFFOLD_LINES_PER_MIN = 30
EXERCISES = "## 練習問題"
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
        nb = nbformat.read(self.path, as_version=4)
        kept, section = [], 0
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                if cell.source.lstrip().startswith(EXERCISES):
                    break
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
        print(f"{path.name}: 約 {reading_minutes(whole.cells()):.0f} 分 (所要時間 {stated_minutes(path)} 分)")
        for last in whole.sections():
            print(f"  1〜{last} 節: {reading_minutes(Excerpt(whole.number, last).cells()):.0f} 分")
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
