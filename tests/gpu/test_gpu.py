"""The CUDA branches of ``helpers``, checked on a GPU: run by ``make gpu-check`` on a lent GPU machine.

Every test carries the ``gpu`` marker (``make test`` deselects it) and skips with one line naming
what it did not check when there is no CUDA GPU, or when the DALI, timm or Ray it needs is not
installed; a DALI that is installed but does not import fails (a broken DALI is reported as broken).
What a test measures goes to ``$GPU_CHECK_RESULTS`` (JSON lines) for the report of ``make gpu-check``.

``GPU_TESTS_ON_CPU=1`` runs the same code on the CPU (DALI's CPU decoder, float32 instead of fp16):
a rehearsal of the tests themselves, not a check of anything on a GPU.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

from helpers import REPO_ROOT, env

pytestmark = pytest.mark.gpu

ON_CPU = os.environ.get("GPU_TESTS_ON_CPU") == "1"
FP16_MIN_COSINE = 0.999
"""The least cosine between an image's fp16-autocast and float32 embeddings (L2-normalised, 512-d):
fp16 keeps ~3 significant digits per matmul, and twelve layers add up to ~1e-4 in 1 − cos."""
CUDA_MIN_COSINE = 0.9999
"""... between the EVA02 tower's float32 features on CUDA and on the CPU (TF32 convolutions on CUDA)."""
EVA02_FP16_MIN_COSINE = 0.995
"""... between its fp16-autocast features on CUDA and its float32 features on the CPU."""
DECODER_MIN_COSINE = 0.999
"""... between an image's embeddings from DALI's and from PIL's full-size decoding (pixels a few levels
apart at edges: ``tests/test_dali.py``)."""
EMBEDDING_TOLERANCE = 1e-3
"""The largest |Δ| between two engines' L2-normalised embeddings of the same pixels on the same device."""
EVA02 = "eva02_base_patch16_clip_224"


def _needs(what: str, *extras: str) -> str:
    """The device to check ``what`` on (``"cuda"``; ``"cpu"`` with ``GPU_TESTS_ON_CPU=1``), or skip
    with one line: no CUDA GPU, or an ``extras`` package (``dali``, ``timm``, ``ray``) not installed."""
    if not ON_CPU and not env.cuda_available():
        pytest.skip(f"no CUDA GPU: {what} not checked (make gpu-check runs it on a GPU machine)")
    for extra in extras:
        module = "nvidia.dali" if extra == "dali" else extra
        if not _installed(module):
            pytest.skip(f"{extra} is not installed: {what} not checked")
        if extra == "dali" and env.dali_version() is None:  # installed but broken: a failure, not a skip
            pytest.fail(f"DALI is installed but does not import: {env.dali_problem()}", pytrace=False)
    return "cpu" if ON_CPU else "cuda"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing
        return False


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(name=value, ...)``: one line of numbers for the report (and the test's output)."""
    path = os.environ.get("GPU_CHECK_RESULTS")

    def write(**numbers: object) -> None:
        line = json.dumps({"test": request.node.name, **numbers}, ensure_ascii=False, default=str)
        print(line)
        if path:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return write


def _test_module(name: str) -> ModuleType:
    """``tests/<name>.py`` (the one place of its tolerances), imported once by path."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tests" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=-1)


def test_dali_gpu_ok_decodes_one_image_with_the_mixed_decoder() -> None:
    """env.dali_gpu_ok() on a GPU: its one-image mixed decode works (the notebooks then choose "mixed")."""
    if ON_CPU:
        pytest.skip("GPU_TESTS_ON_CPU: the mixed decoder needs a GPU")
    _needs("env.dali_gpu_ok()'s trial decode", "dali")
    env.dali_gpu_problem.cache_clear()
    assert env.dali_gpu_problem() is None and env.dali_gpu_ok()


def test_dali_mixed_decoding_matches_pil(record: Callable[..., None], tmp_path: Path) -> None:
    """``iter_preprocessed(..., device="gpu")`` (nvJPEG, the GPU resize) against PIL, within the
    tolerance of ``tests/test_dali.py``: every spec there with the default decoder settings, and one
    spec with the hardware decoder off (a T4 has none), on it for every file, and the hybrid Huffman decoder
    for every file (hybrid_huffman_threshold=0; DALI: it still largely uses the CPU)."""
    device = _needs("DALI mixed decoding against PIL", "dali")
    from helpers import dali
    from helpers.data import make_workload, open_image, sample_photos
    from helpers.models import preprocess_with_spec

    td = _test_module("test_dali")
    files = [p.path for p in sample_photos()] + make_workload(6, out_dir=tmp_path, progress=False)
    runs = [(name, spec, "default", None) for name, spec in td.SPECS.items()]
    first = next(iter(td.SPECS))
    runs += [
        (first, td.SPECS[first], "hw_decoder_load=0", dali.DecoderKnobs(hw_decoder_load=0.0)),
        (first, td.SPECS[first], "hw_decoder_load=1", dali.DecoderKnobs(hw_decoder_load=1.0)),
        (first, td.SPECS[first], "hybrid_huffman_threshold=0", dali.DecoderKnobs(hybrid_huffman_threshold=0)),
    ]
    problems, references = [], {}
    for name, spec, knobs_name, knobs in runs:
        if name not in references:
            references[name] = preprocess_with_spec([open_image(p) for p in files], spec)
        fallbacks = dali.Fallbacks()
        batches = list(
            dali.iter_preprocessed(
                files,
                spec,
                len(files),
                "gpu" if device == "cuda" else "cpu",
                fallbacks=fallbacks,
                knobs=knobs,
            )
        )
        (indices, pixels, errors), *rest = batches
        assert not rest and not errors and indices == list(range(len(files)))
        assert pixels.device.type == device
        levels = td._levels(pixels.cpu() - references[name], spec)
        mean, top, far = float(levels.mean()), float(levels.max()), float((levels > 2).float().mean())
        record(
            spec=name,
            knobs=knobs_name,
            mean_levels=mean,
            max_levels=top,
            share_above_2=far,
            dali_files=fallbacks.dali,
            pil_files=fallbacks.pil,
        )
        if fallbacks.dali != len(files):
            problems.append(
                f"{name} / {knobs_name}: only {fallbacks.dali} of {len(files)} files went to DALI"
            )
        if not (mean < td.MEAN_TOL and top < td.MAX_TOL and far < td.FAR_TOL):
            problems.append(
                f"{name} / {knobs_name}: mean {mean:.3f} (< {td.MEAN_TOL}), max {top:.1f} (< {td.MAX_TOL}),"
                f" share > 2 levels {far:.4f} (< {td.FAR_TOL})"
            )
    assert not problems, "\n".join(problems)


def test_dali_mixed_training_epochs_read_every_file_once(record: Callable[..., None], tmp_path: Path) -> None:
    """``helpers.dali.training_pipeline(..., decoder="mixed")``, shuffled, through the iterator of
    notebook 04: 3 epochs, each reads every file exactly once, in its own order, with the batches on
    the GPU (``tests/test_dali_epoch.py`` checks the same for the CPU decoder, on its tiny files)."""
    device = _needs("epoch exactness of the mixed training pipeline", "dali")
    from collections import Counter

    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from helpers import dali

    te = _test_module("test_dali_epoch")
    n, decoder = te.N_FILES, "mixed" if device == "cuda" else "cpu"
    pipe = dali.training_pipeline(te._tiny_jpegs(tmp_path, n), te.BATCH, decoder, size=8, labels=range(n))
    loader = DALIGenericIterator(
        pipe,
        dali.TRAIN_OUTPUTS,
        reader_name=dali.READER_NAME,
        last_batch_policy=LastBatchPolicy.PARTIAL,
        auto_reset=True,
    )
    epochs, devices = [], set()
    for _ in range(te.EPOCHS):
        labels = []
        for batch in loader:
            devices |= {batch[0]["images"].device.type, batch[0]["labels"].device.type}
            labels += batch[0]["labels"].view(-1).tolist()
        epochs.append(labels)
    counts = [Counter(labels) for labels in epochs]
    missed = [n - len(c) for c in counts]
    twice = [sum(1 for k in c.values() if k > 1) for c in counts]
    record(decoder=decoder, files=n, batch=te.BATCH, missed=missed, read_twice=twice, devices=sorted(devices))
    assert devices == {device}, f"batches on {devices}, expected {device}"
    for number, labels in enumerate(epochs, start=1):
        assert sorted(labels) == list(range(n)), f"epoch {number}: missed {missed[number - 1]}"
    assert epochs[0] != sorted(epochs[0]), "the training pipeline does not shuffle"
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1], "every epoch should have its own order"


def test_fp16_autocast_matches_float32(record: Callable[..., None]) -> None:
    """The engines' model step (``encode_batch``) with fp16 autocast against float32, on a ViT-B/16
    CLIP of the real size with random weights: embeddings and label probabilities."""
    device = _needs("fp16 autocast against float32")
    from helpers import bench, engines
    from helpers.data import open_image, sample_photos
    from helpers.models import load_clip

    model = load_clip("random:vit-b16", device=device)
    photos = sample_photos()
    pixels = model.preprocess([open_image(p.path) for p in photos])
    labels = model.label_features([bench.TEMPLATE.format(p.label_ja) for p in photos])
    half = engines.encode_batch(model, pixels, amp=True)
    full = engines.encode_batch(model, pixels, amp=False)
    cosine = float(_cosines(half, full).min())
    prob_gap = float((model.probabilities(half, labels) - model.probabilities(full, labels)).abs().max())
    autocast = engines.autocast_dtype(model.device)
    record(
        autocast=str(autocast),
        min_cosine=cosine,
        max_embedding_diff=float((half - full).abs().max()),
        max_prob_diff=prob_gap,
        logit_scale=model.logit_scale,
    )
    assert autocast == (torch.float16 if device == "cuda" else None)
    assert torch.isfinite(half).all()
    assert cosine >= FP16_MIN_COSINE
    assert prob_gap <= bench.AMP_TOLERANCE


def test_eva02_tower_on_cuda_matches_cpu(record: Callable[..., None]) -> None:
    """LINE's image tower (timm's EVA02-B/16, random weights) after the project's buffer repair: the
    repair restores every computed buffer exactly, and CUDA gives the CPU's features."""
    device = _needs("the EVA02 image tower on CUDA against the CPU", "timm")
    import timm

    from helpers.data import open_image, sample_photos
    from helpers.models import CLIP_MEAN, CLIP_STD, PreprocessSpec, preprocess_with_spec
    from helpers.models.compat import non_persistent_buffer_names, reinit_non_persistent_buffers

    torch.manual_seed(0)
    tower = timm.create_model(EVA02, pretrained=False).eval()
    names = non_persistent_buffer_names(tower)
    computed = {name: tower.get_buffer(name).clone() for name in names}
    for name in names:  # what transformers 5.x's meta-device loading leaves in them: garbage
        tower.get_buffer(name).fill_(float("nan"))
    refilled = reinit_non_persistent_buffers(tower)
    gaps = {n: float(torch.nan_to_num(tower.get_buffer(n) - computed[n], nan=1.0).abs().max()) for n in names}
    wrong = [n for n, gap in gaps.items() if gap > 1e-6]
    spec = PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD)
    pixels = preprocess_with_spec([open_image(p.path) for p in sample_photos()[:4]], spec)
    with torch.inference_mode():
        on_cpu = tower(pixels)
    tower.to(device)
    amp = torch.autocast("cuda", dtype=torch.float16) if device == "cuda" else contextlib.nullcontext()
    with torch.inference_mode():
        on_device = tower(pixels.to(device)).float().cpu()
        with amp:
            autocast = tower(pixels.to(device)).float().cpu()
    cosine, cosine_amp = float(_cosines(on_device, on_cpu).min()), float(_cosines(autocast, on_cpu).min())
    record(
        timm=timm.__version__,
        buffers=len(names),
        refilled=len(refilled),
        wrong_buffers=wrong,
        max_buffer_diff=max(gaps.values(), default=0.0),
        min_cosine_fp32=cosine,
        min_cosine_fp16=cosine_amp,
    )
    assert names and not wrong, f"the repair left these buffers unlike timm's own: {wrong}"
    assert torch.isfinite(on_device).all() and torch.isfinite(autocast).all()
    assert cosine >= CUDA_MIN_COSINE
    assert cosine_amp >= EVA02_FP16_MIN_COSINE


def test_check_with_the_embedded_model_on_cuda(record: Callable[..., None]) -> None:
    """``check()`` passes with the embedded model moved to CUDA, whose features match the CPU's."""
    device = _needs("check() on CUDA")
    from helpers.fixtures import shapes
    from helpers.models import SHAPE_LABELS, check, load_clip

    model = load_clip("embedded", device="cpu")
    pictures = [shapes.draw_shape(label, 1) for label in SHAPE_LABELS]
    on_cpu = model.encode_images(pictures)
    model.to(device)
    assert model.device.type == device and next(model.module.parameters()).device.type == device
    message = check(model)
    cosine = float(_cosines(model.encode_images(pictures), on_cpu).min())
    record(message=message, min_cosine_cpu=cosine)
    assert "OK" in message
    assert cosine >= CUDA_MIN_COSINE


def test_classify_with_the_dali_backend(
    record: Callable[..., None], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``classify --backend dali`` on sample_images: every photo decoded by DALI on the GPU; against the
    DataLoader backend with the same full-size decoding, probabilities within ``tests/test_classify.py``'s
    DALI tolerance and embeddings as close as :data:`DECODER_MIN_COSINE`."""
    _needs("classify --backend dali", "dali")
    from helpers import classify
    from helpers.embeddings import read_embeddings

    tc = _test_module("test_classify")
    common = [str(REPO_ROOT / "sample_images"), "--labels", tc.LABELS, "--model", "embedded", "--top-k", "4"]
    common += ["--batch-size", "4", "--no-progress"]
    summaries, rows, vectors = {}, {}, {}
    for backend, extra in (("dali", []), ("dataloader", ["--exact-decode"])):
        out, parquet = tmp_path / f"{backend}.csv", tmp_path / f"{backend}.parquet"
        argv = [*common, *extra, "--backend", backend, "--out", str(out), "--embeddings", str(parquet)]
        assert classify.main(argv) == 0, backend
        summaries[backend] = capsys.readouterr().out.strip().splitlines()[-1]
        rows[backend], vectors[backend] = tc._rows(out), read_embeddings(parquet).vectors
    gaps = [
        abs(float(a[k]) - float(b[k]))
        for a, b in zip(rows["dali"], rows["dataloader"], strict=True)
        for k in a
        if k.startswith("prob_") and a[k] and b[k]
    ]
    cosine = float(_cosines(vectors["dali"], vectors["dataloader"]).min())
    record(
        summary_dali=summaries["dali"],
        summary_dataloader=summaries["dataloader"],
        max_prob_gap=max(gaps),
        min_embedding_cosine=cosine,
    )
    assert summaries["dali"].endswith(", 0 to PIL by header, 0 to PIL after DALI errors")
    assert [r["path"] for r in rows["dali"]] == [r["path"] for r in rows["dataloader"]]
    assert all(r["status"] == "ok" for r in rows["dali"])
    assert max(gaps) <= tc.DALI_PROB_TOLERANCE
    assert cosine >= DECODER_MIN_COSINE


@pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own defaults
def test_ray_gpu_actor(record: Callable[..., None]) -> None:
    """The Ray engine's actor takes the GPU and embeds as the local engine does (CPU tasks decode;
    with DALI installed, also DALI inside the actor)."""
    device = _needs("the Ray GPU actor", "ray")
    from helpers import engines, engines_ray
    from helpers.data import sample_photos
    from helpers.models import load_clip

    model = load_clip("embedded", device=device)
    paths = [p.path for p in sample_photos()]
    backends = ["dataloader", *(["dali"] if env.dali_version() is not None else [])]
    with engines_ray.session(num_cpus=min(4, engines.usable_cpus())):
        for backend in backends:
            local = [
                r for b in engines.iter_embeddings(model, paths, backend, 4, 2, progress=False) for r in b
            ]
            stats = engines_ray.RunStats()
            remote = [
                r
                for batch in engines_ray.iter_embeddings(
                    model, paths, backend, 4, progress=False, stats=stats
                )
                for r in batch
            ]
            assert [r.status for r in remote] == ["ok"] * len(paths)
            gap = max(
                float((a.embedding - b.embedding).abs().max()) for a, b in zip(local, remote, strict=True)
            )
            assert stats.plan is not None
            record(
                backend=backend,
                actor_gpus=stats.plan.actor_gpus,
                actors=len(stats.pids),
                rows=stats.rows,
                seconds=stats.seconds,
                max_embedding_diff=gap,
            )
            assert stats.plan.actor_gpus == (1.0 if device == "cuda" else 0.0)
            assert gap <= EMBEDDING_TOLERANCE, backend


def test_onnx_runtime_cuda_fp16_matches_eager(record: Callable[..., None], tmp_path: Path) -> None:
    """``--runtime onnx --precision fp16``: both towers of a ViT-B/16 CLIP of the real size (random
    weights) exported, converted to fp16 and run by ONNX Runtime's CUDA provider, which must come
    first in the session (``runtimes.session`` refuses otherwise), against eager float32."""
    device = _needs("ONNX Runtime's CUDA provider in fp16", "onnxruntime")
    import onnxruntime

    from helpers import runtimes
    from helpers.data import open_image, sample_photos
    from helpers.models import load_clip

    if device == "cuda" and "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu): not checked")
    model = load_clip("random:vit-b16", device="cpu")
    choice = runtimes.choose("onnx", "fp16" if device == "cuda" else "fp32", device)
    fast = runtimes.use(model, choice, tmp_path, log=None)
    photos = [open_image(p.path) for p in sample_photos()]
    cosine = float(_cosines(fast.encode_images(photos), model.encode_images(photos)).min())
    texts = [p.label_ja for p in sample_photos()]
    text_cosine = float(_cosines(fast.encode_texts(texts), model.encode_texts(texts)).min())
    record(runtime=choice.label, providers=fast.image_session.get_providers(), min_cosine=cosine,
           text_min_cosine=text_cosine)  # fmt: skip
    assert fast.image_session.get_providers()[0] == runtimes.ort.PROVIDERS[choice.provider]
    assert cosine >= FP16_MIN_COSINE and text_cosine >= FP16_MIN_COSINE
