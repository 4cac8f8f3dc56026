"""Colab parity: the set-up cell and the notebooks, run the way Colab runs them (``make test-colab``).

Runs only with ``COLAB_PARITY=1`` inside ``.venv-colab`` (Colab's package versions,
``tests/colab/constraints.txt``): each notebook without extras runs in a kernel started in a
/content-like folder outside the repository, with a stand-in ``google.colab`` and the repository URL
pointed at a snapshot of the working tree. The set-up cell must install exactly what Colab lacks,
leave everything else alone, make ``helpers`` and ``sample_images/`` available, print at most a few
short lines and nothing on stderr, and be a quick no-op the second time; then the rest of the
notebook runs in that same kernel. Broken variants of the template prove that the checks bite.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from colab_kernel import CellRun, ColabKernel, installed, pip_requests, snapshot_repo
from refresh_constraints import COURSE_INSTALLS, DEV_ONLY, LEFT_OUT, NOT_ON_COLAB_MARK, canonical

from helpers import REPO_ROOT
from helpers.tooling import notebooks as nbtool

pytestmark = pytest.mark.skipif(
    os.environ.get("COLAB_PARITY") != "1", reason="Colab parity runs under `make test-colab` (COLAB_PARITY=1)"
)

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints.txt"
STAMP = Path(sys.prefix) / ".installed-constraints"
FIRST_RUN_MAX_LINES = 3
SECOND_RUN_MAX_LINES = 1
SECOND_RUN_MAX_SECONDS = 2.0
MAX_LINE_LENGTH = 120
TOOLING = {"pip", "setuptools", "wheel"}
"""Installed in every environment, pinned nowhere."""

PROBE = """\
import json, os, sys
import helpers
from helpers import env
print(json.dumps({"root": str(helpers.REPO_ROOT), "samples": (helpers.REPO_ROOT / "sample_images").is_dir(),
                  "python": sys.executable, "colab": env.in_colab(), "cwd": os.getcwd()}))
"""


def constraint_pins() -> dict[str, str]:
    """{distribution: version} pinned in constraints.txt."""
    pins = {}
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def not_on_colab() -> set[str]:
    """Dependencies pip adds that Colab's list lacks (the constraints file's last comment)."""
    for line in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        if line.startswith(NOT_ON_COLAB_MARK):
            return {canonical(name) for name in line[len(NOT_ON_COLAB_MARK) :].split()}
    return set()


def colab_lacks(extras: list[str]) -> dict[str, str]:
    """What the set-up cell of a notebook with ``extras`` must install: {distribution: pinned requirement}."""
    gpu = shutil.which("nvidia-smi") is not None  # as the set-up cell chooses a package's build
    return {canonical(r.split("==")[0]): r for r in nbtool.colab_installs(extras, gpu=gpu)}


def uninstall(names: set[str]) -> None:
    """Remove distributions from .venv-colab (what a set-up cell added)."""
    if names:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *sorted(names)],
            check=True,
            capture_output=True,
        )


@pytest.fixture
def colab_venv() -> object:
    """Keep .venv-colab as Colab has it: remove what a set-up cell installed, before and after."""
    uninstall({canonical(n) for n in COURSE_INSTALLS} & set(installed()))
    before = installed()
    yield
    after = installed()
    uninstall(set(after) - set(before))
    if any(after.get(name, ("gone",))[0] != version for name, (version, _) in before.items()):
        STAMP.unlink(missing_ok=True)  # a version changed: the next `make test-colab` rebuilds .venv-colab


@pytest.fixture(scope="session")
def repo_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """file:// URL of a snapshot of the working tree, on the branch the set-up cell clones."""
    return snapshot_repo(REPO_ROOT, tmp_path_factory.mktemp("snapshot"), nbtool.load_config()["ref"])


def output_problems(label: str, run: CellRun, max_lines: int, content: Path) -> list[str]:
    """What a learner should not see: an error, stderr, rich outputs, too many or too long lines."""
    problems = []
    if run.error:
        problems.append(f"{label}: the cell failed: {run.error}")
    shown = [line.replace(str(content), "/content") for line in run.stdout]  # Colab's folder is /content
    if run.stderr:
        problems.append(f"{label}: wrote to stderr: {run.stderr.strip()[:600]}")
    if run.others:
        problems.append(f"{label}: showed {run.others} besides text")
    if len(shown) > max_lines:
        problems.append(f"{label}: printed {len(shown)} lines (at most {max_lines}): {shown}")
    long_lines = [line for line in shown if len(line) > MAX_LINE_LENGTH]
    if long_lines:
        problems.append(f"{label}: lines longer than {MAX_LINE_LENGTH} characters: {long_lines}")
    return problems


def setup_cell_problems(kernel: ColabKernel, source: str, expected: dict[str, str]) -> list[str]:
    """Run the set-up cell twice, as a learner does, and list what went wrong (empty when all is well)."""
    before = installed()
    first = kernel.run(source)
    after = installed()
    problems = output_problems("first run", first, FIRST_RUN_MAX_LINES, kernel.content)

    requested = {
        canonical(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0])
        for r in pip_requests(kernel.pip_log.read_text())
    }
    if requested != set(expected):
        problems.append(f"first run: asked pip for {sorted(requested)}; Colab lacks only {sorted(expected)}")
    if "torch" in requested:
        problems.append("first run: asked pip for torch (Colab's CUDA build must stay as it is)")
    added = set(after) - set(before)
    if added != set(expected):
        problems.append(f"first run: installed {sorted(added)}; expected exactly {sorted(expected)}")
    changed = sorted(name for name in before if name in after and after[name] != before[name])
    if changed:
        details = [f"{n} {before[n][0]} -> {after[n][0]}" for n in changed]
        problems.append(f"first run: changed or reinstalled packages Colab already has: {details}")
    removed = sorted(set(before) - set(after))
    if removed:
        problems.append(f"first run: removed {removed}")

    probe = kernel.run(PROBE)
    clone = kernel.content / nbtool.load_config()["slug"].split("/")[1]
    if probe.error or not probe.stdout:
        problems.append(f"after the set-up cell, `import helpers` fails: {probe.error or probe.stderr}")
    else:
        facts = json.loads(probe.stdout[-1])
        if Path(facts["root"]) != clone.resolve():
            problems.append(f"helpers comes from {facts['root']}, not from the clone {clone}")
        if not facts["samples"]:
            problems.append(f"sample_images/ not found beside helpers ({facts['root']})")
        if not facts["colab"] or Path(facts["python"]) != Path(sys.executable):
            problems.append(f"the kernel is not the Colab-like one: {facts}")

    clone_state = os.stat(clone / ".git").st_mtime_ns if (clone / ".git").exists() else None
    log_size = kernel.pip_log.stat().st_size
    second = kernel.run(source)
    problems += output_problems("second run", second, SECOND_RUN_MAX_LINES, kernel.content)
    if second.seconds > SECOND_RUN_MAX_SECONDS:
        problems.append(
            f"second run: took {second.seconds:.1f} s (a no-op should take < {SECOND_RUN_MAX_SECONDS} s)"
        )
    if kernel.pip_log.stat().st_size != log_size:
        problems.append("second run: called pip again")
    if installed() != after:
        problems.append("second run: changed the installed packages")
    if clone_state is not None and os.stat(clone / ".git").st_mtime_ns != clone_state:
        problems.append("second run: touched the clone again")
    return problems


def stored_text(outputs: list) -> tuple[str, str]:
    """(stdout, text/plain results) of a cell's outputs, for comparing NBVAL_CHECK_OUTPUT cells."""
    stdout = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    results = "".join(
        o.get("data", {}).get("text/plain", "") for o in outputs if o.get("output_type") == "execute_result"
    )
    return stdout, results


def notebook_problems(kernel: ColabKernel, nb: nbformat.NotebookNode, setup_index: int) -> list[str]:
    """Run every other code cell in order, nbval-lax style: errors, stderr, checked outputs."""
    problems = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or i == setup_index:
            continue
        tags = cell.metadata.get("tags", [])
        run = kernel.run(cell)
        if run.error and "raises-exception" not in tags:
            problems.append(f"cell {i} failed: {run.error}")
            break  # the cells after it would fail for the same reason
        if run.stderr and "allow-stderr" not in tags:
            problems.append(f"cell {i} wrote to stderr: {run.stderr.strip()[:600]}")
        got, stored = stored_text(run.outputs), stored_text(cell.outputs)
        if nbtool.is_checked(cell) and got != stored:
            problems.append(f"cell {i} (NBVAL_CHECK_OUTPUT): printed {got}, the notebook stores {stored}")
    return problems


def no_extras(path: Path) -> bool:
    """True for a notebook whose set-up cell adds nothing beyond the base packages (no DALI, no Ray)."""
    return not nbformat.read(path, as_version=4).metadata.get("course", {}).get("extras")


def selected(path: Path) -> bool:
    """False for the notebooks ``COLAB_PARITY_SKIP`` names by number (``make test-colab COLAB_SKIP=...``)."""
    return not any(path.name.startswith(prefix) for prefix in os.environ.get("COLAB_PARITY_SKIP", "").split())


NOTEBOOKS = [path for path in nbtool.notebooks() if no_extras(path) and selected(path)]


def test_venv_is_colab_like(colab_venv: object) -> None:
    """.venv-colab holds Colab's pins, nothing the set-up cell adds, and nothing unpinned but known extras."""
    have = installed()
    pins = constraint_pins()
    wrong = {name: (have.get(name, ("missing",))[0], version) for name, version in pins.items()}
    wrong = {name: pair for name, pair in wrong.items() if pair[0] != pair[1] and pair[0] != pair[1] + "+cpu"}
    assert not wrong, (
        f"installed vs constraints.txt: {wrong}; rebuild with `rm -rf .venv-colab && make test-colab`"
    )
    course_own = {canonical(n) for n in (*COURSE_INSTALLS, *DEV_ONLY)} & set(have)
    assert not course_own, f"Colab does not have {sorted(course_own)}; .venv-colab must not either"
    unpinned = set(have) - set(pins) - not_on_colab() - TOOLING - set(LEFT_OUT)
    assert not unpinned, (
        f"installed but not pinned: {sorted(unpinned)}: add them to DEPENDENCIES in "
        "tests/colab/refresh_constraints.py and regenerate constraints.txt"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_like_on_colab(path: Path, repo_url: str, tmp_path: Path, colab_venv: object) -> None:
    nb = nbformat.read(path, as_version=4)
    setup_index = next(i for i, c in enumerate(nb.cells) if nbtool.SETUP_TAG in c.metadata.get("tags", []))
    expected = colab_lacks(list(nb.metadata.get("course", {}).get("extras", [])))
    assert not set(expected) & set(constraint_pins()), "the set-up cell must install only what Colab lacks"
    with ColabKernel(tmp_path, repo_url) as kernel:
        problems = setup_cell_problems(kernel, nb.cells[setup_index].source, expected)
        if not problems:
            problems = notebook_problems(kernel, nb, setup_index)
    assert not problems, "\n".join(problems)


BROKEN_TEMPLATES = {
    "reinstalls-torch": (
        "if not has(module)]",
        'if not has(module)] + ["torch"]',
        "asked pip for torch",
    ),
    "not-idempotent": (
        'if not os.path.isdir(os.path.join(root, "helpers")):',
        "if True:",
        "second run: the cell failed",
    ),
    "helpers-unimportable": (
        "        sys.path.insert(0, root)\n    print(",
        "        pass\n    print(",
        "`import helpers` fails",
    ),
    "noisy-pip": ('quiet = "--quiet ', 'quiet = "', "first run: printed"),
}


@pytest.mark.parametrize("name", BROKEN_TEMPLATES)
def test_checks_catch_a_broken_setup_cell(
    name: str, repo_url: str, tmp_path: Path, colab_venv: object
) -> None:
    old, new, symptom = BROKEN_TEMPLATES[name]
    config = nbtool.load_config()
    rendered = nbtool.render_setup([], config["slug"], config["ref"])  # the cell a no-extras notebook has
    assert old in rendered, f"the template changed: update BROKEN_TEMPLATES[{name!r}]"
    source = rendered.replace(old, new)
    with ColabKernel(tmp_path, repo_url) as kernel:
        problems = setup_cell_problems(kernel, source, colab_lacks([]))
    assert any(symptom in problem for problem in problems), problems
