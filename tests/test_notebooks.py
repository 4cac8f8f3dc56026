"""Notebook tooling: badge + set-up cell from one template, skeleton, outputs, quiet stderr, make run/lab."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from helpers import REPO_ROOT
from helpers.tooling import notebooks as nbtool

NOTEBOOKS = nbtool.notebooks()


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS and NOTEBOOKS[0].name == "00_setup_check.ipynb"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_setup_cell_match_the_template(path: Path) -> None:
    assert nbtool.check_notebook(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_stripped_except_checked_cells(path: Path) -> None:
    assert nbtool.output_problems(path) == []


def test_saved_widget_state_counts_as_an_output(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    path = tmp_path / "99_widgets.ipynb"
    nbformat.write(nb, path)
    assert [p for p in nbtool.output_problems(path) if "metadata.widgets" in p]
    del nb.metadata["widgets"]
    nbformat.write(nb, path)
    assert nbtool.output_problems(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_skeleton(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    lines = markdown.splitlines()
    number = path.name[:2]
    assert any(line.startswith(f"# {number} ") for line in lines), "title '# NN …'"
    for heading in ("## このノートブックで学ぶこと", "## まとめ", "## 練習問題", "### 解答例"):
        assert heading in lines, heading
    assert any(line.startswith("所要時間:") for line in lines)
    solutions = [c for c in nb.cells if "solution" in c.metadata.get("tags", [])]
    assert solutions, "exercises need solution cells"
    for cell in solutions:
        assert cell.cell_type == "code" and cell.metadata["jupyter"]["source_hidden"] is True


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plotting_cells_are_marked_as_scaffolding(path: Path) -> None:
    assert nbtool.scaffold_problems(path) == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_banned_spelling_variants(path: Path) -> None:
    assert nbtool.style_problems(path) == []


LENGTH_CHECKED = [p for p in NOTEBOOKS if p.name[:2] in {"00", "01", "02", "03"}]
"""Notebooks held to STYLE.md's cell lengths (04-07 follow with their own issues)."""


@pytest.mark.parametrize("path", LENGTH_CHECKED, ids=lambda p: p.name)
def test_cells_are_short(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    long = []
    for i, cell in enumerate(nb.cells):
        tags = cell.metadata.get("tags", [])
        if cell.cell_type != "code" or nbtool.SETUP_TAG in tags or "solution" in tags:
            continue
        limit = 40 if cell.source.startswith(nbtool.SCAFFOLD_MARK) else 30
        if len(cell.source.splitlines()) > limit:
            long.append((i, len(cell.source.splitlines()), limit))
    assert long == [], f"(cell, lines, limit): {long}"


def test_style_file_prescribes_every_preferred_form_and_the_rules() -> None:
    style = (REPO_ROOT / "notebooks" / "STYLE.md").read_text(encoding="utf-8")
    for preferred in nbtool.BANNED_TERMS.values():
        if not preferred.startswith("("):
            assert preferred in style, preferred
    assert nbtool.SCAFFOLD_MARK in style and "NBVAL_CHECK_OUTPUT" in style and "helpers.verdict" in style


def test_checks_catch_an_unmarked_plot_a_variant_and_a_plain_setup_cell(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("fig = plots.throughput_bar(table)"),
        nbformat.v4.new_markdown_cell("GPU のメモリーを使います"),
        nbformat.v4.new_code_cell(nbtool.SCAFFOLD_MARK + " — グラフ\nplt.show()"),
    ]
    path = tmp_path / "99_x.ipynb"
    nbformat.write(nb, path)
    assert [p.split(": ")[1][:6] for p in nbtool.scaffold_problems(path)] == ["cell 0"]
    assert nbtool.style_problems(path) == ["99_x.ipynb: cell 1 writes 'メモリー'; use 'メモリ' (STYLE.md)"]
    setup = nbtool.render_setup([], "me/course", "v1")
    assert setup.startswith("#@title ")  # Colab shows this line and hides the code (cellView: form)


def test_setup_template_renders_extras_and_pins() -> None:
    plain = nbtool.render_setup([], "me/course", "v1")
    assert '"matplotlib_fontja": "matplotlib-fontja==' in plain
    assert "https://github.com/me/course.git" in plain and 'COURSE_REF = "v1"' in plain
    packages = plain.split("COLAB_PACKAGES = {")[1].split("\n}")[0]
    assert "matplotlib" in packages and "torch" not in packages
    dali = nbtool.render_setup(["dali"], "me/course", "v1")
    assert '"nvidia.dali": "nvidia-dali-cuda120==' in dali
    with pytest.raises(KeyError):
        nbtool.render_setup(["nope"], "me/course", "v1")
    badge = nbtool.render_badge("01_x.ipynb", "me/course", "v1")
    assert badge.endswith("(https://colab.research.google.com/github/me/course/blob/v1/notebooks/01_x.ipynb)")


CHOICE = nbtool.Package("no_such_module_xyz", "cpu-build==1.0", gpu="gpu-build==1.0")
"""A package built per runtime (as onnxruntime / onnxruntime-gpu), pinned in place."""


def test_an_extra_may_choose_a_gpu_or_cpu_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(nbtool.EXTRAS, "choice", (CHOICE,))
    setup = nbtool.render_setup(["choice"], "me/course", "v1")
    assert '"no_such_module_xyz": {"gpu": "gpu-build==1.0", "cpu": "cpu-build==1.0"},' in setup
    assert 'shutil.which("nvidia-smi")' in setup
    assert "nvidia-smi" not in nbtool.render_setup(["dali"], "me/course", "v1")  # only where a choice exists
    assert nbtool.colab_installs(["choice"], gpu=False) == ["matplotlib-fontja==1.1.0", "cpu-build==1.0"]
    assert nbtool.colab_installs(["choice"], gpu=True)[-1] == "gpu-build==1.0"
    assert CHOICE.described() == "gpu-build==1.0 (GPU) / cpu-build==1.0 (CPU)"
    assert CHOICE.distributions() == ["gpu-build", "cpu-build"]


@pytest.mark.parametrize(("runtime", "installed"), [("gpu", "gpu-build==1.0"), ("cpu", "cpu-build==1.0")])
def test_the_setup_cell_installs_the_build_that_fits_the_runtime(
    runtime: str, installed: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered cell on a stand-in Colab (google.colab importable, the clone in place, pip recorded),
    with and without ``nvidia-smi`` on PATH; a build that is already there is not installed again."""
    monkeypatch.setitem(
        nbtool.EXTRAS, "choice", (CHOICE, nbtool.Package("x_mod", "pytest==0.1", gpu="pytest==0.1"))
    )
    stubs, bin_dir = tmp_path / "stubs", tmp_path / "bin"
    for name, code in {
        "google/__init__.py": "",
        "google/colab/__init__.py": "",
        "IPython/__init__.py": "class _Shell:\n    def run_line_magic(self, magic, line):\n"
        "        print('MAGIC', magic, line)\n\ndef get_ipython():\n    return _Shell()\n",
    }.items():
        (stubs / name).parent.mkdir(parents=True, exist_ok=True)
        (stubs / name).write_text(code)
    bin_dir.mkdir()
    if runtime == "gpu":
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    (tmp_path / "course" / "helpers").mkdir(parents=True)  # the clone is there: no git clone
    script = tmp_path / "cell.py"
    script.write_text(nbtool.render_setup(["choice"], "me/course", "v1"))
    env = dict(os.environ, PYTHONPATH=str(stubs), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    magic = [line for line in result.stdout.splitlines() if line.startswith("MAGIC")]
    assert len(magic) == 1 and magic[0].endswith(f" {installed}"), result.stdout  # pytest is installed
    assert f"追加したパッケージ: {installed})" in result.stdout


def test_sync_fixes_drift_and_check_reports_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / NOTEBOOKS[0].name
    shutil.copy(NOTEBOOKS[0], copy)
    nb = nbformat.read(copy, as_version=4)
    setup = next(c for c in nb.cells if nbtool.SETUP_TAG in c.metadata.get("tags", []))
    setup.source += "\nprint('edited by hand')"
    nbformat.write(nb, copy)
    assert any("set-up cell" in p for p in nbtool.check_notebook(copy))
    assert nbtool.sync_notebook(copy) is True
    assert nbtool.check_notebook(copy) == []
    assert nbtool.sync_notebook(copy) is False


def test_slug_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nbtool, "CONFIG_PATH", tmp_path / "colab.json")
    nbtool.save_config("someone/fork", "dev")
    assert nbtool.load_config() == {"slug": "someone/fork", "ref": "dev"}
    with pytest.raises(ValueError):
        nbtool.save_config("not a slug", "main")


def test_setup_cell_outside_colab_is_silent_and_finds_helpers(tmp_path: Path) -> None:
    """The rendered cell, run from notebooks/ (as Jupyter does) in a fresh interpreter, prints nothing."""
    config = nbtool.load_config()
    script = tmp_path / "cell.py"
    script.write_text(
        nbtool.render_setup([], config["slug"], config["ref"])
        + "\nimport helpers\nprint(helpers.REPO_ROOT)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", str(script)],
        cwd=REPO_ROOT / "notebooks",
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(REPO_ROOT)  # nothing else printed
    assert result.stderr == ""


def test_nbval_fails_a_cell_that_writes_to_stderr(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("print('fine')"),
        nbformat.v4.new_code_cell("import warnings\nwarnings.warn('noisy')"),
    ]
    nbformat.write(nb, tmp_path / "noisy.ipynb")
    shutil.copy(REPO_ROOT / "notebooks" / "conftest.py", tmp_path / "conftest.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-q", "-p", "no:cacheprovider", "noisy.ipynb"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "1 failed, 1 passed" in result.stdout and "wrote to stderr" in result.stdout


def test_run_notebooks_removes_copies_of_notebooks_that_no_longer_exist(tmp_path: Path) -> None:
    from helpers.tooling import run_notebooks

    (tmp_path / "06_scale_out_ray.ipynb").write_text("{}", encoding="utf-8")  # renamed since
    (tmp_path / "00_setup_check.ipynb").write_text("{}", encoding="utf-8")
    assert run_notebooks.remove_stale_copies(tmp_path, {"00_setup_check.ipynb"}) == ["06_scale_out_ray.ipynb"]
    assert [p.name for p in tmp_path.iterdir()] == ["00_setup_check.ipynb"]


def test_run_notebooks_writes_copies_and_summary(tmp_path: Path) -> None:
    from helpers.tooling import run_notebooks

    assert run_notebooks.main(["00_setup_check.ipynb", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "00_setup_check.ipynb").exists()
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["runs"][0]["ok"] is True and summary["runs"][0]["stderr_cells"] == 0
    assert "00_setup_check.ipynb" in (tmp_path / "summary.md").read_text(encoding="utf-8")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_jupyterlab_serves_lab(tmp_path: Path) -> None:
    port = _free_port()
    jupyter = Path(sys.executable).with_name("jupyter")
    command = [
        str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
        "--IdentityProvider.token=", f"--notebook-dir={REPO_ROOT / 'notebooks'}", "--allow-root",
    ]  # fmt: skip
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path), JUPYTER_CONFIG_DIR=str(tmp_path / "config"))
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=5) as response:
                    body = response.read().decode()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        assert response.status == 200 and "JupyterLab" in body
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_links_every_notebook_with_a_badge() -> None:
    """A new notebook needs its row in README's table: this test says so, one line per notebook."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    config = nbtool.load_config()
    missing = [
        f"README.md: no table row links notebooks/{path.name} with its Colab badge"
        f" {nbtool.render_badge(path.name, config['slug'], config['ref'])}"
        for path in NOTEBOOKS
        if f"(notebooks/{path.name})" not in readme
        or nbtool.render_badge(path.name, config["slug"], config["ref"]) not in readme
    ]
    assert missing == [], "\n".join(missing)


def test_readme_times_are_the_notebooks_own() -> None:
    """README's 目安 column says what each notebook's 所要時間 line says (notebook 00 reads the latter)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    for planned in nbtool.course_plan():
        link = f"(notebooks/{planned.name})"
        rows = [line for line in readme.splitlines() if link in line and line.startswith("|")]
        assert rows, f"README.md: no table row for notebooks/{planned.name}"
        row = rows[0]
        assert planned.minutes.count("(") == planned.minutes.count(")"), planned  # the whole paragraph read
        minutes = planned.minutes.split("分")[0].removeprefix("約").strip()
        assert f"| {minutes} 分 |" in row, (planned.name, planned.minutes)
        assert planned.installs and all("==" in pin for pin in planned.installs)


def test_instructor_guide_has_a_timed_plan() -> None:
    guide = (REPO_ROOT / "notebooks" / "INSTRUCTOR.md").read_text(encoding="utf-8")
    assert "## 時間割" in guide and "0:00" in guide and "3:00" in guide
    missing = [
        f"INSTRUCTOR.md does not mention notebook {p.name[:2]}" for p in NOTEBOOKS if p.name[:2] not in guide
    ]
    assert missing == [], "\n".join(missing)
