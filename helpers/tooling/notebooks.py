"""Keep every notebook's Colab badge and set-up cell generated from one template, and its saved cells true.

``python -m helpers.tooling.notebooks sync [--slug OWNER/NAME] [--ref REF]`` rewrites them (and saves a
new slug/ref to ``notebooks/colab.json``); ``python -m helpers.tooling.notebooks check`` lists notebooks
that drifted from the template, keep stray outputs, or hold a ``#@save`` cell whose code differs from
its module's (:mod:`helpers.tooling.saved_cells`), and exits 1 if any does.
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
from helpers.tooling.saved_cells import saved_problems

NOTEBOOK_DIR: Path = REPO_ROOT / "notebooks"
CONFIG_PATH: Path = NOTEBOOK_DIR / "colab.json"
REQUIREMENTS: Path = REPO_ROOT / "requirements.txt"
BADGE_TAG = "colab-badge"
SETUP_TAG = "colab-setup"


@dataclass(frozen=True)
class Package:
    """One package the set-up cell installs on Colab when it is missing there.

    ``module`` is the import name that shows it is present. ``cpu`` is the distribution installed on
    every runtime, unless ``gpu`` names another one for GPU runtimes (``onnxruntime`` /
    ``onnxruntime-gpu``); then the cell installs the one that fits the runtime, when that very
    distribution is missing. A name without ``==`` takes its pin from requirements.txt (the one
    place pins live); a name with ``==`` carries its own pin (a GPU build that CI never installs).
    """

    module: str
    cpu: str
    gpu: str | None = None

    def distributions(self) -> list[str]:
        """Every distribution this package may install, without pins."""
        names = [self.cpu] if self.gpu is None else [self.gpu, self.cpu]
        return [name.split("==")[0] for name in names]

    def requirement(self, gpu: bool) -> str:
        """The pinned requirement the set-up cell installs on a GPU (``gpu``) or CPU runtime."""
        return pinned(self.gpu if gpu and self.gpu else self.cpu)

    def described(self) -> str:
        """For people: ``onnxruntime-gpu==… (GPU) / onnxruntime==… (CPU)``, or the one requirement."""
        if self.gpu is None:
            return self.requirement(False)
        return f"{self.requirement(True)} (GPU) / {self.requirement(False)} (CPU)"

    def rendered(self) -> str:
        """How the set-up cell's ``COLAB_PACKAGES`` writes it: a requirement, or one per runtime."""
        if self.gpu is None:
            return f'"{pinned(self.cpu)}"'
        return f'{{"gpu": "{pinned(self.gpu)}", "cpu": "{pinned(self.cpu)}"}}'


BASE_PACKAGES: tuple[Package, ...] = (Package("matplotlib_fontja", "matplotlib-fontja"),)
"""What every notebook needs that Colab lacks."""

EXTRAS: dict[str, tuple[Package, ...]] = {
    "dali": (Package("nvidia.dali", "nvidia-dali-cuda120"),),
    "ray": (Package("ray", "ray"),),
    "onnx": (
        # the last onnxruntime-gpu built for CUDA 12, as Colab's torch is (requirements.txt: how we know)
        Package("onnxruntime", "onnxruntime", gpu="onnxruntime-gpu==1.26.0"),
        Package("onnx", "onnx"),
        Package("onnxscript", "onnxscript"),
    ),
}
"""Per-notebook extras (``metadata.course.extras``): name → the packages it adds."""


def packages(extras: list[str]) -> list[Package]:
    """What the set-up cell of a notebook with ``extras`` (e.g. ``["dali"]``) installs where missing."""
    chosen = list(BASE_PACKAGES)
    for extra in extras:
        if extra not in EXTRAS:
            raise KeyError(f"unknown extra {extra!r}; known: {sorted(EXTRAS)}")
        chosen += EXTRAS[extra]
    return chosen


def colab_installs(extras: list[str], gpu: bool = True) -> list[str]:
    """The pinned requirements the set-up cell installs on a fresh GPU (or CPU) runtime."""
    return [package.requirement(gpu) for package in packages(extras)]


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
{choose}    if missing:
        from IPython import get_ipython

        quiet = "--quiet --disable-pip-version-check --root-user-action=ignore"  # no notices from pip itself
        get_ipython().run_line_magic("pip", " ".join(["install", quiet, *missing]))
    if root not in sys.path:
        sys.path.insert(0, root)
    print(f"セットアップ完了: {{root}} (追加したパッケージ: {{', '.join(missing) or 'なし'}})")


_course_setup()"""


CHOOSE_ANY = """\
    missing = [pip_name for module, pip_name in COLAB_PACKAGES.items() if not has(module)]
"""
"""The template's ``{choose}`` slot when every package has one build."""

CHOOSE_BY_RUNTIME = """\
    import shutil
    from importlib.metadata import PackageNotFoundError, version

    gpu = shutil.which("nvidia-smi") is not None  # a GPU runtime: packages built per runtime take that build
    missing = []
    for module, pip_name in COLAB_PACKAGES.items():
        if isinstance(pip_name, dict):  # built per runtime: is this runtime's build installed?
            pip_name = pip_name["gpu" if gpu else "cpu"]
            try:
                version(pip_name.split("==")[0])
            except PackageNotFoundError:
                missing.append(pip_name)
        elif not has(module):
            missing.append(pip_name)
"""
"""The ``{choose}`` slot when a package has a GPU and a CPU build (:class:`Package` with ``gpu``)."""


def load_config() -> dict[str, str]:
    """The repository slug and ref the badges and set-up cells point at."""
    return json.loads(CONFIG_PATH.read_text(encoding="utf-8"))


def save_config(slug: str, ref: str) -> None:
    """Point badges and set-up cells at another repository (a fork) or ref."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", slug):
        raise ValueError(f"slug must look like OWNER/NAME, got {slug!r}")
    CONFIG_PATH.write_text(json.dumps({"slug": slug, "ref": ref}, indent=2) + "\n", encoding="utf-8")


def pinned(distribution: str) -> str:
    """``distribution`` with the version pin requirements.txt gives it (the one place pins live);
    a name that already carries ``==`` is returned as it is."""
    if "==" in distribution:
        return distribution
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
    chosen = packages(extras)
    rows = "".join(f'    "{p.module}": {p.rendered()},\n' for p in chosen)
    choose = CHOOSE_BY_RUNTIME if any(p.gpu for p in chosen) else CHOOSE_ANY
    return SETUP_TEMPLATE.format(
        slug=slug, ref=ref, packages="{\n" + rows + "}", dirname=slug.split("/")[1], choose=choose
    )


@dataclass(frozen=True)
class PlannedNotebook:
    """One notebook of the course as notebook 00 lists it (read from the notebook itself)."""

    name: str
    title: str
    minutes: str
    """The notebook's ``所要時間:`` line, without the label."""
    installs: list[str]
    """What its set-up cell installs on Colab (pinned), beyond what Colab has; a package with a GPU build
    reads ``GPU==… (GPU) / CPU==… (CPU)``."""


WAIT_LABEL = "実行の待ち (Colab T4 の見込み):"
"""The line after the time line that states the expected waiting (helpers.tooling.workshop reads it)."""


def _paragraph_after(lines: list[str], label: str) -> str:
    """The text after ``label`` on its line and the lines that continue its paragraph, joined."""
    for i, line in enumerate(lines):
        if line.startswith(label):
            parts = [line[len(label) :].strip()]
            for more in lines[i + 1 :]:
                if not more.strip() or more.lstrip().startswith(("#", "-", "|", WAIT_LABEL)):
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
        extras = nb.metadata.get("course", {}).get("extras", [])
        plan.append(PlannedNotebook(path.name, title, minutes, [p.described() for p in packages(extras)]))
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
    sub.add_parser(
        "check",
        help="exit 1 if any notebook differs from the template, keeps stray outputs or has a #@save cell"
        " that differs from its module",
    )
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
    problems = [
        p for path in notebooks() for p in check_notebook(path) + output_problems(path) + saved_problems(path)
    ]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
