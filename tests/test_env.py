"""helpers.env: runtime detection, hub reachability without hangs, quick/full sizes, the report."""

from __future__ import annotations

import io
import time

import pytest

from helpers import env


def test_not_colab_here() -> None:
    assert env.in_colab() is False


def test_colab_detected_with_stand_in_module(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    package = tmp_path / "google" / "colab"
    package.mkdir(parents=True)
    (tmp_path / "google" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("google", "google.colab"):
        monkeypatch.delitem(__import__("sys").modules, name, raising=False)
    assert env.in_colab() is True


@pytest.mark.parametrize(("has_gpu", "expected"), [(True, "cuda"), (False, "cpu")])
def test_device_follows_what_torch_sees(
    monkeypatch: pytest.MonkeyPatch, has_gpu: bool, expected: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    assert env.cuda_available() is has_gpu and env.device() == expected


def test_no_gpu_means_no_name_and_no_dali_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env.dali_gpu_problem.cache_clear()
    assert env.gpu_name() is None
    assert env.dali_gpu_ok() is False
    env.dali_gpu_problem.cache_clear()


def test_dali_gpu_ok_tries_a_one_image_mixed_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GPU reported but no driver (this machine), the trial decode fails: no, and why."""
    import torch

    if env.dali_version() is None:
        pytest.fail("NVIDIA DALI does not import (re-create .venv: make venv)", pytrace=False)
    if torch.cuda.is_available():
        pytest.skip("a real GPU answers for itself here (tests/gpu checks it)")
    monkeypatch.setattr(env, "cuda_available", lambda: True)  # an import-only check would say yes
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    env.dali_gpu_problem.cache_clear()
    try:
        problem = env.dali_gpu_problem()
        assert env.dali_gpu_ok() is False
    finally:
        env.dali_gpu_problem.cache_clear()
    assert problem is not None and "mixed デコーダーで JPEG 1 枚をデコードできません" in problem
    assert "RuntimeError" in problem  # DALI's own first line follows (here: no CUDA driver)


def test_dali_gpu_ok_says_yes_when_the_trial_decode_gives_the_picture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import numpy as np
    import torch

    class Images:
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.shape = shape

        def as_cpu(self) -> Images:
            return self

        def as_array(self) -> np.ndarray:
            return np.zeros(self.shape, dtype=np.uint8)

    class Pipe:
        def __init__(self, shape: tuple[int, ...]) -> None:
            self.out = Images(shape)

        def build(self) -> None:
            pass

        def run(self) -> tuple[Images]:
            return (self.out,)

    monkeypatch.setattr(env, "dali_version", lambda: "2.1.1")
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    try:
        for shape, ok in (((1, 16, 16, 3), True), ((1, 8, 8, 3), False)):
            monkeypatch.setattr(env, "_dali_probe_pipeline", lambda device_id, s=shape: Pipe(s))
            env.dali_gpu_problem.cache_clear()
            assert env.dali_gpu_ok() is ok
        assert "(1, 8, 8, 3)" in env.dali_gpu_problem()
    finally:
        env.dali_gpu_problem.cache_clear()


def test_dali_version_is_a_string_or_none() -> None:
    version = env.dali_version()
    assert version is None or version[0].isdigit()


def test_hub_unreachable_answers_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    env.hub_reachable.cache_clear()
    # A non-routable address (TEST-NET-1) must time out within the limit, never hang.
    monkeypatch.setenv("HF_ENDPOINT", "https://192.0.2.1")
    start = time.perf_counter()
    assert env.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - start < 5
    env.hub_reachable.cache_clear()


def test_hub_offline_flag_short_circuits(monkeypatch: pytest.MonkeyPatch) -> None:
    env.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert env.hub_reachable() is False
    env.hub_reachable.cache_clear()


@pytest.mark.parametrize(
    ("quick", "ci", "expected"),
    [("1", None, True), ("0", "true", False), ("", "true", True)],
)
def test_quick_mode(monkeypatch: pytest.MonkeyPatch, quick: str, ci: str | None, expected: bool) -> None:
    monkeypatch.setenv("TUTORIAL_QUICK", quick)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    assert env.quick_mode() is expected


@pytest.mark.parametrize(("has_gpu", "quick"), [(True, False), (False, True)])
def test_quick_without_gpu_by_default(monkeypatch: pytest.MonkeyPatch, has_gpu: bool, quick: bool) -> None:
    monkeypatch.delenv("TUTORIAL_QUICK", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(env, "cuda_available", lambda: has_gpu)
    assert env.quick_mode() is quick


def test_workload_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUTORIAL_QUICK", "1")
    assert env.workload_size(full=1000, quick=8) == 8
    monkeypatch.setenv("TUTORIAL_QUICK", "0")
    assert env.workload_size(full=1000, quick=8) == 1000


def test_report_prints_every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env.hub_reachable.cache_clear()
    out = io.StringIO()
    info = env.report(file=out)
    text = out.getvalue()
    assert len(text.splitlines()) == len(info.rows())
    for key, value in info.rows():
        assert key in text and value in text
    env.hub_reachable.cache_clear()


def test_display_width_counts_wide_characters() -> None:
    assert env.display_width("GPU") == 3
    assert env.display_width("デバイス") == 8


def test_usable_cpus_counts_the_affinity_mask_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """``taskset -c 0,3`` on a 16-core machine: 2 cores to use, not 16."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    assert env.usable_cpus() == 2
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: no mask, the machine's count
    assert env.usable_cpus() == 16


def test_a_broken_dali_is_reported_as_broken_not_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import importlib.util

    real_import = builtins.__import__

    def failing(name, *args, **kwargs):
        if name.startswith("nvidia.dali"):
            raise OSError("libnvimgcodec.so.0: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())  # the wheel is there
    problem = env.dali_problem()
    assert env.dali_version() is None and "壊れています" in problem and "libnvimgcodec" in problem
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # nothing installed
    assert "入っていません" in env.dali_problem() and "pip install nvidia-dali-cuda120" in env.dali_problem()
