"""``#@save`` cells: lesson code a notebook shows and runs, which ``helpers`` also uses, kept equal.

A code cell whose first line is ``#@save helpers.MODULE`` (d2l's convention) holds only imports and
top-level functions and classes. Each of them must stand at the top level of that module's source
file with the same code: both sides are compared after ``ast.unparse(ast.parse(...))``, which drops
comments and formatting but keeps docstrings, decorators and type hints. Nothing is generated: the
notebook and the module are both written by hand, and ``python -m helpers.tooling.notebooks check``
(so ``make lint``) names every cell and definition that differs. ``notebooks/STYLE.md`` says how to
write and move such a cell.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

from helpers import REPO_ROOT

SAVE_MARK = "#@save"
_SAVE_LINE = re.compile(r"#@save\s+(\S+)\s*$")
_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass(frozen=True)
class SavedCell:
    """One ``#@save`` cell: where it is, the module it names and its code."""

    notebook: str
    index: int
    module: str
    source: str

    @property
    def where(self) -> str:
        """``02_batch_inference.ipynb: cell 12 (#@save helpers.bench)``."""
        return f"{self.notebook}: cell {self.index} ({SAVE_MARK} {self.module})"


def saved_cells(path: Path) -> list[SavedCell]:
    """The ``#@save`` cells of the notebook at ``path``, in order."""
    nb = nbformat.read(path, as_version=4)
    cells = []
    for i, cell in enumerate(nb.cells):
        first = cell.source.lstrip().split("\n", 1)[0] if cell.cell_type == "code" else ""
        if first.startswith(SAVE_MARK):
            found = _SAVE_LINE.fullmatch(first.strip())
            cells.append(SavedCell(path.name, i, found.group(1) if found else "", cell.source))
    return cells


def module_file(module: str) -> Path | None:
    """The source file of ``module`` (``helpers`` or a module under it), found without importing it."""
    if not re.fullmatch(r"helpers(\.[A-Za-z_]\w*)*", module):
        return None
    base = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_definitions(tree: ast.Module) -> dict[str, str]:
    return {node.name: ast.unparse(node) for node in tree.body if isinstance(node, _DEFINITIONS)}


def cell_problems(cell: SavedCell, module_source: str | None = None) -> list[str]:
    """What is wrong with ``cell``: empty when every definition in it equals the module's.

    ``module_source`` is the module's code (read from its file when not given).
    """
    if not cell.module:
        return [f"{cell.where}: the first line must read '{SAVE_MARK} helpers.MODULE'"]
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as error:
        return [f"{cell.where}: does not parse ({error.msg}, line {error.lineno})"]
    problems = []
    for node in tree.body:
        if not isinstance(node, (*_DEFINITIONS, ast.Import, ast.ImportFrom)):
            problems.append(
                f"{cell.where}: line {node.lineno} is neither an import nor a def/class"
                " (a saved cell holds only those; run the code in the next cell)"
            )
    definitions = _top_level_definitions(tree)
    if not definitions:
        problems.append(f"{cell.where}: defines no function or class")
    if module_source is None:
        path = module_file(cell.module)
        if path is None:
            return [*problems, f"{cell.where}: no module {cell.module} in helpers/"]
        module_source = path.read_text(encoding="utf-8")
    theirs = _top_level_definitions(ast.parse(module_source))
    for name, code in definitions.items():
        if name not in theirs:
            problems.append(f"{cell.where}: {name} is not defined at the top level of {cell.module}")
        elif theirs[name] != code:
            problems.append(
                f"{cell.where}: {name} differs from {cell.module}.{name}"
                " (edit both, or move the change into the module first)"
            )
    return problems


def saved_problems(path: Path) -> list[str]:
    """Every problem of every ``#@save`` cell in the notebook at ``path``."""
    return [problem for cell in saved_cells(path) for problem in cell_problems(cell)]
