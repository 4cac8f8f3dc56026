"""``#@save`` cells: the lesson code a notebook runs equals the code ``helpers`` uses, or the check fails."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import nbformat
import pytest

from helpers import REPO_ROOT
from helpers.tooling import notebooks as nbtool
from helpers.tooling.saved_cells import SavedCell, cell_problems, module_file, saved_cells, saved_problems

MODULE = "helpers.verdict"
"""A real module and function the tests save into a cell (any top-level function would do)."""
FUNCTION = "ratio_words"
NOTEBOOK_00 = nbtool.notebooks()[0]


def _real_source() -> str:
    path = REPO_ROOT / "helpers" / "verdict.py"
    text = path.read_text(encoding="utf-8")
    node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == FUNCTION)
    return ast.get_source_segment(text, node)


def _cell(body: str, first: str = f"#@save {MODULE}") -> SavedCell:
    return SavedCell("99_x.ipynb", 3, first.split()[1] if len(first.split()) > 1 else "", f"{first}\n{body}")


def test_an_unchanged_copy_passes_comments_and_layout_aside() -> None:
    code = _real_source()
    assert cell_problems(_cell("from __future__ import annotations\n\n" + code)) == []
    relaid = code.replace(
        "    if ratio >= 1:", "    # a comment the module does not have\n    if ratio >= 1:"
    )
    assert cell_problems(_cell(relaid)) == []  # comments and formatting are not compared


def test_editing_the_body_or_the_docstring_fails_naming_cell_and_function() -> None:
    edited = _real_source().replace("1.95", "2.0")
    assert edited != _real_source()
    assert cell_problems(_cell(edited)) == [
        f"99_x.ipynb: cell 3 (#@save {MODULE}): {FUNCTION} differs from {MODULE}.{FUNCTION}"
        " (edit both, or move the change into the module first)"
    ]
    docstring = _real_source().replace("in the course's words", "in other words")
    assert [p for p in cell_problems(_cell(docstring)) if f"{FUNCTION} differs" in p]


def test_renaming_the_function_fails() -> None:
    renamed = _real_source().replace(f"def {FUNCTION}(", f"def {FUNCTION}_v2(")
    assert cell_problems(_cell(renamed)) == [
        f"99_x.ipynb: cell 3 (#@save {MODULE}): {FUNCTION}_v2 is not defined at the top level of {MODULE}"
    ]


def test_a_saved_cell_holds_only_imports_and_definitions() -> None:
    problems = cell_problems(_cell("import math\n\n" + _real_source() + "\n\nprint(ratio_words(2.0))"))
    assert len(problems) == 1 and "is neither an import nor a def/class" in problems[0]
    assert "defines no function or class" in cell_problems(_cell("import math"))[0]


def test_the_first_line_must_name_a_module_of_helpers() -> None:
    assert "the first line must read" in cell_problems(_cell(_real_source(), first="#@save"))[0]
    assert cell_problems(_cell(_real_source(), first="#@save helpers.no_such_module")) == [
        "99_x.ipynb: cell 3 (#@save helpers.no_such_module): no module helpers.no_such_module in helpers/"
    ]
    assert (
        module_file("os") is None
        and module_file("helpers.models") == REPO_ROOT / "helpers/models/__init__.py"
    )


def _notebook_with_saved_cell(folder: Path, body: str) -> Path:
    """A copy of notebook 00 (badge and set-up cell as the template has them) plus one saved cell."""
    copy = folder / NOTEBOOK_00.name
    shutil.copy(NOTEBOOK_00, copy)
    nb = nbformat.read(copy, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(f"#@save {MODULE}\n{body}"))
    nbformat.write(nb, copy)
    return copy


def test_the_check_command_fails_when_a_saved_cell_is_edited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(nbtool, "NOTEBOOK_DIR", tmp_path)
    path = _notebook_with_saved_cell(tmp_path, _real_source())
    index = len(nbformat.read(path, as_version=4).cells) - 1
    assert [c.index for c in saved_cells(path)] == [index]
    assert nbtool.main(["check"]) == 0
    _notebook_with_saved_cell(tmp_path, _real_source().replace("速い", "早い"))
    assert nbtool.main(["check"]) == 1
    assert f"cell {index} (#@save {MODULE}): {FUNCTION} differs" in capsys.readouterr().err


def test_every_saved_cell_of_the_course_equals_its_module() -> None:
    assert [p for path in nbtool.notebooks() for p in saved_problems(path)] == []


def test_editing_a_saved_cell_of_notebook_02_fails_the_check() -> None:
    """02's lesson code is the code ``helpers.bench`` measures: a changed line in its cell is caught."""
    notebook = next(p for p in nbtool.notebooks() if p.name.startswith("02_"))
    cells = [c for c in saved_cells(notebook) if c.module == "helpers.bench"]
    assert len(cells) >= 4  # a-c, d, e and g are saved cells
    edited_cells = 0
    for cell in cells:
        assert cell_problems(cell) == []
        edited = SavedCell(
            cell.notebook, cell.index, cell.module, cell.source.replace("s.batch_size", "1", 1)
        )
        if edited.source != cell.source:
            edited_cells += 1
            assert any(" differs from helpers.bench." in p for p in cell_problems(edited)), cell.where
    assert edited_cells >= 2
