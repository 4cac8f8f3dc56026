"""Keep every notebook's Colab badge and set-up cell generated from one template.

``python -m helpers.tooling.notebooks sync [--slug OWNER/NAME] [--ref REF]`` rewrites them (and saves a
new slug/ref to ``notebooks/colab.json``); ``python -m helpers.tooling.notebooks check`` lists notebooks
that drifted from the template and exits 1 if any did.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from helpers import REPO_ROOT

NOTEBOOK_DIR: Path = REPO_ROOT / "notebooks"
CONFIG_PATH: Path = NOTEBOOK_DIR / "colab.json"
REQUIREMENTS: Path = REPO_ROOT / "requirements.txt"
BADGE_TAG = "colab-badge"
SETUP_TAG = "colab-setup"

BASE_PACKAGES: dict[str, str] = {"matplotlib_fontja": "matplotlib-fontja"}
"""What every notebook needs that Colab lacks: import name → distribution name."""

EXTRAS: dict[str, dict[str, str]] = {
    "dali": {"nvidia.dali": "nvidia-dali-cuda120"},
    "ray": {"ray": "ray"},
}
"""Per-notebook extras (``metadata.course.extras``): import name → distribution name."""

SETUP_TEMPLATE = """\
#@title セットアップ (実行するだけで大丈夫です。中身はダブルクリックで表示)
# 環境のセットアップ: Colab ではこの講座のリポジトリを取得し、Colab にないパッケージだけを入れます。
# Colab 以外では何も表示せず、helpers を import できるようにするだけです。
# (このセルは `python -m helpers.tooling.notebooks sync` が生成します。直接編集しないでください。)
import importlib.util
import os
import subprocess
import sys

COURSE_REPO = os.environ.get("COURSE_REPO_URL", "https://github.com/{slug}.git")
COURSE_REF = "{ref}"
COLAB_PACKAGES = {packages}


def _course_setup() -> None:
    def has(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False

    if not has("google.colab"):
        for root in (os.path.abspath(""), os.path.dirname(os.path.abspath(""))):
            if os.path.isfile(os.path.join(root, "helpers", "__init__.py")) and root not in sys.path:
                sys.path.insert(0, root)
        return
    root = os.path.join(os.getcwd(), "{dirname}")
    if not os.path.isdir(os.path.join(root, "helpers")):
        subprocess.run(
            ["git", "clone", "--quiet", "--depth", "1", "--branch", COURSE_REF, COURSE_REPO, root], check=True
        )
    missing = [pip_name for module, pip_name in COLAB_PACKAGES.items() if not has(module)]
    if missing:
        from IPython import get_ipython

        quiet = "--quiet --disable-pip-version-check --root-user-action=ignore"  # no notices from pip itself
        get_ipython().run_line_magic("pip", " ".join(["install", quiet, *missing]))
    if root not in sys.path:
        sys.path.insert(0, root)
    print(f"セットアップ完了: {{root}} (追加したパッケージ: {{', '.join(missing) or 'なし'}})")


_course_setup()"""


def load_config() -> dict[str, str]:
    """The repository slug and ref the badges and set-up cells point at."""
    return json.loads(CONFIG_PATH.read_text(encoding="utf-8"))


def save_config(slug: str, ref: str) -> None:
    """Point badges and set-up cells at another repository (a fork) or ref."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", slug):
        raise ValueError(f"slug must look like OWNER/NAME, got {slug!r}")
    CONFIG_PATH.write_text(json.dumps({"slug": slug, "ref": ref}, indent=2) + "\n", encoding="utf-8")


def pinned(distribution: str) -> str:
    """``distribution`` with the version pin requirements.txt gives it (the one place pins live)."""
    pattern = re.compile(rf"^{re.escape(distribution)}(\[[\w,]+\])?\s*([=<>!~].*)?$", re.IGNORECASE)
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        match = pattern.match(line.split("#", 1)[0].strip())
        if match:
            return line.split("#", 1)[0].strip().replace(" ", "")
    return distribution


def render_badge(notebook: str, slug: str, ref: str) -> str:
    """The "Open in Colab" badge for ``notebooks/<notebook>``."""
    url = f"https://colab.research.google.com/github/{slug}/blob/{ref}/notebooks/{notebook}"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def render_setup(extras: list[str], slug: str, ref: str) -> str:
    """The first code cell of a notebook that needs ``extras`` (e.g. ``["dali"]``)."""
    modules = dict(BASE_PACKAGES)
    for extra in extras:
        if extra not in EXTRAS:
            raise KeyError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
        modules.update(EXTRAS[extra])
    packages = "{\n" + "".join(f'    "{m}": "{pinned(d)}",\n' for m, d in modules.items()) + "}"
    return SETUP_TEMPLATE.format(slug=slug, ref=ref, packages=packages, dirname=slug.split("/")[1])


@dataclass(frozen=True)
class PlannedNotebook:
    """One notebook of the course as notebook 00 lists it (read from the notebook itself)."""

    name: str
    title: str
    minutes: str
    """The notebook's ``所要時間:`` line, without the label."""
    installs: list[str]
    """What its set-up cell installs on Colab (pinned), beyond what Colab has."""


def _paragraph_after(lines: list[str], label: str) -> str:
    """The text after ``label`` on its line and the lines that continue its paragraph, joined."""
    for i, line in enumerate(lines):
        if line.startswith(label):
            parts = [line[len(label) :].strip()]
            for more in lines[i + 1 :]:
                if not more.strip() or more.lstrip().startswith(("#", "-", "|")):
                    break
                parts.append(more.strip())
            return "".join(parts)
    return ""


def course_plan() -> list[PlannedNotebook]:
    """Every notebook's title, ``所要時間`` and Colab installs (notebook 00, section コースの構成).

    Read from the files rather than written twice, so notebook 00 cannot drift from them.
    """
    plan = []
    for path in notebooks():
        nb = nbformat.read(path, as_version=4)
        lines = [line for c in nb.cells if c.cell_type == "markdown" for line in c.source.splitlines()]
        title = next((line[2:] for line in lines if line.startswith("# ")), path.stem)
        minutes = _paragraph_after(lines, "所要時間:")
        modules = dict(BASE_PACKAGES)
        for extra in nb.metadata.get("course", {}).get("extras", []):
            modules.update(EXTRAS[extra])
        plan.append(PlannedNotebook(path.name, title, minutes, [pinned(d) for d in modules.values()]))
    return plan


def notebooks() -> list[Path]:
    """The course notebooks, in order."""
    return sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def _tagged(nb: nbformat.NotebookNode, tag: str) -> int | None:
    for i, cell in enumerate(nb.cells):
        if tag in cell.get("metadata", {}).get("tags", []):
            return i
    return None


def expected_cells(path: Path, nb: nbformat.NotebookNode) -> tuple[str, str]:
    """(badge source, set-up source) that ``path`` should carry."""
    config = load_config()
    extras = list(nb.metadata.get("course", {}).get("extras", []))
    return (
        render_badge(path.name, config["slug"], config["ref"]),
        render_setup(extras, config["slug"], config["ref"]),
    )


def sync_notebook(path: Path) -> bool:
    """Write the badge (first cell) and set-up cell (first code cell) into ``path``; True if changed."""
    nb = nbformat.read(path, as_version=4)
    badge, setup = expected_cells(path, nb)
    changed = False
    i = _tagged(nb, BADGE_TAG)
    if i is None:
        nb.cells.insert(0, nbformat.v4.new_markdown_cell(badge, metadata={"tags": [BADGE_TAG]}))
        changed = True
    elif nb.cells[i].source != badge:
        nb.cells[i].source = badge
        changed = True
    j = _tagged(nb, SETUP_TAG)
    if j is None:
        first_code = next((k for k, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
        nb.cells.insert(first_code, nbformat.v4.new_code_cell(setup, metadata={"tags": [SETUP_TAG]}))
        changed = True
    elif nb.cells[j].source != setup:
        nb.cells[j].source = setup
        changed = True
    j = _tagged(nb, SETUP_TAG)
    if nb.cells[j].metadata.get("cellView") != "form":  # Colab shows the #@title line only
        nb.cells[j].metadata["cellView"] = "form"
        changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def check_notebook(path: Path) -> list[str]:
    """Problems with ``path``'s badge and set-up cell (empty when it matches the template)."""
    nb = nbformat.read(path, as_version=4)
    badge, setup = expected_cells(path, nb)
    problems = []
    i = _tagged(nb, BADGE_TAG)
    if i != 0 or nb.cells[0].source != badge:
        problems.append(f"{path.name}: the first cell is not the Colab badge from the template")
    j = _tagged(nb, SETUP_TAG)
    first_code = next((k for k, c in enumerate(nb.cells) if c.cell_type == "code"), None)
    if j is None or j != first_code or nb.cells[j].source != setup:
        problems.append(f"{path.name}: the first code cell is not the set-up cell from the template")
    elif nb.cells[j].metadata.get("cellView") != "form":
        problems.append(f"{path.name}: the set-up cell is not a Colab form (metadata cellView: form)")
    return problems


SCAFFOLD_MARK = "# 補助コード"
"""First line of a cell that only times, plots or plumbs (``# 補助コード — グラフ``): skim, do not type."""

PLOTTING = re.compile(r"\b(plt|plots)\.|\.savefig\(|\bfig\b")
"""Code that draws: a cell containing it is scaffolding and must carry :data:`SCAFFOLD_MARK`."""


def scaffold_problems(path: Path) -> list[str]:
    """Plotting cells that do not start with :data:`SCAFFOLD_MARK` (the set-up cell and hidden
    solutions are exempt)."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type != "code" or SETUP_TAG in tags or "solution" in tags:
            continue
        if PLOTTING.search(cell.source) and not cell.source.startswith(SCAFFOLD_MARK):
            problems.append(f"{path.name}: cell {i} draws a plot but does not start with {SCAFFOLD_MARK!r}")
    return problems


BANNED_TERMS: dict[str, str] = {
    "メモリー": "メモリ",
    "バッファ(?!ー)": "バッファー",
    "フォルダ(?!ー)": "フォルダー",
    "パラメータ(?!ー)": "パラメーター",
    "デコーダ(?!ー)": "デコーダー",
    "エンコーダ(?!ー)": "エンコーダー",
    "ヘッダ(?!ー)": "ヘッダー",
    "サーバ(?!ー)": "サーバー",
    "ユーザ(?!ー)": "ユーザー",
    "コンピュータ(?!ー)": "コンピューター",
    "プロセッサ(?!ー)": "プロセッサー",
    "ライブラリー": "ライブラリ",
    "キャッシュを甘やかす": "(言い換える: 何が起きるかを書く)",
}
"""Spelling variants the course does not use (regex → the form notebooks/STYLE.md prescribes)."""


def style_problems(path: Path) -> list[str]:
    """Banned spelling variants (:data:`BANNED_TERMS`) anywhere in ``path``'s cells."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        for pattern, preferred in BANNED_TERMS.items():
            found = re.search(pattern, cell.source)
            if found:
                word = found.group(0)
                problems.append(f"{path.name}: cell {i} writes {word!r}; use {preferred!r} (STYLE.md)")
    return problems


CHECK_MARK = "# NBVAL_CHECK_OUTPUT"


def is_checked(cell: nbformat.NotebookNode) -> bool:
    """True for a code cell whose output nbval compares (marked ``# NBVAL_CHECK_OUTPUT``)."""
    return cell.cell_type == "code" and CHECK_MARK in cell.source


def output_problems(path: Path) -> list[str]:
    """Stored outputs that break the rule: only ``# NBVAL_CHECK_OUTPUT`` cells keep theirs."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if is_checked(cell) and not cell.outputs:
            problems.append(f"{path.name}: cell {i} is marked {CHECK_MARK} but has no stored output")
        if not is_checked(cell) and cell.outputs:
            problems.append(
                f"{path.name}: cell {i} has outputs; strip them (python -m helpers.tooling.notebooks outputs)"
            )
    if "widgets" in nb.metadata:  # progress-bar state an editor saved: an output kept in the metadata
        problems.append(
            f"{path.name}: metadata.widgets keeps widget state;"
            " strip it (python -m helpers.tooling.notebooks outputs)"
        )
    return problems


def refresh_outputs(path: Path, timeout: int = 1200) -> None:
    """Execute ``path`` and store outputs only for ``# NBVAL_CHECK_OUTPUT`` cells (others stripped)."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    for cell in nb.cells:
        if cell.cell_type == "code":
            if not is_checked(cell):  # nbval needs an execution count on the cells it compares
                cell.outputs = []
                cell.execution_count = None
            cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)  # the progress bars' widget state is output too
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m helpers.tooling.notebooks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sync_parser = sub.add_parser("sync", help="rewrite badges and set-up cells from the template")
    sync_parser.add_argument("--slug", help="GitHub OWNER/NAME to point at (saved in notebooks/colab.json)")
    sync_parser.add_argument("--ref", help="branch or tag the badges and clones use")
    sub.add_parser("check", help="exit 1 if any notebook differs from the template or keeps stray outputs")
    out_parser = sub.add_parser(
        "outputs", help="run notebooks; keep outputs of NBVAL_CHECK_OUTPUT cells only"
    )
    out_parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    args = parser.parse_args(argv)
    if args.command == "sync":
        if args.slug or args.ref:
            config = load_config()
            save_config(args.slug or config["slug"], args.ref or config["ref"])
        for path in notebooks():
            print(f"{'updated' if sync_notebook(path) else 'ok     '} {path.name}")
        return 0
    if args.command == "outputs":
        for path in notebooks():
            if not args.names or path.name in args.names:
                print(f"running {path.name}", flush=True)
                refresh_outputs(path)
        return 0
    problems = [p for path in notebooks() for p in check_notebook(path) + output_problems(path)]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
