"""``python -m helpers.bench``: runs on the CPU, writes JSON + Markdown + PNG, every variant correct."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from helpers import bench


def test_bench_writes_three_files_and_every_variant_agrees(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench"
    code = bench.main(["--n", "8", "--model", "embedded", "--out", str(out), "--batch-size", "4"])
    assert code == 0
    report = json.loads((out / "bench.json").read_text(encoding="utf-8"))
    keys = [row["key"] for row in report["results"]]
    assert keys[:5] == ["a", "b", "c", "d", "e"]
    assert all(row["correct"] for row in report["results"]), report["results"]
    assert all(row["items"] == 8 and row["items_per_s"] > 0 for row in report["results"])
    assert report["results"][0]["speedup"] == 1.0
    machine = report["machine"]
    assert {"gpu", "cpu_cores_usable", "torch", "transformers", "dali", "date"} <= set(machine)
    assert report["settings"]["model"] == "embedded" and report["settings"]["n_images"] == 8
    markdown = (out / "bench.md").read_text(encoding="utf-8")
    assert "a. 1 枚ずつ" in markdown and "30.5" in markdown
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "基準比" in printed and "bench.json" in printed
    full, at_size = report["ceilings"]  # decode + geometry only, measured in the same run
    assert "全体をデコード" in full["name"] and "縮小デコード" in at_size["name"]
    assert full["images_per_s"] > 0 and at_size["images_per_s"] > 0
    for row in report["results"]:
        assert row["share_of_ceiling"] == pytest.approx(row["items_per_s"] / at_size["images_per_s"])
    assert "上限 (縮小デコード) に対する割合" in markdown


def test_dali_knobs_make_one_row_each_on_a_gpu_and_one_on_the_cpu(tmp_path: Path, capsys) -> None:
    from helpers.dali import DecoderKnobs

    grid = bench._knob_grid("0,1000000", "0,0.65")
    assert grid == [
        DecoderKnobs(0.0, 0),
        DecoderKnobs(0.65, 0),
        DecoderKnobs(0.0, 1_000_000),
        DecoderKnobs(0.65, 1_000_000),
    ]
    assert bench._knob_grid(None, None) == [None]
    names = [v.name for v in bench.variants("cuda", grid) if v.key == "dali"]
    assert len(names) == 4 and "hybrid_huffman_threshold 1,000,000, hw_decoder_load 0.0" in names[2]
    argv = ["--n", "4", "--model", "embedded", "--out", str(tmp_path), "--variants", "dali", "--no-ceiling"]
    assert bench.main([*argv, "--dali-hybrid-threshold", "0,1000000"]) == 0
    assert "GPU がないので DALI は CPU デコードの 1 行だけです" in capsys.readouterr().out
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert [row["key"] for row in report["results"]] == ["a", "dali"] and report["ceilings"] == []


def test_arch_is_a_spelling_of_the_random_model(monkeypatch, tmp_path: Path) -> None:
    asked = []

    def fake_load(name=None, **kwargs):
        asked.append(name)
        raise SystemExit(0)

    monkeypatch.setattr(bench, "prepare", fake_load)
    for argv in (["--arch", "vit-b16-random"], ["--model", "random:vit-b16"]):
        with pytest.raises(SystemExit):
            bench.main([*argv, "--out", str(tmp_path)])
    assert asked == ["random:vit-b16", "random:vit-b16"]
    with pytest.raises(SystemExit):
        bench.main(["--arch", "vit-b16-random", "--model", "embedded"])  # one or the other


def test_a_variant_that_disagrees_fails_the_run(monkeypatch, tmp_path: Path) -> None:
    real = bench.variants

    def with_a_wrong_one(device, knobs=(None,)):
        chosen = real(device, knobs)[:2]
        wrong = bench.Variant("x", "x. 間違い", lambda s: bench.per_image(s).roll(1, dims=1))
        return [*chosen, wrong]

    monkeypatch.setattr(bench, "variants", with_a_wrong_one)
    code = bench.main(["--n", "4", "--model", "embedded", "--out", str(tmp_path), "--variants", "b,x"])
    assert code == 1
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert [row["correct"] for row in report["results"]] == [True, True, False]


def test_an_unreadable_image_is_named(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"")
    code = bench.main(["--images", str(folder), "--model", "embedded", "--out", str(tmp_path / "out")])
    assert code == 1 and "b.jpg" in capsys.readouterr().err


def test_a_dali_row_that_pil_did_is_not_called_dali(monkeypatch, tmp_path: Path) -> None:
    """A broken DALI: every file redone by PIL, counted, and the row says so instead of a DALI speed."""
    from helpers import dali

    def broken(*args, **kwargs):
        raise RuntimeError("Critical error in pipeline:\nencountered:\nnvJPEG error (test)")

    monkeypatch.setattr(dali, "_host_pipeline", broken)
    code = bench.main(["--n", "4", "--model", "embedded", "--out", str(tmp_path), "--variants", "dali"])
    assert code == 0  # the answers are still right: PIL decoded them
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    row = report["results"][-1]
    assert row["key"] == "dali" and "※ PIL が 100%" in row["name"]
    assert "4 after DALI errors (nvJPEG error (test) 4)" in row["decoders"]
    assert "DALI の速さとは言えません" in (tmp_path / "bench.md").read_text(encoding="utf-8")


def test_stages_loader_names_the_worker_start_up_apart_from_decoding(tmp_path: Path) -> None:
    from helpers.data import make_workload
    from helpers.models import load_clip

    paths = make_workload(4)
    setup = bench.Setup(load_clip("embedded"), paths, ["猫の写真", "犬の写真"], 2, 1)
    for exact in (True, False):
        stages = bench.stages_loader(setup, exact_decode=exact)
        assert list(stages) == [bench.STARTUP_STAGE, "デコード", "前処理", "転送", "モデル"]
        assert all(value >= 0 for value in stages.values())
        assert stages["デコード"] > 0 and stages[bench.STARTUP_STAGE] > 0  # a worker did start


def test_one_row_per_runtime_and_precision(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("CLIP_ONNX_CACHE", str(tmp_path / "onnx"))
    monkeypatch.setattr(bench.runtimes, "native_bf16", lambda: (False, "test"))
    argv = ["--n", "4", "--model", "embedded", "--out", str(tmp_path), "--batch-size", "2", "--no-ceiling"]
    assert (
        bench.main([*argv, "--variants", "a", "--runtime", "torch,onnx", "--precision", "fp32,int8,bf16"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "このマシンで動かない組み合わせは測りません: torch int8, torch bf16, onnx bf16" in printed
    report = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert [row["key"] for row in report["results"]] == ["a", "torch-fp32", "onnx-fp32", "onnx-int8"]
    names = [row["name"] for row in report["results"]]
    assert names[-1] == "g + onnx int8 (CPUExecutionProvider)"
    assert all(row["correct"] for row in report["results"]), report["results"]
    assert bench.main([*argv, "--runtime", "torch", "--precision", "fp16"]) == 1  # one pair: refused
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("エラー: --runtime torch --precision fp16 はこのマシン (CPU) では使えません")
    assert "使える組み合わせ: torch fp32, onnx fp32, onnx int8" in err[-1]


def test_the_t4_estimate_is_a_roofline_from_compute_and_bandwidth() -> None:
    """ViT-B/16 at 224 px is about 17.6 G multiply-adds an image; the bound takes the slower of compute
    and memory traffic, so at batch 1 (the weights read for one image) fp16 is memory-bound."""
    flops, traffic = bench.vit_b16_work(1)
    assert flops == pytest.approx(2 * 17.6e9, rel=0.02)
    assert bench.vit_b16_work(64)[1] < traffic and bench.vit_b16_work(1, value_bytes=4)[1] == 2 * traffic
    bound, compute_ms, memory_ms = bench.t4_model_estimate(batch=1)
    assert memory_ms > compute_ms and bound == pytest.approx(1e3 / memory_ms)
    bound, compute_ms, memory_ms = bench.t4_model_estimate(batch=50, precision="fp32")
    assert compute_ms == pytest.approx(flops / 8.1e12 * 1e3) and bound == pytest.approx(1e3 / compute_ms)
