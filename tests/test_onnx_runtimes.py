"""helpers.runtimes: export both towers to ONNX, ONNX Runtime equals eager, cache, INT8, refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from helpers import runtimes
from helpers.data import open_image, sample_photos
from helpers.fixtures import shapes
from helpers.models import check, load_clip
from helpers.models.random_vit import load_random_vit_b16
from helpers.runtimes import export, ort, quantize

TEXTS = ["赤い丸", "青い三角の絵です", "黄色い星がひとつ描かれた白い紙", "犬"]


@pytest.fixture(scope="module")
def model():
    return load_clip("embedded", "cpu")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def files(model, cache: Path) -> export.Exported:
    return export.exported(model, cache)


def _pixels(model, n: int) -> torch.Tensor:
    pictures = [
        shapes.draw_shape(label, seed) for seed in (7, 8) for label in ("赤い丸", "青い三角", "緑の四角")
    ]
    return model.preprocess(pictures[:n])


def _ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}


def test_onnx_fp32_equals_eager_for_other_batch_sizes_and_text_lengths(model, files) -> None:
    assert files.built and files.exporters == {"image": "dynamo", "text": "dynamo"}
    assert files.check.ok() and files.check.batch == 3
    assert files.check.image_max_abs < 1e-4 and files.check.text_max_abs < 1e-4
    image = ort.session(files.image, "cpu")
    text = ort.session(files.text, "cpu")
    for n in (1, 5):  # the export saw a batch of 2
        pixels = _pixels(model, n)
        got = image.run(["features"], {"pixel_values": pixels.numpy()})[0]
        want = model.encode_images(pixels).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
    tokens = model.tokenize(TEXTS)  # lengths the export never saw
    got = text.run(["features"], {k: v.numpy() for k, v in tokens.items()})[0]
    assert np.abs(got - model.encode_texts(TEXTS).numpy()).max() < 1e-4


def test_onnx_clip_passes_the_models_own_check(model, files, cache: Path) -> None:
    fast = runtimes.use(model, runtimes.choose("onnx", "fp32", "cpu"), cache, log=None)
    assert isinstance(fast, ort.OnnxClip) and fast.fingerprint == model.fingerprint
    assert fast.runtime == "onnx fp32 (CPUExecutionProvider)"
    assert "OK" in check(fast)
    diff = (fast.encode_texts(TEXTS) - model.encode_texts(TEXTS)).abs().max()
    assert float(diff) < 1e-4


def test_the_cache_is_reused_and_rebuilt_when_the_fingerprint_changes(
    model, files, cache: Path, capsys
) -> None:
    again = export.exported(model, cache)
    assert not again.built and again.check == files.check
    runtimes.use(model, runtimes.choose("onnx", "fp32", "cpu"), cache)
    assert "のキャッシュを使います" in capsys.readouterr().out
    other = load_clip("embedded", "cpu")
    other.module.vision.proj.bias.data += 0.5  # other weights: another fingerprint
    other.__dict__.pop("fingerprint", None)
    assert other.fingerprint != model.fingerprint
    (files.folder / "image.int8-dynamic.onnx").write_bytes(b"stale")  # a derived file of the old weights
    rebuilt = export.exported(other, cache)
    assert rebuilt.built and rebuilt.fingerprint == other.fingerprint
    assert not (files.folder / "image.int8-dynamic.onnx").exists()
    pixels = _pixels(other, 2)
    got = ort.session(rebuilt.image, "cpu").run(["features"], {"pixel_values": pixels.numpy()})[0]
    assert np.abs(got - other.encode_images(pixels).numpy()).max() < 1e-4
    export.exported(model, cache, rebuild=True)  # leave the module's cache as the fixture made it


def test_int8_dynamic_quantises_both_towers_and_keeps_the_answers(model, cache: Path) -> None:
    files = export.exported(model, cache)
    fast = runtimes.use(model, runtimes.choose("onnx", "int8", "cpu"), cache, log=None)
    image_ops = _ops(files.file("image", "int8-dynamic"))
    assert {"ConvInteger", "DynamicQuantizeLinear"} & image_ops, image_ops
    assert "DynamicQuantizeLinear" in _ops(files.file("text", "int8-dynamic"))
    fp32_bytes = files.image.stat().st_size + Path(f"{files.image}.data").stat().st_size
    assert files.file("image", "int8-dynamic").stat().st_size < fp32_bytes / 2
    assert "OK" in check(fast)
    pixels = _pixels(model, 6)
    cosine = F.cosine_similarity(fast.encode_images(pixels), model.encode_images(pixels))
    assert float(cosine.min()) > 0.99


def test_int8_static_is_qdq_calibrated_in_bounded_chunks(model, cache: Path, monkeypatch) -> None:
    files = export.exported(model, cache)
    seen: dict = {}
    real = quantize.int8_static

    def spy(src, dst, calibration, chunk=quantize.CALIBRATION_CHUNK):
        batches = list(calibration)
        seen.update(batches=[b.shape for b in batches], chunk=chunk)
        return real(src, dst, batches, chunk)

    monkeypatch.setattr(quantize, "int8_static", spy)
    path = runtimes.build(model, files, "image", "int8-static")
    assert seen["batches"] == [(4, 3, 64, 64), (4, 3, 64, 64), (1, 3, 64, 64)]  # the 9 sample photos
    assert seen["chunk"] == quantize.CALIBRATION_CHUNK
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(path)
    pixels = _pixels(model, 6)
    got = ort.session(path, "cpu").run(["features"], {"pixel_values": pixels.numpy()})[0]
    cosine = F.cosine_similarity(torch.from_numpy(got), model.encode_images(pixels))
    assert float(cosine.min()) > 0.9
    with pytest.raises(ValueError, match="画像の塔だけ"):
        runtimes.build(model, files, "text", "int8-static")


def test_fp16_keeps_float32_inputs_and_outputs(model, cache: Path) -> None:
    files = export.exported(model, cache)
    path = runtimes.build(model, files, "image", "fp16")
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [
        t for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights if len(t.dims) > 1)


def test_a_small_random_vit_exports_and_matches(tmp_path: Path) -> None:
    small = {
        "text_config": {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "max_position_embeddings": 77, "eos_token_id": 299},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        "projection_dim": 16,
    }  # fmt: skip
    model = load_random_vit_b16(torch.device("cpu"), torch.float32, config_overrides=small)
    files = export.exported(model, tmp_path)
    assert files.check.ok(), files.check
    fast = runtimes.use(model, runtimes.choose("onnx", "int8", "cpu"), tmp_path, log=None)
    photos = [open_image(p.path) for p in sample_photos()[:5]]
    cosine = F.cosine_similarity(fast.encode_images(photos), model.encode_images(photos))
    assert float(cosine.min()) > 0.95
    assert fast.encode_texts(TEXTS).shape == (4, 16)


# ---------------------------------------------------------------- choices and refusals


def test_valid_pairs_and_auto_on_a_cpu_and_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(runtimes, "native_bf16", lambda: (True, "CPU の命令 avx512_bf16"))
    assert runtimes.valid_pairs("cpu") == [
        ("torch", "fp32"),
        ("torch", "bf16"),
        ("onnx", "fp32"),
        ("onnx", "int8"),
    ]
    assert runtimes.choose("torch", "auto", "cpu") == runtimes.Choice("torch", "fp32", "cpu")
    assert runtimes.choose("onnx", "auto", "cpu").provider == "cpu"
    gpu = runtimes.choose("onnx", "auto", "cuda")
    assert (gpu.precision, gpu.provider) == ("fp16", "cuda")
    assert runtimes.choose("torch", "auto", "cuda").precision == "fp16"
    assert (
        runtimes.choose("onnx", "fp16", "cuda", tensorrt=True).label
        == "onnx fp16 (TensorrtExecutionProvider)"
    )
    for runtime, precision in (("torch", "fp16"), ("onnx", "bf16"), ("onnx", "fp16"), ("torch", "int8")):
        with pytest.raises(ort.RuntimeUnavailable) as err:
            runtimes.choose(runtime, precision, "cpu")
        message = str(err.value)
        assert (
            "\n" not in message
            and "使える組み合わせ: torch fp32, torch bf16, onnx fp32, onnx int8" in message
        )
    with pytest.raises(ort.RuntimeUnavailable, match="torch fp32, torch fp16, onnx fp16"):
        runtimes.choose("onnx", "int8", "cuda")


def test_bf16_is_refused_without_native_support(monkeypatch) -> None:
    monkeypatch.setattr(runtimes, "native_bf16", lambda: (False, "CPU に avx512_bf16/amx_bf16 なし"))
    with pytest.raises(ort.RuntimeUnavailable, match=r"\(bf16: CPU に avx512_bf16/amx_bf16 なし\)"):
        runtimes.choose("torch", "bf16", "cpu")
    found, how = runtimes.eager.native_bf16.__wrapped__()
    assert isinstance(found, bool) and how


def test_torch_bf16_runs_under_autocast(model, monkeypatch) -> None:
    monkeypatch.setattr(runtimes, "native_bf16", lambda: (True, "test"))
    fast = runtimes.use(model, runtimes.choose("torch", "bf16", "cpu"), log=None)
    assert isinstance(fast, runtimes.AutocastClip) and fast.fingerprint == model.fingerprint
    pixels = _pixels(model, 3)
    got = fast.encode_images(pixels)
    assert got.dtype == torch.float32
    assert float(F.cosine_similarity(got, model.encode_images(pixels)).min()) > 0.99
    assert not torch.equal(got, model.encode_images(pixels))  # it did not run in float32


def test_a_provider_that_does_not_come_first_is_refused(files, monkeypatch) -> None:
    import onnxruntime

    class Fallen:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]  # what ONNX Runtime does when CUDA does not load

    monkeypatch.setattr(
        onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(onnxruntime, "InferenceSession", Fallen)
    with pytest.raises(ort.RuntimeUnavailable) as err:
        ort.session(files.image, "cuda")
    assert "CUDAExecutionProvider を使えませんでした" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(ort.RuntimeUnavailable, match="TensorrtExecutionProvider がありません"):
        ort.session(files.image, "tensorrt")


def test_missing_onnxruntime_is_one_line_naming_the_package(model, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ort.RuntimeUnavailable) as err:
        runtimes.use(model, runtimes.choose("onnx", "fp32", "cpu"), log=None)
    assert "pip install onnxruntime" in str(err.value) and "\n" not in str(err.value)


def test_a_failed_export_is_one_line_and_never_a_fallback(model, tmp_path: Path, monkeypatch, capsys) -> None:
    def broken(*args, dynamo=True, **kwargs):
        raise RuntimeError(
            f"Could not convert aten::weird_op.default ({'dynamo' if dynamo else 'torchscript'})"
        )

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(export.ExportError) as err:
        export.exported(model, tmp_path)
    assert "aten::weird_op.default" in str(err.value) and "\n" not in str(err.value)
    assert "TorchScript 版で書き出します" in capsys.readouterr().out  # the fallback is stated
    assert not (tmp_path / "embedded" / "meta.json").exists()


def test_a_wrong_export_is_refused(model, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(export, "EXPORT_TOLERANCE", -1.0)
    with pytest.raises(export.ExportError, match="eager と合いません"):
        export.exported(model, tmp_path)


def test_static_calibration_in_windows_gives_the_ranges_of_one_pass(
    model, cache: Path, tmp_path: Path
) -> None:
    """Bounded memory must not cost calibration data: 12 batches in windows of 4 (CalibStridedMinMax)
    give the same quantised model as all 12 in one pass."""
    assert [quantize.stride_for(n) for n in (9, 7, 12, 2)] == [3, 1, 4, 2]
    files = export.exported(model, cache)
    pictures = [
        shapes.draw_shape(label, seed)
        for seed in range(3)
        for label in ("赤い丸", "青い三角", "緑の四角", "黄色い星")
    ]
    batches = [model.preprocess([p]).numpy() for p in pictures]
    windowed = quantize.int8_static(files.image, tmp_path / "windowed.onnx", batches, chunk=4)
    one_pass = quantize.int8_static(files.image, tmp_path / "one_pass.onnx", batches, chunk=len(batches))
    pixels = _pixels(model, 6).numpy()
    a = ort.session(windowed, "cpu").run(["features"], {"pixel_values": pixels})[0]
    b = ort.session(one_pass, "cpu").run(["features"], {"pixel_values": pixels})[0]
    assert np.array_equal(a, b)
    last_window_only = quantize.int8_static(files.image, tmp_path / "last.onnx", batches[-4:], chunk=4)
    c = ort.session(last_window_only, "cpu").run(["features"], {"pixel_values": pixels})[0]
    assert not np.array_equal(a, c)  # the earlier windows counted
