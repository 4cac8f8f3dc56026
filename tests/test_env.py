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


def test_device_is_cpu_without_gpu() -> None:
    assert env.device() == ("cuda" if env.cuda_available() else "cpu")
    if not env.cuda_available():
        assert env.gpu_name() is None
        assert env.dali_gpu_ok() is False


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


def test_quick_without_gpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUTORIAL_QUICK", raising=False)
    monkeypatch.delenv("CI", raising=False)
    assert env.quick_mode() is (not env.cuda_available())


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


def test_usable_cpus_counts_the_affinity_mask_and_engines_shares_it() -> None:
    import os

    from helpers import engines

    assert 1 <= env.usable_cpus() <= (os.cpu_count() or 1)
    if hasattr(os, "sched_getaffinity"):
        assert env.usable_cpus() == len(os.sched_getaffinity(0))
    assert engines.usable_cpus is env.usable_cpus
