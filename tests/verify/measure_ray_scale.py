"""``classify --engine ray`` at 2,000 and 20,000 files: driver memory, throughput beside the local
engine, and a driver killed with ``kill -9`` mid-run then ``--resume``.

Not collected by pytest, never run by CI. From the repository root::

    .venv/bin/python tests/verify/measure_ray_scale.py [--sizes 2000 20000] [--kill-at 2000]

Inputs: distinct 48×48 JPEGs (random colours and noise, seed = index). Each size runs
``python -m helpers.classify DIR --labels 犬,猫,象 --model embedded --backend dataloader`` with
``--engine ray --embeddings OUT.parquet`` and with the local engine, in a fresh process; the driver's
max RSS is its ``VmHWM`` (``/proc/PID/status``, polled until it exits); images/s is the summary
line's (first batch request → last row written; loading and check() excluded). The kill test starts
the Ray run, waits until the workers have written a few shards under ``OUT.parts/``, kills the
driver with SIGKILL, checks which of the Ray processes it had started are still alive, runs
``--resume`` and compares the CSV and the embeddings with the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_images(root: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = root / f"jpegs_{n}"
    folder.mkdir()
    for i in range(n):
        rng = np.random.default_rng(i)
        base = rng.integers(0, 256, 3)
        pixels = np.clip(base + rng.normal(0, 30, (48, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.jpg", quality=90)
    return folder


def children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if re.search(rf"^PPid:\s+{pid}$", status, re.M):
                found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists()}


def run(cmd: list[str], kill_when=None) -> tuple[int, float, str, set[int]]:
    """(exit code, driver max RSS in MB, stdout, Ray processes it started still alive after a kill)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, started = 0, set()
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = max(peak, int(re.search(r"VmHWM:\s+(\d+)", status)[1]))
        except (OSError, TypeError):
            pass
        if kill_when is not None:  # only the kill test needs the driver's children (a scan of /proc)
            started |= children(proc.pid)
        if kill_when is not None and kill_when():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(20)  # Ray's processes notice their driver is gone
            return proc.returncode, peak / 1024, "", alive(started)
        time.sleep(0.25)
    out, err = proc.communicate()
    if proc.returncode not in (0, 2):
        print(err[-2000:], file=sys.stderr)
        if "timed out during startup" in err or "起動しませんでした" in err:  # a busy machine
            raise StartupTimeout
    return proc.returncode, peak / 1024, out, set()


class StartupTimeout(Exception):
    """Embedded Ray did not start within its fixed wait (the machine was busy): the run is repeated."""


def run_retrying(cmd: list[str], attempts: int = 3) -> tuple[int, float, str, set[int]]:
    for attempt in range(attempts):
        try:
            return run(cmd)
        except StartupTimeout:
            print(f"(embedded Ray did not start in time, attempt {attempt + 1} of {attempts})", flush=True)
    raise SystemExit("embedded Ray never started")


def summary(stdout: str) -> tuple[str, float]:
    line = stdout.strip().splitlines()[-1]
    return line, float(re.search(r"([\d.]+) images/s", line)[1])


def main() -> int:
    from helpers import embeddings as emb

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--kill-at", type=int, default=2000, help="size of the kill -9 test (0: skip)")
    parser.add_argument("--engines", nargs="+", default=["ray", "local"], choices=["ray", "local"])
    args = parser.parse_args()
    base = [sys.executable, "-m", "helpers.classify"]
    options = ["--labels", "犬,猫,象", "--model", "embedded", "--backend", "dataloader", "--no-progress"]
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folders = {n: make_images(tmp, n) for n in sorted(set(args.sizes) | ({args.kill_at} - {0}))}
        for n in args.sizes:
            for engine in args.engines:
                out = tmp / f"{engine}_{n}.csv"
                extra = [
                    "--engine",
                    engine,
                    "--out",
                    str(out),
                    "--embeddings",
                    str(out.with_suffix(".parquet")),
                ]
                code, rss, stdout, _ = run_retrying([*base, str(folders[n]), *options, *extra])
                line, rate = summary(stdout)
                print(f"{engine} {n}: exit {code}, driver max RSS {rss:.0f} MB | {line}", flush=True)
                table.append((n, engine, rss, rate))
        if args.kill_at:
            n = args.kill_at
            reference = tmp / f"ray_{n}.csv"
            if not reference.exists():
                raise SystemExit(
                    f"--kill-at {n} needs the uninterrupted Ray run of that size (--sizes, --engines ray)"
                )
            out = tmp / "killed.csv"
            extra = ["--engine", "ray", "--out", str(out), "--embeddings", str(out.with_suffix(".parquet"))]
            shards = out.with_name(out.name + ".parts")

            def enough() -> bool:
                return shards.is_dir() and len(list(shards.glob("*.parquet"))) >= 3

            for _ in range(3):
                try:
                    code, _, _, left = run([*base, str(folders[n]), *options, *extra], kill_when=enough)
                    break
                except StartupTimeout:
                    print("(embedded Ray did not start in time; again)", flush=True)
            written = len(list(shards.glob("*.parquet")))
            print(f"kill -9 of the driver, {written} shards written: exit {code}; Ray processes it started"
                  f" still alive 20 s later: {sorted(left) or 'none'}", flush=True)  # fmt: skip
            code, _, stdout, _ = run_retrying([*base, str(folders[n]), *options, *extra, "--resume"])
            same_csv = out.read_bytes() == reference.read_bytes()
            a, b = (
                emb.read_embeddings(out.with_suffix(".parquet")),
                emb.read_embeddings(reference.with_suffix(".parquet")),
            )
            same_emb = a.paths == b.paths and a.status == b.status and bool((a.vectors == b.vectors).all())
            print(f"--resume: exit {code} | {summary(stdout)[0]}")
            print(f"CSV identical to the uninterrupted run: {same_csv}; embeddings identical: {same_emb}")
    cpu = platform.processor() or platform.machine()
    print(f"\n{os.cpu_count()} CPUs ({cpu}); embedded model, 48×48 JPEGs; one run each\n")
    print("| files | engine | driver max RSS (MB) | images/s |")
    print("| ---: | --- | ---: | ---: |")
    for n, engine, rss, rate in table:
        print(f"| {n:,} | {engine} | {rss:.0f} | {rate:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
