"""A Colab-like kernel for the parity tests: /content-like folder, ``google.colab`` stand-in, local clone.

Used by ``tests/colab/test_parity.py`` under ``make test-colab``, in ``.venv-colab`` (Colab's
package versions). Nothing here touches the developer's checkout: the set-up cell clones a snapshot
of the working tree (uncommitted files included) from a ``file://`` URL.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from refresh_constraints import canonical

HERE = Path(__file__).resolve().parent
STUB = HERE / "stub"
KERNEL_NAME = "colab-parity"

DROPPED_ENV = ("PYTHONPATH", "VIRTUAL_ENV", "PIP_DISABLE_PIP_VERSION_CHECK", "PIP_FIND_LINKS", "PIP_LOG")
"""Variables of the test process that Colab's kernel lacks (this machine's pip set-up); the tests' own
(``COLAB_PARITY*``, ``PYTEST*``) are dropped too."""


def snapshot_repo(src: Path, dest: Path, ref: str) -> str:
    """Commit the working tree of ``src`` (tracked and untracked, not ignored) as branch ``ref`` of a new
    repository at ``dest``; return its ``file://`` URL for ``COURSE_REPO_URL``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=src,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = src / name
        if not source.exists() and not source.is_symlink():  # deleted in the working tree
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    env = dict(
        os.environ,
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="colab parity",
        GIT_AUTHOR_EMAIL="parity@localhost",
        GIT_COMMITTER_NAME="colab parity",
        GIT_COMMITTER_EMAIL="parity@localhost",
    )
    for command in (
        ["init", "-q", "-b", ref],
        ["add", "-A"],
        ["commit", "-q", "-m", "working tree snapshot"],
    ):
        subprocess.run(["git", *command], cwd=dest, env=env, check=True, capture_output=True)
    return dest.resolve().as_uri()


def installed(python: str = sys.executable) -> dict[str, tuple[str, int]]:
    """{distribution: (version, inode of its RECORD)} in ``python``'s environment, read afresh.

    The inode changes when pip reinstalls a distribution, even at the same version.
    """
    code = (
        "import importlib.metadata as m, json, os\n"
        "out = {}\n"
        "for d in m.distributions():\n"
        "    record = os.path.join(str(getattr(d, '_path', '')), 'RECORD')\n"
        "    out[d.metadata['Name']] = (d.version, os.stat(record).st_ino if os.path.exists(record) else 0)\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return {canonical(name): (version, inode) for name, (version, inode) in json.loads(result.stdout).items()}


def pip_requests(log_text: str) -> list[str]:
    """Top-level requirements of every pip run in a ``PIP_LOG`` file (dependencies are left out)."""
    found = []
    for line in log_text.splitlines():
        match = re.search(r"\s(?:Collecting|Requirement already satisfied:) (\S+)(.*)$", line)
        if match and "(from " not in match[2]:
            found.append(match[1])
    return found


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def visible_lines(text: str) -> list[str]:
    """The lines a learner sees: colour codes removed, blank lines dropped, and the successive frames
    of pip's progress bar (which Colab draws as one updating line) counted once."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = ANSI.sub("", raw).strip()
        if not line:
            continue
        if "━" in line and lines and "━" in lines[-1]:
            lines[-1] = line
        else:
            lines.append(line)
    return lines


@dataclass
class CellRun:
    """What one cell did: its stdout lines, stderr text, error, other outputs and wall time."""

    stdout: list[str] = field(default_factory=list)
    stderr: str = ""
    error: str = ""
    others: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: list[dict] = field(default_factory=list)


class ColabKernel:
    """A kernel of ``.venv-colab`` started the way Colab starts one, in a fresh /content-like folder."""

    def __init__(self, workdir: Path, repo_url: str, timeout: int = 300) -> None:
        self.content = workdir / "content"
        self.content.mkdir(parents=True)
        self.pip_log = workdir / "pip.log"
        self.pip_log.touch()
        spec_dir = workdir / "jupyter" / "kernels" / KERNEL_NAME
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab parity",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
        self._old_jupyter_path = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = str(workdir / "jupyter")
        self.env = {
            k: v
            for k, v in os.environ.items()
            if k not in DROPPED_ENV and not k.startswith(("PYTEST", "COLAB_PARITY"))
        }
        self.env.update(
            PYTHONPATH=str(STUB),  # google.colab importable, as on Colab
            COURSE_REPO_URL=repo_url,  # the template's hook: clone the snapshot, not GitHub
            PIP_CONFIG_FILE=os.devnull,  # Colab's pip: PyPI, no local wheel folders, no config
            PIP_CACHE_DIR=str(workdir / "pip-cache"),  # a fresh machine has no pip cache
            PIP_LOG=str(self.pip_log),  # to see what the cell asked pip for
            TUTORIAL_QUICK="1",
            PYDEVD_DISABLE_FILE_VALIDATION="1",  # debugpy's frozen-modules note in the kernel's log
        )
        self.client = NotebookClient(
            nbformat.v4.new_notebook(), timeout=timeout, kernel_name=KERNEL_NAME, allow_errors=False
        )

    def __enter__(self) -> ColabKernel:
        self._context = self.client.setup_kernel(env=self.env, cwd=str(self.content))
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._context.__exit__(None, None, None)
        finally:
            if self._old_jupyter_path is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = self._old_jupyter_path

    def run(self, source: str | nbformat.NotebookNode) -> CellRun:
        """Execute a cell (or source text) in this kernel and sum up its outputs."""
        cell = source if isinstance(source, nbformat.NotebookNode) else nbformat.v4.new_code_cell(source)
        cell = nbformat.from_dict(json.loads(json.dumps(cell)))  # never write into the caller's notebook
        cell.outputs = []
        self.client.nb.cells.append(cell)  # nbclient writes the executed cell back by index
        run = CellRun()
        start = time.perf_counter()
        try:
            self.client.execute_cell(cell, len(self.client.nb.cells) - 1)
        except CellExecutionError as err:
            run.error = ANSI.sub("", str(err)).strip().splitlines()[-1] if str(err).strip() else repr(err)
        except (CellTimeoutError, DeadKernelError) as err:
            run.error = f"{type(err).__name__}: {err}"
        run.seconds = time.perf_counter() - start
        run.outputs = [dict(o) for o in cell.outputs]
        stdout = ""
        for output in cell.outputs:
            kind = output.get("output_type")
            if kind == "stream" and output.get("name") == "stdout":
                stdout += output.get("text", "")
            elif kind == "stream":
                run.stderr += output.get("text", "")
            elif kind == "error":
                run.error = run.error or ANSI.sub("", f"{output.get('ename')}: {output.get('evalue')}")
            else:
                run.others.append(kind)
        run.stdout = visible_lines(stdout)
        return run
