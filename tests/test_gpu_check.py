"""``make gpu-check`` on the CPU: the GPU tests skip with one line each, the report is written (and
mirrored under ``$OUT``) after every step, a rerun repeats only the chosen steps, steps are stopped at
their timeout, and the wheels step installs only what does not import. ``.ci/run`` also runs the
whole dry run (``GPU_CHECK_DRY_RUN=1 make gpu-check``)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from helpers import REPO_ROOT, env


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "tests" / "gpu" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load()


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    """An environment whose report goes to ``tmp_path/build`` and ``tmp_path/out``."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK", "GPU_WHEELS", "OUT"))}
    return keep | {"GPU_CHECK_REPORT_DIR": str(tmp_path / "build"), "OUT": str(tmp_path / "out")}


def test_gpu_tests_skip_with_one_line_each_without_cuda() -> None:
    if env.cuda_available():
        pytest.skip("this machine has a GPU")
    child_env = {k: v for k, v in os.environ.items() if k != "GPU_TESTS_ON_CPU"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rs", "tests/gpu"],
        cwd=REPO_ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = re.search(r"(\d+) skipped", done.stdout)
    assert found and "passed" not in done.stdout and "failed" not in done.stdout, done.stdout[-2000:]
    skipped = [ln for ln in done.stdout.splitlines() if ln.startswith("SKIPPED [1] tests/gpu/test_gpu.py:")]
    assert len(skipped) == int(found.group(1)) >= 6, done.stdout[-3000:]
    reasons = [ln.split(": ", 1)[1] for ln in skipped]
    assert all(r.startswith("no CUDA GPU: ") and " not checked " in r for r in reasons), reasons
    assert len(set(reasons)) == len(reasons)  # each names what it did not check


def test_steps_are_chosen_and_run_in_the_order_of_value() -> None:
    assert gc.parse_steps(None) == gc.parse_steps(" ") == ["wheels", "tests", "notebooks", "bench"]
    assert gc.parse_steps("bench,TESTS, tests") == ["tests", "bench"]
    with pytest.raises(ValueError, match=r"unknown step\(s\) nbval"):
        gc.parse_steps("tests,nbval")


def test_settings_come_from_the_environment(environ: dict[str, str], tmp_path: Path) -> None:
    s = gc.Settings.from_env(environ | {"GPU_CHECK_TIMEOUT_TESTS": "33", "GPU_CHECK_NOTEBOOKS": "03, 05"})
    assert not s.dry_run and s.out_dir == tmp_path / "out" / "gpu-check"
    assert s.timeouts["tests"] == 33 and s.timeouts["bench"] == gc.TIMEOUTS["bench"]
    assert s.notebooks == ["03", "05"] and [p.name[:2] for p in gc.notebook_paths(s.notebooks)] == [
        "03",
        "05",
    ]
    assert sum(gc.TIMEOUTS.values()) >= gc.BUDGET_S  # the budget, not the sum, bounds a GPU run
    dry = gc.Settings.from_env(environ | {"GPU_CHECK_DRY_RUN": "1"})
    assert dry.dry_run and dry.budget_s == gc.DRY_BUDGET_S


def test_the_notebook_extras_are_the_tooling_s() -> None:
    from helpers.tooling.notebooks import EXTRAS

    assert {extra: packages[0].module for extra, packages in EXTRAS.items()} == gc.EXTRA_MODULES
    assert gc.notebook_extras(gc.notebook_paths(["07"])[0]) == ["ray"]


@pytest.fixture
def fake_steps(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], tmp_path: Path) -> Iterator[list]:
    """Steps that record what the report said when they ran; no subprocess, no GPU."""
    seen: list[tuple[str, dict, dict]] = []
    machine = {"gpu": "NVIDIA H200", "driver": "580.95", "python": "3.12.3", "versions": {"torch": "2.11.0"}}
    machine |= {"imports": {"torch": "ok"}, "cuda_available": True}
    monkeypatch.setattr(gc, "probe_machine", lambda ctx: dict(machine))
    monkeypatch.setattr(gc, "start_workload", lambda ctx: None)

    def step(ctx, result) -> None:
        reports = [json.loads((f / "report.json").read_text(encoding="utf-8")) for f in ctx.folders()]
        seen.append((result.name, *reports))
        result.numbers["marker"] = f"{result.name} {len(seen)}"
        if result.name == "notebooks":
            result.numbers["notebooks"] = [
                {
                    "notebook": "03_dali.ipynb",
                    "status": "failed",
                    "cells": 4,
                    "seconds": 9.5,
                    "message": "Cell 2",
                }
            ]
            result.failures.append("03_dali.ipynb: Cell 2: KeyError")
            result.status = "failed"
        else:
            result.status = "ok"

    monkeypatch.setattr(gc, "STEP_FUNCTIONS", dict.fromkeys(gc.STEPS, step))
    yield seen


def test_the_report_is_rewritten_after_every_step_here_and_under_out(
    fake_steps: list, environ: dict[str, str], tmp_path: Path
) -> None:
    assert gc.main([], environ) == 1  # a step failed
    names = [name for name, _, _ in fake_steps]
    assert names == ["wheels", "tests", "notebooks", "bench"]
    for i, (name, build, out) in enumerate(fake_steps):
        assert build["steps"] == out["steps"]  # the mirror under $OUT is as new as the report
        assert build["steps"][name]["status"] == "pending"
        assert [build["steps"][n]["status"] for n in names[:i]] == ["ok", "ok", "failed"][:i]
    for folder in (tmp_path / "build", tmp_path / "out" / "gpu-check"):
        data = json.loads((folder / "report.json").read_text(encoding="utf-8"))
        markdown = (folder / "report.md").read_text(encoding="utf-8")
        assert data["machine"]["gpu"] == "NVIDIA H200" and data["dry_run"] is False
        assert data["failures"] == ["notebooks: 03_dali.ipynb: Cell 2: KeyError"]
        assert "NVIDIA H200" in markdown and "driver 580.95" in markdown and "torch 2.11.0" in markdown
        assert "| notebooks | failed |" in markdown and "03_dali.ipynb: Cell 2: KeyError" in markdown
        assert "| 03_dali.ipynb | failed | 4 | 9.5 | Cell 2 |" in markdown


def test_a_rerun_repeats_only_the_chosen_steps(
    fake_steps: list, environ: dict[str, str], tmp_path: Path
) -> None:
    assert gc.main([], environ) == 1
    assert gc.main([], environ | {"GPU_CHECK_STEPS": "bench,tests"}) == 0
    assert [name for name, _, _ in fake_steps] == ["wheels", "tests", "notebooks", "bench", "tests", "bench"]
    data = json.loads((tmp_path / "out" / "gpu-check" / "report.json").read_text(encoding="utf-8"))
    markers = {name: step["numbers"]["marker"] for name, step in data["steps"].items()}
    assert markers == {
        "wheels": "wheels 1",
        "tests": "tests 5",
        "notebooks": "notebooks 3",
        "bench": "bench 6",
    }
    assert [run["steps"] for run in data["runs"]] == [list(gc.STEPS), ["tests", "bench"]]
    assert data["failures"] == ["notebooks: 03_dali.ipynb: Cell 2: KeyError"]  # kept from the first run


def _running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_command_is_stopped_at_its_timeout_with_its_children(tmp_path: Path) -> None:
    code = "import subprocess, time; p = subprocess.Popen(['sleep', '60']); print(p.pid, flush=True)"
    code += "; time.sleep(60)"
    begin = time.monotonic()
    done = gc.run_command([sys.executable, "-c", code], tmp_path / "slow.log", dict(os.environ), timeout=2)
    assert done["timed_out"] and done["rc"] is not None and time.monotonic() - begin < 15
    child = int((tmp_path / "slow.log").read_text().split()[0])
    deadline = time.monotonic() + 5
    while _running(child):
        assert time.monotonic() < deadline, "the child of the stopped command is still running"
        time.sleep(0.1)
    fine = gc.run_command([sys.executable, "-c", "print('hi')"], tmp_path / "ok.log", dict(os.environ), 30)
    assert fine["rc"] == 0 and not fine["timed_out"] and (tmp_path / "ok.log").read_text() == "hi\n"


def _wheel(folder: Path, name: str, files: dict[str, str]) -> Path:
    return gc.build_wheel(folder, name, "0.0.1", files)


def test_wheel_modules_go_below_shared_namespace_folders(tmp_path: Path) -> None:
    dali_like = _wheel(
        tmp_path, "fake-dali", {"nvidia/dali/__init__.py": "x = 1\n", "nvidia/dali/ops.py": ""}
    )
    libs_only = _wheel(
        tmp_path,
        "fake-nvjpeg2k",
        {"nvidia/__init__.py": "", "nvidia/j2k/__init__.py": "# libs\n", "nvidia/j2k/lib/__init__.py": ""},
    )
    stub = "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n"
    codec = _wheel(
        tmp_path, "fake-codec", {"nvidia/__init__.py": stub, "nvidia/codec/__init__.py": "y = 2\n"}
    )
    plain = _wheel(tmp_path, "fake-nbval", {"fake_nbval/__init__.py": "z = 3\n", "fake_nbval/plugin.py": ""})
    single = _wheel(tmp_path, "fake-single", {"fake_single.py": "w = 4\n"})
    assert gc.wheel_modules(dali_like) == ["nvidia.dali"]
    assert gc.wheel_modules(libs_only) == ["nvidia.j2k.lib"]
    assert gc.wheel_modules(codec) == ["nvidia.codec"]
    assert gc.wheel_modules(plain) == ["fake_nbval"]
    assert gc.wheel_modules(single) == ["fake_single"]
    assert gc.wheel_dist(plain) == ("fake_nbval", "0.0.1")


def test_wheels_in_parts_are_joined(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "fake-big", {"fake_big/__init__.py": "DATA = '" + "x" * 5000 + "'\n"})
    original = wheel.read_bytes()
    (tmp_path / "in").mkdir()
    moved = wheel.rename(tmp_path / "in" / wheel.name)
    parts = gc.split_file(moved, 3)
    assert [p.name[-6:] for p in parts] == ["part00", "part01", "part02"] and not moved.exists()
    [joined] = gc.collect_wheels(tmp_path / "in", tmp_path / "joined")
    assert joined.name == wheel.name and joined.read_bytes() == original
    assert zipfile.ZipFile(joined).testzip() is None


def test_the_wheels_step_installs_only_what_does_not_import(environ: dict[str, str], tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    _wheel(wheels, "pytest", {"pytest/__init__.py": "raise ImportError('the fake one')\n"})  # imports here
    _wheel(wheels, "fake-gpu-lib", {"nvidia/__init__.py": "", "nvidia/fakegpulib/__init__.py": "OK = 1\n"})
    site = tmp_path / "site"
    s = gc.Settings.from_env(environ | {"GPU_WHEELS": str(wheels), "GPU_CHECK_SITE": str(site)})
    ctx = gc.Context(s, gc.Report(False), environ, time.monotonic() + 120)
    result = gc.StepResult("wheels")
    try:
        gc.step_wheels(ctx, result)
    finally:
        if ctx.temp is not None:
            shutil.rmtree(ctx.temp, ignore_errors=True)
    assert result.status == "ok", result.failures
    states = {w["file"].split("-")[0]: w["state"] for w in result.numbers["wheels"]}
    assert states == {"pytest": "already importable", "fake_gpu_lib": "installed"}
    assert result.numbers["imports_after"]["nvidia.fakegpulib"].startswith("ok")
    assert (site / "nvidia" / "__init__.py").read_text() == gc.NAMESPACE_STUB  # the machine's nvidia.* stays
    check = "import importlib.util as u; print(u.find_spec('nvidia.dali') is not None)"
    seen = subprocess.run([sys.executable, "-c", check], env=ctx.step_env(), capture_output=True, text=True)
    assert seen.stdout.strip() == "True"  # .venv's DALI behind the site folder's nvidia/
    other = tmp_path / "not-ours"
    other.mkdir()
    s.site = other
    refused = gc.StepResult("wheels")
    gc.step_wheels(ctx, refused)
    assert refused.status == "failed" and "not made by gpu-check" in refused.failures[0] and other.exists()


def test_junit_and_bench_files_become_report_numbers(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite><testcase name="test_a" time="1.5"/>'
        '<testcase name="test_b" time="0.1"><skipped message="no CUDA GPU: b not checked"/></testcase>'
        '<testcase name="test_c" time="2"><failure message="assert 0.9 &gt;= 0.999&#10;more">x</failure>'
        "</testcase></testsuite></testsuites>"
    )
    cases = gc.read_junit(tmp_path / "junit.xml")
    assert [(c["name"], c["outcome"], c["message"]) for c in cases] == [
        ("test_a", "passed", ""),
        ("test_b", "skipped", "no CUDA GPU: b not checked"),
        ("test_c", "failed", "assert 0.9 >= 0.999"),
    ]
    (tmp_path / "tests.log").write_text(
        "tests/gpu/test_gpu.py::test_a PASSED                     [ 16%]\n"
        "tests/gpu/test_gpu.py::test_b SKIPPED (no CUDA GPU: b...) [ 33%]\n"
        "tests/gpu/test_gpu.py::test_c \n"  # stopped here
    )
    assert [(c["name"], c["outcome"]) for c in gc._cases_from_log(tmp_path / "tests.log")] == [
        ("test_a", "passed"),
        ("test_b", "skipped"),
    ]
    row = {
        "name": "DALI (GPU)",
        "items_per_s": 3000.0,
        "seconds": 0.3,
        "speedup": 36.0,
        "spread": 0.0,
        "max_prob_diff": 0.01,
        "tolerance": 0.1,
        "correct": True,
        "share_of_ceiling": None,
        "decoders": "",
    }
    bench = {
        "machine": {"label": "H200 pinned to two cores with the hardware decoder off"},
        "settings": {},
        "results": [row],
        "ceilings": [{"name": "上限", "images_per_s": 400.0, "seconds": 2.5, "runs": [2.5]}],
    }
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    numbers = gc.read_bench(tmp_path)
    assert (
        numbers["machine"] == "H200 pinned to two cores with the hardware decoder off"
        and numbers["results"][0]["items_per_s"] == 3000
    )
    lines = gc._render_bench({"runs": [{"label": "the H200 pinned to two cores", **numbers}]})
    assert "### the H200 pinned to two cores" in lines and any(
        ln.startswith("| DALI (GPU) | 3000.0 |") for ln in lines
    )


def test_the_bench_runs_use_flags_that_bench_has(environ: dict[str, str], tmp_path: Path) -> None:
    from helpers import bench

    s = gc.Settings.from_env(environ)
    whole, pinned = gc.bench_runs(s, "NVIDIA H200", tmp_path)
    for run in (whole, pinned):
        assert run["argv"][:3] == [s.python, "-m", "helpers.bench"]
        bench.build_parser().parse_args(run["argv"][3:])  # exits on a flag bench does not know
    assert (
        pinned["pinned"]
        and "H200 pinned to two cores with the hardware decoder off" in pinned["argv"]
        and "the H200 pinned to two cores with the hardware decoder off" in pinned["label"]
    )
    assert not any("T4" in part for run in (whole, pinned) for part in [run["label"], *run["argv"]])
    assert pinned["argv"][pinned["argv"].index("--dali-hw-decoder-load") + 1] == "0"
    assert whole["argv"][whole["argv"].index("--n") + 1] == "1000"


def test_notebooks_run_one_by_one_and_07_skips_without_ray(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], tmp_path: Path
) -> None:
    ran: list[list[str]] = []

    def fake_run(argv, log, env, timeout, **kwargs):
        ran.append(list(argv))
        assert env["TUTORIAL_QUICK"] == "1" and timeout <= gc.NOTEBOOK_TIMEOUT
        junit = next(a.split("=", 1)[1] for a in argv if a.startswith("--junitxml="))
        Path(junit).parent.mkdir(parents=True, exist_ok=True)
        Path(junit).write_text('<testsuite><testcase name="Cell 0" time="1"/></testsuite>')
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("")
        return {"command": "x", "rc": 0, "timed_out": False, "seconds": 1.0, "log": log.name}

    found = dict.fromkeys([*gc.NOTEBOOK_MODULES, "nvidia.dali"], True) | {"ray": False}
    monkeypatch.setattr(gc.Context, "python_json", lambda self, code, *args, **kw: dict(found))
    monkeypatch.setattr(gc, "run_command", fake_run)
    s = gc.Settings.from_env(environ | {"GPU_CHECK_NOTEBOOKS": "05,07"})
    ctx = gc.Context(s, gc.Report(False), environ, time.monotonic() + 300)
    result = gc.StepResult("notebooks")
    gc.step_notebooks(ctx, result)
    assert result.status == "ok" and [argv[-1] for argv in ran] == [
        "notebooks/05_pytorch_inference_tips.ipynb"
    ]
    rows = {r["notebook"][:2]: r for r in result.numbers["notebooks"]}
    assert rows["05"]["status"] == "ok" and rows["05"]["cells"] == 1
    assert rows["07"]["status"] == "skipped" and "ray not installed" in rows["07"]["message"]
    found["nbval"] = False  # no nbval on the machine: said, not crashed on
    missing = gc.StepResult("notebooks")
    gc.step_notebooks(ctx, missing)
    assert missing.status == "missing" and "nbval not importable" in missing.failures[0]
