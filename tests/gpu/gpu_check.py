"""``make gpu-check``: every GPU branch of the course, checked in one command on a lent GPU machine.

A lease of a GPU machine is short (see CONTRIBUTING.md, GPU の確認), so this script is prepared and
rehearsed on the CPU and then run once there. Steps, in order of value, each a subprocess with its
own timeout (``GPU_CHECK_TIMEOUT_<STEP>`` seconds) and the whole run within ``GPU_CHECK_BUDGET_S``:

1. ``wheels``     install the ``*.whl`` in ``$GPU_WHEELS`` (and ``*.whl.partNN``, joined first) whose
                  packages do not import, with ``pip --target --no-deps --no-index``, into a temporary
                  site folder (``$GPU_CHECK_SITE``) that later steps get on ``PYTHONPATH``;
2. ``tests``      ``pytest -m gpu tests/gpu``: DALI ``mixed`` against PIL, fp16 autocast against float32,
                  the EVA02 tower on CUDA against the CPU, ``check()`` on CUDA, classify with
                  ``--backend dali``, the Ray GPU actor;
3. ``notebooks``  every notebook under nbval at quick size (``TUTORIAL_QUICK=1``) on the GPU, one by one;
4. ``bench``      ``helpers.bench`` on 1000 JPEGs with the DALI decoder sweep, then the same with the
                  process pinned to two cores and the hardware JPEG decoder off: that GPU's own figure
                  under those limits (its nvJPEG and resizes still run far faster than a T4's).

One report, ``report.md`` and ``report.json`` (GPU, driver, versions, date, every number, every failure),
in ``build/gpu-check/`` and, when ``$OUT`` is set, ``$OUT/gpu-check/``; it is rewritten after every
step (and every notebook and bench run), so a run cut short still says what it did. A rerun with
``GPU_CHECK_STEPS=tests,bench`` repeats only those steps and keeps the others' results.

``GPU_CHECK_DRY_RUN=1`` (or ``--dry-run``) is the CPU rehearsal: it installs a throw-away wheel
(one whole, one in parts) from a temporary ``$GPU_WHEELS`` into a temporary site folder and imports
it, collects the GPU tests and the notebooks, runs a 16-image bench on the embedded model, writes
the report and prints what it would run on a GPU.

Also: ``GPU_CHECK_NOTEBOOKS=03,05`` (only those notebooks), ``GPU_CHECK_BENCH_N`` (1000),
``GPU_CHECK_BENCH_REPEATS`` (1), ``GPU_CHECK_REPORT_DIR``. Only the standard library is imported here:
the script must report even when torch or the wheels do not import.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS: tuple[str, ...] = ("wheels", "tests", "notebooks", "bench")
"""Every step, in the order of value (and of running)."""
TIMEOUTS: dict[str, int] = {"wheels": 120, "tests": 120, "notebooks": 210, "bench": 180}
"""Seconds each step may take on the GPU machine (``GPU_CHECK_TIMEOUT_<STEP>`` overrides)."""
DRY_TIMEOUTS: dict[str, int] = {"wheels": 60, "tests": 60, "notebooks": 60, "bench": 120}
BUDGET_S = 420
"""Seconds the whole GPU run may take (``GPU_CHECK_BUDGET_S``): the steps' time is cut to fit, so the
report is written before a device call of 480 s ends. Expected on an H200 (not yet measured): about
4 minutes (probes 20 s, wheels 30 s, tests 60 s, notebooks 90-150 s, bench 100-150 s)."""
DRY_BUDGET_S = 240
NOTEBOOK_TIMEOUT = 90
"""Seconds one notebook may take at quick size on the GPU (within the step's time)."""
BENCH_GPU_SHARE = 0.55
"""Share of the bench step's time the full-machine run may use; the two-core run gets the rest."""
BENCH_N = 1000
BENCH_REPEATS = 1
"""``--repeats`` of each bench run (``GPU_CHECK_BENCH_REPEATS``): 1 fits the 4 minutes; 3 gives a median."""
DALI_HYBRID_THRESHOLDS = "0,1000000"
DALI_HW_DECODER_LOADS = "0,0.65"
TWO_CORES = "0,1"
"""The cores the two-core bench run is pinned to (``taskset -c``; a Colab T4 runtime has 2 vCPUs)."""
EXTRA_MODULES: dict[str, str] = {"dali": "nvidia.dali", "ray": "ray", "onnx": "onnxruntime"}
"""A notebook's ``metadata.course.extras`` → the module it needs (as ``helpers.tooling.notebooks.EXTRAS``)."""
SKIPPED_EXTRAS: tuple[str, ...] = ("ray",)
"""Extras whose absence skips a notebook (Ray is too large to bring to the GPU machine)."""
NOTEBOOK_MODULES: tuple[str, ...] = ("nbval", "ipykernel", "nbclient", "nbformat")
LOG_LIMIT = 256 * 1024
"""Bytes kept of each log (its tail): what comes back from the GPU machine is limited."""
VERSIONS: tuple[str, ...] = (
    "torch",
    "torchvision",
    "timm",
    "transformers",
    "numpy",
    "pillow",
    "nvidia-dali-cuda120",
    "nvidia-nvimgcodec-cu12",
    "nbval",
    "ipykernel",
    "nbclient",
    "matplotlib",
    "matplotlib-fontja",
    "ray",
    "pytest",
)
"""Distributions whose versions the report lists."""
PROBE_IMPORTS: tuple[str, ...] = ("torch", "nvidia.dali", "timm", "nbval", "ipykernel")
"""Modules the header says import or not (and why); Ray only looked up (importing it takes 5 s)."""
PROBE_FOUND: tuple[str, ...] = ("ray",)

STATUS_FAILED = ("failed", "timeout")


# ---------------------------------------------------------------- settings


@dataclass
class Settings:
    """What a run does, from the environment (see the module docstring)."""

    dry_run: bool
    steps: list[str]
    python: str
    report_dir: Path
    out_dir: Path | None
    wheels_dir: Path | None
    site: Path
    budget_s: float
    timeouts: dict[str, float]
    notebooks: list[str] | None
    bench_n: int
    bench_repeats: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str], dry_run: bool = False) -> Settings:
        """Read ``GPU_CHECK_*``, ``GPU_WHEELS`` and ``OUT``; raises ValueError on a bad value."""
        dry = dry_run or environ.get("GPU_CHECK_DRY_RUN", "").strip().lower() in {"1", "true", "yes", "on"}
        defaults = DRY_TIMEOUTS if dry else TIMEOUTS
        timeouts = {s: float(environ.get(f"GPU_CHECK_TIMEOUT_{s.upper()}") or defaults[s]) for s in STEPS}
        wanted = environ.get("GPU_CHECK_NOTEBOOKS", "").strip()
        wheels = environ.get("GPU_WHEELS", "").strip()
        out = environ.get("OUT", "").strip()
        return cls(
            dry_run=dry,
            steps=parse_steps(environ.get("GPU_CHECK_STEPS")),
            python=sys.executable,
            report_dir=Path(environ.get("GPU_CHECK_REPORT_DIR") or REPO_ROOT / "build" / "gpu-check"),
            out_dir=Path(out) / "gpu-check" if out else None,
            wheels_dir=Path(wheels) if wheels else None,
            site=Path(environ.get("GPU_CHECK_SITE") or Path(tempfile.gettempdir()) / "gpu-check-site"),
            budget_s=float(environ.get("GPU_CHECK_BUDGET_S") or (DRY_BUDGET_S if dry else BUDGET_S)),
            timeouts=timeouts,
            notebooks=[w.strip() for w in wanted.split(",") if w.strip()] or None,
            bench_n=int(environ.get("GPU_CHECK_BENCH_N") or BENCH_N),
            bench_repeats=int(environ.get("GPU_CHECK_BENCH_REPEATS") or BENCH_REPEATS),
        )


def parse_steps(text: str | None) -> list[str]:
    """``"tests,wheels"`` → ``["wheels", "tests"]`` (the order of value); empty or None → every step."""
    if not text or not text.strip():
        return list(STEPS)
    chosen = {part.strip().lower() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(STEPS))
    if unknown:
        raise ValueError(f"unknown step(s) {', '.join(unknown)}: choose from {','.join(STEPS)}")
    return [s for s in STEPS if s in chosen]


# ---------------------------------------------------------------- the report


def now() -> str:
    """The current time, UTC, ISO 8601 to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class StepResult:
    """What one step did: status, time, the commands it ran, numbers, failures, notes."""

    name: str
    status: str = "not run"
    """``ok``, ``failed``, ``timeout``, ``missing`` (a tool is absent), ``skipped`` or ``not run``."""
    started: str = ""
    seconds: float = 0.0
    commands: list[dict[str, Any]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepResult:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Report:
    """The one report of ``make gpu-check``; :meth:`write` renders it as JSON and Markdown."""

    dry_run: bool
    machine: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[str, StepResult] = field(default_factory=dict)
    plan: dict[str, list[str]] = field(default_factory=dict)
    """The commands a GPU run executes, step by step (what the dry run prints)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "gpu-check",
            "dry_run": self.dry_run,
            "updated": now(),
            "machine": self.machine,
            "settings": self.settings,
            "runs": self.runs,
            "steps": {name: dataclasses.asdict(self.steps[name]) for name in STEPS if name in self.steps},
            "failures": self.failures(),
            "plan": self.plan,
        }

    @classmethod
    def load(cls, path: Path, dry_run: bool) -> Report:
        """The report at ``path`` when it is one of the same kind (dry or not), else a fresh one."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(dry_run)
        if data.get("kind") != "gpu-check" or bool(data.get("dry_run")) != dry_run:
            return cls(dry_run)
        steps = {name: StepResult.from_dict(value) for name, value in data.get("steps", {}).items()}
        return cls(dry_run, data.get("machine", {}), data.get("settings", {}), data.get("runs", []), steps)

    def failures(self) -> list[str]:
        """Every failure of every step, prefixed with the step's name."""
        return [
            f"{name}: {text}" for name in STEPS if name in self.steps for text in self.steps[name].failures
        ]

    def write(self, folders: Sequence[Path]) -> list[Path]:
        """Write ``report.json`` and ``report.md`` into the first folder, then copy that folder's
        contents (logs, bench files) into the others; returns the report files written."""
        first, *others = folders
        first.mkdir(parents=True, exist_ok=True)
        paths = [first / "report.json", first / "report.md"]
        _write_atomic(paths[0], json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n")
        _write_atomic(paths[1], to_markdown(self))
        for other in others:
            with contextlib.suppress(OSError):  # a mirror that cannot be written must not stop the run
                shutil.copytree(first, other, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.tmp"))
                paths += [other / "report.json", other / "report.md"]
        return paths


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _cell(value: Any) -> str:
    """A value for a Markdown table cell."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _machine_lines(m: Mapping[str, Any]) -> list[str]:
    versions = m.get("versions", {})
    listed = ", ".join(f"{k} {v}" for k, v in versions.items() if v) or "—"
    absent = ", ".join(k for k, v in versions.items() if not v)
    gpu = m.get("gpu") or "none (CUDA not available)"
    details = [f"{m['gpu_memory_gib']} GiB" if m.get("gpu_memory_gib") else "", m.get("capability", "")]
    extra = ", ".join(d for d in details if d)
    lines = [
        f"- GPU: {gpu}{f' ({extra})' if extra else ''}; driver {m.get('driver') or '—'};"
        f" CUDA of torch {m.get('torch_cuda') or '—'}",
        f"- CPU: {m.get('usable_cpus', '—')} usable cores ({m.get('cpu_count', '—')} in all);"
        f" Python {m.get('python', '—')} ({m.get('executable', '—')})",
        f"- Versions: {listed}",
    ]
    if absent:
        lines.append(f"- Not installed: {absent}")
    imports = m.get("imports", {})
    broken = {k: v for k, v in imports.items() if v != "ok"}
    if broken:
        lines.append("- Does not import: " + "; ".join(f"{k} ({v})" for k, v in broken.items()))
    if m.get("commit"):
        lines.append(f"- Repository: commit {m['commit']}{m.get('dirty', '')}")
    return lines


def _render_step(step: StepResult) -> list[str]:
    lines = [
        f"## {STEPS.index(step.name) + 1}. {step.name}: {step.status}",
        "",
        f"Started {step.started or '—'}, {step.seconds:.1f} s.",
        "",
    ]
    render = RENDERERS.get(step.name)
    if render is not None:
        lines += render(step.numbers)
    for note in step.notes:
        lines.append(f"- {note}")
    if step.failures:
        lines += ["", "Failures:", ""] + [f"- {_cell(f)}" for f in step.failures]
    if step.commands:
        lines += ["", "| command | exit | seconds | log |", "|---|---:|---:|---|"]
        for c in step.commands:
            code = "timeout" if c.get("timed_out") else c.get("rc")
            seconds = f"{c.get('seconds', 0):.1f}"
            lines.append(f"| `{_cell(c['command'])}` | {_cell(code)} | {seconds} | {_cell(c.get('log'))} |")
    return [*lines, ""]


def _render_wheels(numbers: Mapping[str, Any]) -> list[str]:
    wheels = numbers.get("wheels", [])
    if not wheels:
        return []
    lines = ["| wheel | MB | modules | state |", "|---|---:|---|---|"]
    for w in wheels:
        lines.append(f"| {w['file']} | {w['mb']:.1f} | {', '.join(w['modules']) or '—'} | {w['state']} |")
    after = numbers.get("imports_after", {})
    if after:
        lines += ["", "Imports after installing: " + "; ".join(f"{k} {v}" for k, v in after.items())]
    return [*lines, ""]


def _render_tests(numbers: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    if "collected" in numbers:
        lines += [f"Collected {numbers['collected']} GPU tests (dry run: collection only).", ""]
    tests = numbers.get("tests", [])
    if tests:
        lines += ["| test | outcome | seconds | message |", "|---|---|---:|---|"]
        for t in tests:
            lines.append(
                f"| {t['name']} | {t['outcome']} | {t['seconds']:.1f} | {_cell(t.get('message', ''))} |"
            )
        lines.append("")
    measured = numbers.get("measured", [])
    if measured:
        lines += ["Numbers the tests recorded:", ""]
        lines += [f"- {_cell(json.dumps(m, ensure_ascii=False))}" for m in measured]
        lines.append("")
    return lines


def _render_notebooks(numbers: Mapping[str, Any]) -> list[str]:
    books = numbers.get("notebooks", [])
    if not books:
        return []
    lines = ["| notebook | status | cells | seconds | message |", "|---|---|---:|---:|---|"]
    for b in books:
        lines.append(
            f"| {b['notebook']} | {b['status']} | {_cell(b.get('cells'))} | {b.get('seconds', 0):.1f}"
            f" | {_cell(b.get('message', ''))} |"
        )
    return [*lines, ""]


def _render_bench(numbers: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for run in numbers.get("runs", []):
        lines += [f"### {run['label']}", ""]
        if run.get("machine"):
            lines += [f"Machine as bench saw it: {run['machine']}", ""]
        rows = run.get("results", [])
        if rows:
            lines += [
                "| variant | images/s | seconds | × baseline | max Δ prob | tolerance | OK | of ceiling |",
                "|---|---:|---:|---:|---:|---:|---|---:|",
            ]
            for r in rows:
                share = r.get("share_of_ceiling")
                lines.append(
                    f"| {_cell(r['name'])} | {r['items_per_s']:.1f} | {r['seconds']:.3f} | {r['speedup']:.2f}"
                    f" | {r['max_prob_diff']:.1e} | {r['tolerance']:.0e} | {'yes' if r['correct'] else 'NO'}"
                    f" | {'—' if share is None else f'{share:.0%}'} |"
                )
            for r in rows:
                if r.get("decoders"):
                    lines.append(f"- {_cell(r['name'])}: {r['decoders']}")
        for c in run.get("ceilings", []):
            lines.append(f"- {c['name']}: {c['images_per_s']:.0f} images/s")
        if run.get("printed"):
            lines += ["No bench.json; what it printed before it stopped:", ""]
            lines += [f"- {_cell(ln)}" for ln in run["printed"]]
        lines.append("")
    return lines


RENDERERS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "wheels": _render_wheels,
    "tests": _render_tests,
    "notebooks": _render_notebooks,
    "bench": _render_bench,
}


def to_markdown(report: Report) -> str:
    """The report as Markdown: the machine, a summary table, each step, every failure."""
    mode = "dry run on the CPU (a rehearsal: no GPU was measured)" if report.dry_run else "GPU run"
    lines = ["# make gpu-check", "", f"- Mode: {mode}"]
    if report.runs:
        runs = ", ".join(f"{r['date']} ({','.join(r['steps'])})" for r in report.runs)
        lines.append(f"- Runs: {runs}")
    lines += [
        *_machine_lines(report.machine),
        "",
        "| step | status | seconds | failures |",
        "|---|---|---:|---:|",
    ]
    for name in STEPS:
        step = report.steps.get(name)
        if step is not None:
            lines.append(f"| {name} | {step.status} | {step.seconds:.1f} | {len(step.failures)} |")
    lines.append("")
    for name in STEPS:
        if name in report.steps:
            lines += _render_step(report.steps[name])
    failures = report.failures()
    lines += ["## Failures", ""] + ([f"- {_cell(f)}" for f in failures] if failures else ["None."])
    if report.plan:
        lines += ["", "## What a GPU run executes", ""]
        for step, commands in report.plan.items():
            lines += [f"- {step}:"] + [f"  - `{c}`" for c in commands]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running commands


def _kill_group(pgid: int) -> None:
    """Stop what is left of a process group this script started (TERM, then KILL)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(1.0 if sig == signal.SIGTERM else 0)


def _trim_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Keep the last ``limit`` bytes of a log."""
    size = path.stat().st_size if path.exists() else 0
    if size > limit:
        with open(path, "rb") as handle:
            handle.seek(size - limit)
            tail = handle.read()
        path.write_bytes(b"[... %d bytes cut ...]\n" % (size - limit) + tail)


def run_command(
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str],
    timeout: float,
    cwd: Path = REPO_ROOT,
    preexec_fn: Callable[[], None] | None = None,
    shown: str | None = None,
) -> dict[str, Any]:
    """Run ``argv`` in its own process group with stdout and stderr to ``log``; stop the whole group
    after ``timeout`` seconds (and whatever it left behind when it ends). Returns what happened."""
    log.parent.mkdir(parents=True, exist_ok=True)
    shown = shown or shlex.join(argv)
    print(f"  $ {shown}  (timeout {timeout:.0f} s)", flush=True)
    begin = time.monotonic()
    timed_out = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
        try:
            rc: int | None = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            rc = proc.wait()
        finally:
            _kill_group(proc.pid)
    seconds = time.monotonic() - begin
    _trim_log(log)
    state = "timed out" if timed_out else f"exit {rc}"
    print(f"    {state} after {seconds:.1f} s", flush=True)
    if timed_out or rc:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
        print("\n".join(f"    | {line}" for line in tail), flush=True)
    return {"command": shown, "rc": rc, "timed_out": timed_out, "seconds": round(seconds, 2), "log": log.name}


# ---------------------------------------------------------------- the context of a run


@dataclass
class Context:
    """One run: its settings, the report, the environment of the steps, the deadline."""

    settings: Settings
    report: Report
    env: dict[str, str]
    deadline: float
    background: subprocess.Popen | None = None
    temp: Path | None = None

    @property
    def logs(self) -> Path:
        return self.settings.report_dir / "logs"

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def folders(self) -> list[Path]:
        s = self.settings
        return [s.report_dir, *([s.out_dir] if s.out_dir is not None else [])]

    def save(self) -> None:
        self.report.write(self.folders())

    def step_env(self, **extra: str) -> dict[str, str]:
        """The steps' environment: the site folder (when it holds anything) and the repository on
        ``PYTHONPATH`` ahead of what was there."""
        env = dict(self.env)
        site = self.settings.site
        paths = [str(site)] if site.is_dir() and any(site.iterdir()) else []
        paths += [str(REPO_ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env.update(extra)
        return env

    def python_json(self, code: str, *args: str, timeout: float = 90.0) -> dict[str, Any]:
        """Run ``code`` in the steps' interpreter and environment; its last stdout line is JSON."""
        try:
            done = subprocess.run(
                [self.settings.python, "-c", code, *args],
                cwd=REPO_ROOT,
                env=self.step_env(),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                return json.loads(lines[-1])
            return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except (subprocess.TimeoutExpired, OSError, ValueError) as err:
            return {"error": f"{type(err).__name__}: {err}"[:300]}


PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, os, platform, sys
dists, modules, looked_up = json.loads(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
info = {"python": platform.python_version(), "executable": sys.executable, "cpu_count": os.cpu_count()}
try:
    info["usable_cpus"] = len(os.sched_getaffinity(0))
except AttributeError:
    info["usable_cpus"] = os.cpu_count()
versions = {}
for dist in dists:
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = None
info["versions"] = versions
imports = {}
for module in modules:
    try:
        importlib.import_module(module)
        imports[module] = "ok"
    except Exception as err:
        text = str(err).strip().splitlines()
        imports[module] = f"{type(err).__name__}: {text[0][:200] if text else ''}"
for module in looked_up:
    imports[module] = "ok" if importlib.util.find_spec(module) is not None else "not installed"
info["imports"] = imports
if imports.get("torch") == "ok":
    import torch
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"compute capability {props.major}.{props.minor}"
print(json.dumps(info))
"""


def _driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi, else /proc), or None."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.strip().splitlines()[0]
    with contextlib.suppress(OSError):
        text = Path("/proc/driver/nvidia/version").read_text()
        return text.split("Kernel Module", 1)[1].split()[0]
    return None


def _commit() -> tuple[str | None, str]:
    """The checkout's commit and a note on uncommitted changes (None without git)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=20,
            )
            changed = len(status.stdout.splitlines())
            return head.stdout.strip(), f" ({changed} tracked files changed)" if changed else ""
    return None, ""


def probe_machine(ctx: Context) -> dict[str, Any]:
    """GPU, driver, CPU, Python and library versions, what imports: the report's header."""
    modules = [json.dumps(VERSIONS), json.dumps(PROBE_IMPORTS), json.dumps(PROBE_FOUND)]
    info = ctx.python_json(PROBE, *modules, timeout=120)
    info["driver"] = _driver()
    info["date"] = now()
    info["commit"], info["dirty"] = _commit()
    return info


# ---------------------------------------------------------------- step 1: wheels


def build_wheel(folder: Path, name: str, version: str, files: Mapping[str, str]) -> Path:
    """A minimal pure-Python wheel of ``files`` (path in the wheel → text): the dry run's throw-away."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    contents = {path: text.encode() for path, text in files.items()}
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
    return wheel


def split_file(path: Path, parts: int) -> list[Path]:
    """Cut ``path`` into ``parts`` pieces named ``NAME.partNN`` (as ``stage-wheels`` does); removes it."""
    data = path.read_bytes()
    size = -(-len(data) // parts)
    pieces = []
    for i in range(parts):
        piece = path.with_name(f"{path.name}.part{i:02d}")
        piece.write_bytes(data[i * size : (i + 1) * size])
        pieces.append(piece)
    path.unlink()
    return pieces


def collect_wheels(folder: Path, joined: Path) -> list[Path]:
    """The wheels in ``folder``: every ``*.whl``, and every ``*.whl.part00`` … joined into ``joined``."""
    wheels = {p.name: p for p in sorted(folder.glob("*.whl")) if p.is_file()}
    for first in sorted(folder.glob("*.whl.part00")):
        name = first.name.removesuffix(".part00")
        if name in wheels:
            continue
        joined.mkdir(parents=True, exist_ok=True)
        target = joined / name
        with open(target, "wb") as out:
            for piece in sorted(folder.glob(f"{name}.part[0-9]*")):
                with open(piece, "rb") as part:
                    shutil.copyfileobj(part, out)
        wheels[name] = target
    return [wheels[name] for name in sorted(wheels)]


def _code_free(text: str) -> bool:
    """True for an ``__init__.py`` that only makes a namespace (empty, comments, ``extend_path``)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return all("extend_path" in ln or "declare_namespace" in ln for ln in lines)


def wheel_modules(wheel: Path) -> list[str]:
    """The modules that show a wheel is installed: its shallowest packages with code, going below
    namespace folders that other distributions share (``nvidia`` holds torch's CUDA libraries too)."""
    with zipfile.ZipFile(wheel) as zf:
        installed: dict[str, str] = {}  # path once installed → member of the zip
        for member in zf.namelist():
            parts = member.split("/", 2)
            if parts[0].endswith(".dist-info"):
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                installed[parts[2]] = member
            else:
                installed[member] = member
        packages = {
            path.removesuffix("/__init__.py"): zf.read(member).decode("utf-8", "replace")
            for path, member in installed.items()
            if path.endswith("/__init__.py")
        }
    chosen: list[str] = []
    for pkg in sorted(packages, key=lambda p: (p.count("/"), p)):
        if any(pkg.startswith(c + "/") for c in chosen):
            continue
        if _code_free(packages[pkg]) and any(q.startswith(pkg + "/") for q in packages):
            continue  # a namespace folder: the packages below it tell
        chosen.append(pkg)
    if not chosen:
        chosen = [path[:-3] for path in installed if "/" not in path and path.endswith(".py")]
    return [c.replace("/", ".") for c in chosen]


def wheel_dist(wheel: Path) -> tuple[str, str]:
    """A wheel's distribution name and version, from its file name."""
    name, version = wheel.name.split("-")[:2]
    return name, version


CHECK_PRESENT = r"""
import importlib.metadata as md, importlib.util, json, sys
items, out = json.loads(sys.argv[1]), {}
for dist, modules in items:
    try:
        md.distribution(dist)
        found = True
    except md.PackageNotFoundError:
        found = False
    for module in modules:
        try:
            found = found and importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
    out[dist] = found
print(json.dumps(out))
"""

CHECK_IMPORTS = r"""
import importlib, json, sys
out = {}
for module in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(module)
        out[module] = "ok: " + str(getattr(mod, "__file__", None) or list(getattr(mod, "__path__", []))[:1])
    except Exception as err:
        text = str(err).strip().splitlines()
        out[module] = f"{type(err).__name__}: {text[0][:200] if text else ''}"
print(json.dumps(out))
"""

SITE_MARKER = ".made-by-gpu-check"
"""The file that lets the wheels step replace a site folder (never one it did not make)."""
NAMESPACE_STUB = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"


def _namespace_fix(site: Path) -> list[str]:
    """Turn an empty top-level ``__init__.py`` in ``site`` (``nvidia/`` from the DALI wheels) into a
    pkgutil namespace, so that the machine's own ``nvidia.*`` packages (torch's CUDA libraries) stay
    importable behind the site folder. Returns the folders changed."""
    changed = []
    for init in sorted(site.glob("*/__init__.py")):
        text = init.read_text(encoding="utf-8", errors="replace")
        if _code_free(text) and "extend_path" not in text and any(p.is_dir() for p in init.parent.iterdir()):
            init.write_text(NAMESPACE_STUB, encoding="utf-8")
            changed.append(init.parent.name)
    return changed


def _unzip_wheels(wheels: Sequence[Path], site: Path) -> None:
    """Install wheels by unpacking them (a wheel is a zip), for an interpreter without pip."""
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                parts = member.split("/", 2)
                target = member
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    target = parts[2]
                if not target or target.endswith("/"):
                    continue
                dest = site / target
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(zf.read(member))


def step_wheels(ctx: Context, result: StepResult) -> None:
    """Install the wheels of ``$GPU_WHEELS`` whose packages do not import, into a fresh site folder."""
    s = ctx.settings
    if s.wheels_dir is None:
        result.status = "skipped"
        result.notes.append("GPU_WHEELS is not set: nothing to install (what imports is in the header)")
        return
    if not s.wheels_dir.is_dir():
        result.status = "failed"
        result.failures.append(f"GPU_WHEELS={s.wheels_dir} is not a folder")
        return
    if ctx.temp is None:
        ctx.temp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    wheels = collect_wheels(s.wheels_dir, ctx.temp / "joined")
    if not wheels:
        result.status = "skipped"
        result.notes.append(f"no *.whl or *.whl.part00 in {s.wheels_dir}")
        return
    if s.site.exists():  # a fresh site each time: pip --target cannot merge shared folders (nvidia/)
        if not (s.site / SITE_MARKER).exists():
            result.status = "failed"
            result.failures.append(
                f"GPU_CHECK_SITE={s.site} exists and was not made by gpu-check: choose another"
            )
            return
        shutil.rmtree(s.site)
    items = [(wheel_dist(w)[0], wheel_modules(w)) for w in wheels]
    present = ctx.python_json(CHECK_PRESENT, json.dumps(items))
    if "error" in present:
        result.failures.append(f"could not ask what is installed: {present['error']}")
        present = {}
    table, install = [], []
    for wheel, (dist, modules) in zip(wheels, items, strict=True):
        state = "already importable" if present.get(dist) else "to install"
        table.append(
            {"file": wheel.name, "mb": wheel.stat().st_size / 2**20, "modules": modules, "state": state}
        )
        if state == "to install":
            install.append(wheel)
    result.numbers["wheels"] = table
    result.numbers["site"] = str(s.site)
    if not install:
        result.status = "ok"
        result.notes.append("every wheel's packages import already: nothing installed")
        return
    s.site.mkdir(parents=True)
    (s.site / SITE_MARKER).write_text("made by tests/gpu/gpu_check.py; removed by its next wheels step\n")
    try:
        pip = [s.python, "-m", "pip", "--version"]
        has_pip = subprocess.run(pip, capture_output=True, env=ctx.step_env(), timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        has_pip = False
    timeout = min(s.timeouts["wheels"], ctx.remaining())
    if has_pip:
        argv = [s.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps"]
        argv += ["--no-index", "--no-compile", "--target", str(s.site), *map(str, install)]
        command = run_command(argv, ctx.logs / "wheels.log", ctx.step_env(), timeout)
        result.commands.append(command)
        ok = command["rc"] == 0
    else:
        result.notes.append(f"{s.python} has no pip: the wheels were unpacked (a wheel is a zip)")
        _unzip_wheels(install, s.site)
        ok = True
    for row in table:
        if row["state"] == "to install":
            row["state"] = "installed" if ok else "install failed"
    fixed = _namespace_fix(s.site)
    if fixed:
        result.notes.append(
            f"made {', '.join(fixed)}/ a pkgutil namespace (the machine's own packages stay visible)"
        )
    modules = [m for w, (_, mods) in zip(wheels, items, strict=True) if w in install for m in mods]
    after = ctx.python_json(
        CHECK_IMPORTS, json.dumps(modules), timeout=min(120.0, max(30.0, ctx.remaining()))
    )
    result.numbers["imports_after"] = after
    result.failures += [f"{m} does not import: {v}" for m, v in after.items() if not str(v).startswith("ok")]
    if not ok:
        result.failures.append("pip could not install the wheels (see wheels.log)")
    result.status = "timeout" if result.commands and result.commands[-1]["timed_out"] else "ok"
    if result.failures and result.status == "ok":
        result.status = "failed"


# ---------------------------------------------------------------- step 2: tests


def tests_command(s: Settings, junit: Path) -> list[str]:
    """The GPU tests as the GPU run executes them."""
    argv = [s.python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-v", "-rs"]
    return [*argv, f"--junitxml={junit}", "tests/gpu"]


def read_junit(path: Path) -> list[dict[str, Any]]:
    """Every test case of a JUnit XML file: name, outcome, seconds and the first line of its message."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (found.get("message") or found.text or "").strip()
                break
        cases.append(
            {
                "name": case.get("name", "?"),
                "file": case.get("file") or case.get("classname", ""),
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message.splitlines()[0][:400] if message else "",
            }
        )
    return cases


def _cases_from_log(path: Path) -> list[dict[str, Any]]:
    """The outcomes ``pytest -v`` printed before it was stopped (``tests/gpu/x.py::name PASSED``)."""
    outcomes = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped", "ERROR": "error"}
    cases = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            words = line.split()
            if len(words) >= 2 and "::" in words[0] and words[1] in outcomes:
                name = words[0].split("::")[-1]
                cases.append({"name": name, "outcome": outcomes[words[1]], "seconds": 0.0, "message": ""})
    return cases


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def step_tests(ctx: Context, result: StepResult) -> None:
    """``pytest -m gpu tests/gpu`` (collection only in a dry run); per-test outcomes and numbers."""
    s = ctx.settings
    timeout = min(s.timeouts["tests"], ctx.remaining())
    if s.dry_run:
        argv = [s.python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "-m", "gpu"]
        command = run_command([*argv, "tests/gpu"], ctx.logs / "tests.log", ctx.step_env(), timeout)
        result.commands.append(command)
        text = (ctx.logs / "tests.log").read_text(encoding="utf-8", errors="replace")
        collected = [ln for ln in text.splitlines() if "::" in ln and ln.startswith("tests/gpu/")]
        result.numbers["collected"] = len(collected)
        result.notes += [f"would run {ln}" for ln in collected]
        if command["rc"] != 0 or not collected:
            result.failures.append(f"collecting the GPU tests failed (exit {command['rc']}, see tests.log)")
    else:
        junit, numbers = s.report_dir / "tests-junit.xml", s.report_dir / "tests-numbers.jsonl"
        for stale in (junit, numbers):
            stale.unlink(missing_ok=True)
        env = ctx.step_env(GPU_CHECK_RESULTS=str(numbers))
        env.pop("GPU_TESTS_ON_CPU", None)  # the rehearsal switch of the tests themselves
        command = run_command(tests_command(s, junit), ctx.logs / "tests.log", env, timeout)
        result.commands.append(command)
        cases = read_junit(junit) or _cases_from_log(ctx.logs / "tests.log")  # no JUnit file when cut
        result.numbers["tests"] = cases
        result.numbers["measured"] = _read_jsonl(numbers)
        result.failures += [
            f"{c['name']}: {c['message']}" for c in cases if c["outcome"] in ("failed", "error")
        ]
        if command["rc"] not in (0, None) and not result.failures and not command["timed_out"]:
            result.failures.append(f"pytest exited {command['rc']} (see tests.log)")
        if cases and all(c["outcome"] == "skipped" for c in cases):
            result.notes.append("every GPU test skipped: " + cases[0]["message"])
    result.status = "timeout" if command["timed_out"] else ("failed" if result.failures else "ok")


# ---------------------------------------------------------------- step 3: notebooks


def notebook_paths(wanted: Sequence[str] | None) -> list[Path]:
    """``notebooks/NN_*.ipynb`` in order; ``wanted`` (``["03", "05"]``) keeps those numbers or names."""
    books = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if wanted:
        books = [b for b in books if any(b.name.startswith(w) or b.stem == w for w in wanted)]
    return books


def notebook_extras(path: Path) -> list[str]:
    """A notebook's ``metadata.course.extras`` (``["dali"]``, ``["ray"]``…)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError):
        return []
    return list(meta.get("course", {}).get("extras", []))


def notebook_command(s: Settings, book: Path, junit: Path | None) -> list[str]:
    """One notebook under nbval as the GPU run executes it (quick size comes from the environment)."""
    argv = [s.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--nbval-lax", "--nbval-current-env"]
    argv.append("--nbval-cell-timeout=600")
    if junit is not None:
        argv.append(f"--junitxml={junit}")
    return [*argv, str(book.relative_to(REPO_ROOT))]


FIND_SPECS = r"""
import importlib.util, json, sys
out = {}
for module in json.loads(sys.argv[1]):
    try:
        out[module] = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        out[module] = False
print(json.dumps(out))
"""


def step_notebooks(ctx: Context, result: StepResult) -> None:
    """Every notebook under nbval at quick size, one pytest per notebook (collection only in a dry run)."""
    s = ctx.settings
    books = notebook_paths(s.notebooks)
    if not books:
        result.status = "failed"
        result.failures.append(f"no notebook matches GPU_CHECK_NOTEBOOKS={','.join(s.notebooks or [])}")
        return
    found = ctx.python_json(FIND_SPECS, json.dumps([*NOTEBOOK_MODULES, *EXTRA_MODULES.values()]))
    missing = [m for m in NOTEBOOK_MODULES if not found.get(m)]
    if missing:
        result.status = "missing"
        result.failures.append(
            f"{', '.join(missing)} not importable: nbval cannot run the notebooks"
            " (bring the wheels: CONTRIBUTING.md, GPU の確認)"
        )
        return
    step_end = time.monotonic() + min(s.timeouts["notebooks"], ctx.remaining())
    env = ctx.step_env(TUTORIAL_QUICK="1")
    if s.dry_run:
        argv = [s.python, "-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "--nbval-lax"]
        argv += ["--nbval-current-env", *[str(b.relative_to(REPO_ROOT)) for b in books]]
        command = run_command(argv, ctx.logs / "notebooks.log", env, step_end - time.monotonic())
        result.commands.append(command)
        text = (ctx.logs / "notebooks.log").read_text(encoding="utf-8", errors="replace")
        rows = []
        for book in books:
            cells = sum(1 for ln in text.splitlines() if ln.startswith(f"notebooks/{book.name}::"))
            rows.append({"notebook": book.name, "status": "collected", "cells": cells, "seconds": 0.0})
            if not cells:
                result.failures.append(f"{book.name}: no cells collected")
        result.numbers["notebooks"] = rows
        if command["rc"] != 0:
            result.failures.append(
                f"collecting the notebooks failed (exit {command['rc']}, see notebooks.log)"
            )
        result.status = "timeout" if command["timed_out"] else ("failed" if result.failures else "ok")
        return
    rows = result.numbers.setdefault("notebooks", [])
    cut = False
    for book in books:
        absent = [e for e in notebook_extras(book) if e in SKIPPED_EXTRAS and not found.get(EXTRA_MODULES[e])]
        if absent:
            line = f"skipped: {', '.join(absent)} not installed here (not brought to the GPU machine)"
            rows.append({"notebook": book.name, "status": "skipped", "seconds": 0.0, "message": line})
            print(f"  {book.name}: {line}", flush=True)
            ctx.save()
            continue
        left = step_end - time.monotonic()
        if left < 10:
            rows.append(
                {"notebook": book.name, "status": "not run", "seconds": 0.0, "message": "no time left"}
            )
            cut = True
            continue
        junit = s.report_dir / f"nbval-{book.stem}.xml"
        junit.unlink(missing_ok=True)
        log = ctx.logs / f"notebook-{book.stem}.log"
        command = run_command(notebook_command(s, book, junit), log, env, min(NOTEBOOK_TIMEOUT, left))
        result.commands.append(command)
        cells = read_junit(junit)
        bad = [c for c in cells if c["outcome"] in ("failed", "error")]
        status = "timeout" if command["timed_out"] else ("failed" if bad or command["rc"] else "ok")
        message = f"{bad[0]['name']}: {bad[0]['message']}" if bad else ""
        if status == "timeout":
            message = f"stopped after {command['seconds']:.0f} s (see {log.name})"
        elif status == "failed" and not message:
            message = f"pytest exited {command['rc']} (see {log.name})"
        row = {"notebook": book.name, "status": status, "cells": len(cells), "seconds": command["seconds"]}
        rows.append({**row, "message": message})
        if status != "ok":
            result.failures.append(f"{book.name}: {message}")
        ctx.save()
    timed_out = any(r["status"] == "timeout" for r in rows)
    result.status = "timeout" if timed_out or cut else ("failed" if result.failures else "ok")


# ---------------------------------------------------------------- step 4: bench


def _short_gpu(name: str | None) -> str:
    return (name or "no GPU").removeprefix("NVIDIA ").strip()


def bench_runs(s: Settings, gpu: str | None, out: Path) -> list[dict[str, Any]]:
    """The bench runs a GPU run makes: the whole machine with the DALI sweep, then the same GPU pinned to
    two cores with the hardware JPEG decoder off (that GPU's figure, not a T4's). Each: label, folder, argv,
    whether it is pinned to 2 cores."""
    base = [s.python, "-m", "helpers.bench", "--arch", "vit-b16-random", "--n", str(s.bench_n), "--no-check"]
    base += ["--repeats", str(s.bench_repeats), "--dali-hybrid-threshold", DALI_HYBRID_THRESHOLDS]
    whole = [*base, "--dali-hw-decoder-load", DALI_HW_DECODER_LOADS, "--out", str(out / "gpu")]
    note = f"{_short_gpu(gpu)} pinned to two cores with the hardware decoder off"
    pinned = [*base, "--dali-hw-decoder-load", "0", "--note", note, "--out", str(out / "two-cores")]
    return [
        {"label": f"{gpu or 'no GPU'}, all cores", "folder": "gpu", "argv": whole, "pinned": False},
        {
            "label": f"the {note} (hw_decoder_load=0)",
            "folder": "two-cores",
            "argv": pinned,
            "pinned": True,
        },
    ]


def _pin_two_cores() -> None:
    os.sched_setaffinity(0, {int(c) for c in TWO_CORES.split(",")})


def read_bench(folder: Path) -> dict[str, Any]:
    """The numbers of a ``bench.json``: machine label, every row, the ceilings."""
    try:
        data = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    keep = ("name", "items_per_s", "seconds", "speedup", "spread", "max_prob_diff", "tolerance", "correct")
    rows = [
        {k: r.get(k) for k in (*keep, "share_of_ceiling", "decoders", "runs")}
        for r in data.get("results", [])
    ]
    ceilings = [{"name": c["name"], "images_per_s": c["images_per_s"]} for c in data.get("ceilings", [])]
    machine = data.get("machine", {}).get("label")
    return {"machine": machine, "settings": data.get("settings"), "results": rows, "ceilings": ceilings}


def start_workload(ctx: Context) -> None:
    """Make the bench's JPEGs in the background while the tests and notebooks use the GPU (~30 s of
    one core for 1000); :func:`step_bench` waits for it."""
    ctx.logs.mkdir(parents=True, exist_ok=True)
    code = f"from helpers.data import make_workload; make_workload({ctx.settings.bench_n}, progress=False)"
    with open(ctx.logs / "workload.log", "wb") as log:  # the child keeps its own descriptor
        ctx.background = subprocess.Popen(
            [ctx.settings.python, "-c", code],
            cwd=REPO_ROOT,
            env=ctx.step_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_background(ctx: Context, limit: float) -> None:
    """Let the workload generation started at the beginning finish (at most ``limit`` s), else stop it."""
    proc, ctx.background = ctx.background, None
    if proc is None:
        return
    try:
        proc.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.wait()


def step_bench(ctx: Context, result: StepResult) -> None:
    """``helpers.bench`` runs; their bench.json/md/png land in the report folder (``bench/…``)."""
    s = ctx.settings
    out = s.report_dir / "bench"
    step_end = time.monotonic() + min(s.timeouts["bench"], ctx.remaining())
    runs = result.numbers.setdefault("runs", [])
    if s.dry_run:
        argv = [s.python, "-m", "helpers.bench", "--model", "embedded", "--n", "16", "--no-check"]
        plan = [
            {
                "label": "dry run: embedded model, 16 images, CPU",
                "folder": "dry-run",
                "pinned": False,
                "argv": [*argv, "--out", str(out / "dry-run")],
            }
        ]
    else:
        plan = bench_runs(s, ctx.report.machine.get("gpu"), out)
        _wait_background(ctx, min(60.0, step_end - time.monotonic() - 60))
    for i, run in enumerate(plan):
        left = step_end - time.monotonic()
        share = BENCH_GPU_SHARE if i == 0 and len(plan) > 1 else 1.0
        if left < 15:
            result.failures.append(f"{run['label']}: not run, no time left")
            continue
        folder = out / run["folder"]
        shutil.rmtree(folder, ignore_errors=True)
        argv, preexec, shown = run["argv"], None, None
        if run["pinned"]:
            if shutil.which("taskset"):
                argv = ["taskset", "-c", TWO_CORES, *argv]
            else:
                preexec = _pin_two_cores
                shown = f"(pinned to cores {TWO_CORES}) {shlex.join(argv)}"
        log = ctx.logs / f"bench-{run['folder']}.log"
        command = run_command(argv, log, ctx.step_env(), left * share, preexec_fn=preexec, shown=shown)
        result.commands.append(command)
        numbers = read_bench(folder)
        if not numbers:  # cut short or failed: keep the variants it printed as it went
            text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
            numbers = {"printed": [ln.strip() for ln in text.splitlines() if "画像/秒" in ln]}
        runs.append({"label": run["label"], **numbers})
        if command["timed_out"]:
            result.failures.append(f"{run['label']}: stopped after {command['seconds']:.0f} s")
        elif command["rc"] == 0 and not numbers.get("results"):
            result.failures.append(f"{run['label']}: no results in {folder / 'bench.json'}")
        elif command["rc"] != 0:
            wrong = [r["name"] for r in numbers.get("results", []) if not r.get("correct")]
            why = (
                f"variants outside their tolerance: {', '.join(wrong)}" if wrong else f"exit {command['rc']}"
            )
            result.failures.append(f"{run['label']}: {why} (see {log.name})")
        ctx.save()
    timed_out = any(c["timed_out"] for c in result.commands)
    result.status = "timeout" if timed_out else ("failed" if result.failures else "ok")


STEP_FUNCTIONS: dict[str, Callable[[Context, StepResult], None]] = {
    "wheels": step_wheels,
    "tests": step_tests,
    "notebooks": step_notebooks,
    "bench": step_bench,
}


# ---------------------------------------------------------------- the dry run's set-up and the plan


def prepare_dry_run(ctx: Context) -> None:
    """A temporary ``$GPU_WHEELS`` with two throw-away wheels (one cut in parts, as ``stage-wheels``
    sends DALI) and a temporary site folder: the wheels step then proves it installs and imports."""
    temp = Path(tempfile.mkdtemp(prefix="gpu-check-dry-"))
    ctx.temp = temp
    wheels = temp / "wheels"
    for name, parts in (("gpu-check-probe-whole", 1), ("gpu-check-probe-parts", 2)):
        module = name.replace("-", "_")
        text = f'"""Installed by make gpu-check\'s dry run."""\nVALUE = "{module}"\n'
        wheel = build_wheel(wheels, name, "0.0.1", {f"{module}/__init__.py": text})
        if parts > 1:
            split_file(wheel, parts)
    ctx.settings.wheels_dir = wheels
    ctx.settings.site = temp / "site"


def gpu_plan(s: Settings) -> dict[str, list[str]]:
    """The commands a GPU run makes, step by step (printed by the dry run, kept in its report)."""
    py = "python3"

    def show(argv: Sequence[str]) -> str:
        return shlex.join([py if a == s.python else a for a in argv])

    report = s.report_dir
    wheels = [
        f"{py} -m pip install --no-deps --no-index --no-compile --target $GPU_CHECK_SITE"
        " <the $GPU_WHEELS/*.whl whose packages do not import>"
    ]
    tests = [show(tests_command(s, report / "tests-junit.xml"))]
    books = [
        ("TUTORIAL_QUICK=1 " + show(notebook_command(s, b, None)))
        + (" (skipped where Ray is absent)" if "ray" in notebook_extras(b) else "")
        for b in notebook_paths(s.notebooks)
    ]
    bench = []
    for run in bench_runs(s, "NVIDIA H200", report / "bench"):
        bench.append(("taskset -c " + TWO_CORES + " " if run["pinned"] else "") + show(run["argv"]))
    return {"wheels": wheels, "tests": tests, "notebooks": books, "bench": bench}


# ---------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the chosen steps, rewrite the report after each; exit 1 when a step failed or timed out."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU rehearsal (as GPU_CHECK_DRY_RUN=1)")
    args = parser.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    try:
        settings = Settings.from_env(environ, dry_run=args.dry_run)
    except ValueError as err:
        print(f"gpu-check: {err}", file=sys.stderr)
        return 2
    begin = time.monotonic()
    settings.report_dir.mkdir(parents=True, exist_ok=True)
    report = Report.load(settings.report_dir / "report.json", settings.dry_run)
    ctx = Context(settings, report, environ, begin + settings.budget_s)
    mode = "dry run (CPU rehearsal)" if settings.dry_run else "GPU run"
    print(
        f"gpu-check: {mode}, steps {','.join(settings.steps)}, budget {settings.budget_s:.0f} s", flush=True
    )
    try:
        if settings.dry_run:
            prepare_dry_run(ctx)
        run = {"date": now(), "steps": settings.steps, "dry_run": settings.dry_run}
        report.runs = [*report.runs[-9:], run]  # the last ten
        report.settings = {
            "steps": settings.steps,
            "timeouts_s": settings.timeouts,
            "budget_s": settings.budget_s,
            "python": settings.python,
            "gpu_wheels": str(settings.wheels_dir) if settings.wheels_dir else None,
            "site": str(settings.site),
            "bench_n": settings.bench_n,
            "bench_repeats": settings.bench_repeats,
            "notebooks": settings.notebooks,
        }
        if settings.dry_run:
            report.plan = gpu_plan(settings)
        report.machine = probe_machine(ctx)
        torch_import = report.machine.get("imports", {}).get("torch", "no answer from the interpreter")
        if torch_import != "ok":
            print(
                f"gpu-check: torch does not import in {settings.python} ({torch_import}): on the GPU machine,"
            )
            print(
                "  run PYTHON=/opt/torch/.venv/bin/python make gpu-check (the interpreter that holds torch)"
            )
        elif not settings.dry_run and not report.machine.get("cuda_available"):
            print(
                "gpu-check: no CUDA GPU here: the GPU tests will skip (GPU_CHECK_DRY_RUN=1 is the rehearsal)"
            )
        for name in settings.steps:
            report.steps[name] = StepResult(name, status="pending")
        ctx.save()
        if "bench" in settings.steps and not settings.dry_run:
            start_workload(ctx)
        for name in settings.steps:
            result = StepResult(name, status="running", started=now())
            report.steps[name] = result
            print(f"[{name}] ({ctx.remaining():.0f} s of the budget left)", flush=True)
            step_begin = time.monotonic()
            if ctx.remaining() < 10:
                result.status = "not run"
                result.failures.append("the budget (GPU_CHECK_BUDGET_S) was spent before this step")
            else:
                try:
                    STEP_FUNCTIONS[name](ctx, result)
                except Exception as err:  # a bug here must not lose the report of the other steps
                    result.status = "failed"
                    result.failures.append(f"gpu_check.py itself failed: {type(err).__name__}: {err}")
            result.seconds = round(time.monotonic() - step_begin, 1)
            installed = any(w["state"] == "installed" for w in result.numbers.get("wheels", []))
            if name == "wheels" and installed and not settings.dry_run:
                report.machine = probe_machine(ctx)  # DALI, nbval... are there now
            print(f"[{name}] {result.status} in {result.seconds:.1f} s", flush=True)
            for failure in result.failures:
                print(f"  ! {failure}", flush=True)
            ctx.save()
    finally:
        if ctx.background is not None:
            _kill_group(ctx.background.pid)
        if ctx.temp is not None:
            shutil.rmtree(ctx.temp, ignore_errors=True)
    ran = [report.steps[n] for n in settings.steps]
    print(f"\ngpu-check: {time.monotonic() - begin:.0f} s; " + ", ".join(f"{r.name} {r.status}" for r in ran))
    for folder in ctx.folders():
        print(f"report: {folder / 'report.md'}")
    if settings.dry_run:
        print("\nOn a GPU machine, make gpu-check runs:")
        for step, commands in report.plan.items():
            print(f"  {step}:")
            for command in commands:
                print(f"    {command}")
    return 1 if any(r.status in STATUS_FAILED for r in ran) else 0


if __name__ == "__main__":
    sys.exit(main())
