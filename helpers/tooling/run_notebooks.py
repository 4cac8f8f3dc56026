"""``make run``: execute every notebook in order, headless, and write executed copies under build/.

Usage: ``python -m helpers.tooling.run_notebooks [NAME ...] [--out build/notebooks]``. Uses the GPU when there
is one and the real model when the hub answers (each notebook decides through ``helpers``);
prints one progress line per notebook and writes ``summary.md`` and ``summary.json`` beside the copies.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat
from traitlets.config import Config

from helpers import REPO_ROOT, env
from helpers.tooling.notebooks import notebooks

DEFAULT_OUT: Path = REPO_ROOT / "build" / "notebooks"


@dataclass
class NotebookRun:
    """How one notebook's run went."""

    notebook: str
    ok: bool
    seconds: float
    stderr_cells: int
    error: str = ""


def run_one(path: Path, out_dir: Path, timeout: int = 1800) -> NotebookRun:
    """Execute ``path`` with its own folder as working directory; save the executed copy in ``out_dir``."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    sockets = tempfile.mkdtemp(prefix="nb-")  # an absolute, short path: the kernel runs in notebooks/
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        # local sockets instead of TCP: the kernel then has no "running over TCP without encryption" warning
        config=Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")}}),
    )
    start = time.perf_counter()
    error = ""
    try:
        client.execute()
    except CellExecutionError as err:
        error = str(err).strip().splitlines()[-1][:300] if str(err).strip() else type(err).__name__
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    stderr_cells = sum(
        any(o.get("name") == "stderr" for o in cell.get("outputs", []))
        for cell in nb.cells
        if cell.cell_type == "code"
    )
    return NotebookRun(path.name, not error, seconds, stderr_cells, error)


def write_summary(runs: list[NotebookRun], out_dir: Path) -> Path:
    """Write ``summary.md`` and ``summary.json`` into ``out_dir``; return the Markdown path."""
    info = env.collect(hub_timeout=2.0)
    machine = f"{info.device} ({info.gpu or 'GPU なし'}), CPU {info.cpu_count} コア, torch {info.torch}"
    lines = [
        "# make run の結果",
        "",
        f"- マシン: {machine}",
        f"- ワークロード: {'quick' if info.quick else 'full'}",
        "",
        "| ノートブック | 結果 | 時間 | stderr のあるセル |",
        "|---|---|---:|---:|",
    ]
    for run in runs:
        status = "成功" if run.ok else f"失敗: {run.error}"
        lines.append(f"| {run.notebook} | {status} | {run.seconds:.1f} s | {run.stderr_cells} |")
    markdown = out_dir / "summary.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    payload = {"machine": asdict(info), "runs": [asdict(r) for r in runs]}
    (out_dir / "summary.json").write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
    return markdown


def remove_stale_copies(out_dir: Path, current: set[str]) -> list[str]:
    """Delete executed copies in ``out_dir`` whose notebook no longer exists (a renamed or removed
    notebook); return their names."""
    stale = sorted(p.name for p in out_dir.glob("[0-9][0-9]_*.ipynb") if p.name not in current)
    for name in stale:
        (out_dir / name).unlink()
    return stale


def main(argv: list[str] | None = None) -> int:
    """Run the notebooks; exit 1 when any failed."""
    parser = argparse.ArgumentParser(prog="python -m helpers.tooling.run_notebooks", description=__doc__)
    parser.add_argument("names", nargs="*", help="notebook file names (default: all, in order)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where executed copies go")
    args = parser.parse_args(argv)
    paths = [p for p in notebooks() if not args.names or p.name in args.names]
    if not paths:
        print("実行するノートブックがありません (no notebooks matched)", file=sys.stderr)
        return 1
    stale = remove_stale_copies(args.out, {p.name for p in notebooks()})
    if stale:
        print("前の実行の古いコピーを消しました (no longer a notebook):", ", ".join(stale))
    runs = []
    for i, path in enumerate(paths, 1):
        print(f"[{i}/{len(paths)}] {path.name} ...", end=" ", flush=True)
        run = run_one(path, args.out)
        runs.append(run)
        print(
            f"{'ok' if run.ok else 'FAILED'} ({run.seconds:.1f} s)" + (f": {run.error}" if run.error else "")
        )
    summary = write_summary(runs, args.out)
    print(f"summary: {summary.relative_to(REPO_ROOT) if summary.is_relative_to(REPO_ROOT) else summary}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
