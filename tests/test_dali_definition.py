"""Every GPU (``mixed``/``gpu``) DALI pipeline of the course, *defined* on this CPU-only machine.

Defining a pipeline (calling the ``@pipeline_def`` function) runs DALI's definition-time checks
without a GPU: the operator arguments, the devices of the edges, and whether the executor allows a
GPU → CPU transition (``images.shape()`` of a ``mixed`` decoder's output needs the asynchronous,
pipelined executor). Nothing here builds or runs a pipeline, so nothing needs a driver.
``tests/gpu/test_gpu.py`` runs the same pipelines on a GPU (``make gpu-check``).

The pipelines: the lesson pipelines of notebooks 03 and 04 (saved from their ``#@save`` cells into
``helpers.dali``), ``build_pipeline`` for every kind of spec, the engine's ``_host_pipeline``,
``training_pipeline``, and ``env``'s one-image probe, each with every executor setting the course
uses: the default (asynchronous and pipelined), synchronous (``exec_async=False,
exec_pipelined=False``: notebook 03's executor comparison), and the dynamic executor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from helpers import env

if env.dali_version() is None:  # requirements.txt installs it: its absence is a broken set-up, not a skip
    pytest.fail("NVIDIA DALI does not import (re-create .venv: make venv)", pytrace=False)

from helpers import dali
from helpers.models import CLIP_MEAN, CLIP_STD, PreprocessSpec

EXECUTORS: dict[str, dict[str, Any]] = {
    "async-pipelined": {},
    "sync": {"exec_async": False, "exec_pipelined": False},
    "dynamic": {"exec_dynamic": True},
    "dynamic-sync": {"exec_dynamic": True, "exec_async": False, "exec_pipelined": False},
}
SPECS = {
    "shorter": PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD),
    "shorter-256-crop-224": PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD, resize_size=256),
    "longer-letterbox": PreprocessSpec(224, "longer", "bicubic", (0.5,) * 3, (0.5,) * 3, pad_value=0.0),
    "squash": PreprocessSpec(160, "squash", "bicubic", CLIP_MEAN, CLIP_STD),
}


@pytest.fixture
def as_if_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let helpers.dali define GPU pipelines here: a GPU is reported, device_id is None (definition only)."""
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(dali, "_device_id", lambda device: None)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("jpegs")
    paths = []
    for i in range(3):
        path = folder / f"c{i % 2}" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (40 + i, 30), (i * 60, 90, 30)).save(path)
        paths.append(path)
    return paths


def _defined(pipe: Any) -> None:
    """A defined pipeline: DALI's checks passed and it was not built (no GPU here)."""
    from nvidia.dali.pipeline import Pipeline

    assert isinstance(pipe, Pipeline)
    assert pipe.device_id is None  # defined with device_id=None: nothing of it can have run on a GPU


def test_03_synchronous_variant_definition(as_if_gpu: None, jpegs: list[Path]) -> None:
    """Notebook 03's executor comparison (G1): build_pipeline on the GPU with the synchronous executor.

    It computes each picture's resize in the graph; on the ``mixed`` decoder's output that was a
    GPU → CPU transition, which only the asynchronous pipelined executor allows.
    """
    pipe = dali.build_pipeline(
        jpegs, SPECS["shorter"], batch_size=2, device="gpu", exec_async=False, exec_pipelined=False
    )
    _defined(pipe)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("spec", SPECS)
def test_build_pipeline_definition(as_if_gpu: None, jpegs: list[Path], spec: str, executor: str) -> None:
    _defined(dali.build_pipeline(jpegs, SPECS[spec], batch_size=2, device="gpu", **EXECUTORS[executor]))


@pytest.mark.parametrize("knobs", [{}, {"hw_decoder_load": 0.0, "hybrid_huffman_threshold": 0}])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_build_pipeline_decoder_knobs_and_queue_depths_definition(
    as_if_gpu: None, jpegs: list[Path], depth: int, knobs: dict[str, Any]
) -> None:
    _defined(
        dali.build_pipeline(
            jpegs, SPECS["shorter"], batch_size=2, device="gpu", prefetch_queue_depth=depth, **knobs
        )
    )


@pytest.mark.parametrize("spec", SPECS)
def test_engine_host_pipeline_definition(as_if_gpu: None, jpegs: list[Path], spec: str) -> None:
    sizes = [Image.open(p).size for p in jpegs]
    pipe = dali._host_pipeline(
        jpegs,
        list(range(len(jpegs))),
        sizes,
        SPECS[spec],
        2,
        "gpu",
        2,
        dali.DecoderKnobs(hw_decoder_load=0.0),
    )
    _defined(pipe)


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("augment", [True, False])
def test_training_pipeline_definition(
    as_if_gpu: None, jpegs: list[Path], augment: bool, executor: str
) -> None:
    folder = jpegs[0].parent.parent
    _defined(dali.training_pipeline(folder, 2, "mixed", augment=augment, size=16, **EXECUTORS[executor]))


def test_env_probe_pipeline_definition() -> None:
    """env.dali_gpu_ok()'s one-image ``mixed`` decode."""
    _defined(env._dali_probe_pipeline(device_id=None))


# ---------------------------------------------------------------- the notebooks' own pipelines

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_definitions(notebook: str, names: set[str], **namespace: Any) -> dict[str, Any]:
    """The notebook's definitions of ``names``, executed from its cells: each code cell that defines one of
    them contributes its imports, its defs and classes, and its assignments that call nothing (constants
    such as ``MEAN = [m * 255 for m in CLIP_MEAN]``); nothing else of the cell runs. ``namespace``: the
    notebook's earlier names they use (``DECODER``, ``DEVICE_ID``...)."""
    import ast

    import nbformat

    scope: dict[str, Any] = dict(namespace)
    found: set[str] = set()
    for cell in nbformat.read(NOTEBOOKS / notebook, as_version=4).cells:
        if cell.cell_type != "code" or cell.source.lstrip().startswith(("%", "!")):
            continue
        tree = ast.parse(cell.source)
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        if not defined & names:
            continue

        def kept(node: ast.stmt) -> bool:
            if isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef | ast.ClassDef):
                return True
            return isinstance(node, ast.Assign) and not any(isinstance(n, ast.Call) for n in ast.walk(node))

        module = ast.Module(body=[n for n in tree.body if kept(n)], type_ignores=[])
        exec(compile(module, f"{notebook}", "exec"), scope)
        found |= defined & names
    assert found == names, f"{notebook} defines none of {sorted(names - found)}"
    return scope


def _gpu_scope(files: list[Path]) -> dict[str, Any]:
    """The names the notebooks' pipeline cells read, as a GPU run sets them (device_id None: defined only)."""
    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    files_ = [str(p) for p in files]
    return {
        "DECODER": "mixed",
        "DEVICE_ID": None,
        "photo_files": files_,
        "np": np,
        "fn": fn,
        "types": types,
    } | {"pipeline_def": pipeline_def}


@pytest.mark.parametrize("executor", EXECUTORS)
def test_03_lesson_pipelines_definition(jpegs: list[Path], executor: str) -> None:
    """03's inline inference pipeline, the DALI article's and exercise 2's flip pipeline, on the GPU."""
    scope = notebook_definitions(
        "03_dali_preprocessing.ipynb",
        {"inference_pipeline", "article_pipeline", "flip_pipeline"},
        **_gpu_scope(jpegs),
    )
    files = [str(p) for p in jpegs]
    options = {"batch_size": 2, "num_threads": 1, "device_id": None, **EXECUTORS[executor]}
    for name in ("inference_pipeline", "article_pipeline", "flip_pipeline"):
        _defined(scope[name](files, "mixed", **options))


def test_03_external_source_pipelines_definition(jpegs: list[Path]) -> None:
    """03's external_source pipelines (a batch callback; a parallel per-sample one) with the mixed decoder."""
    scope = notebook_definitions(
        "03_dali_preprocessing.ipynb",
        {"external_pipeline", "parallel_pipeline", "read_batch"},
        **_gpu_scope(jpegs),
    )
    _defined(scope["external_pipeline"]())
    _defined(scope["parallel_pipeline"](dali.FileSource(jpegs, batch_size=4)))


def _training_scope(jpegs: list[Path]) -> dict[str, Any]:
    from helpers.models import CLIP_MEAN, CLIP_STD

    return _gpu_scope(jpegs) | {"CLIP_MEAN": CLIP_MEAN, "CLIP_STD": CLIP_STD, "SIZE": 32}


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("training", [True, False])
def test_04_training_pipeline_definition(jpegs: list[Path], training: bool, executor: str) -> None:
    """04's inline training pipeline (image_random_crop with the padding hints) and its validation form."""
    scope = notebook_definitions("04_dali_training.ipynb", {"training_pipeline"}, **_training_scope(jpegs))
    options = {"batch_size": 2, "num_threads": 1, "device_id": None, **EXECUTORS[executor]}
    _defined(scope["training_pipeline"](str(jpegs[0].parent.parent), "mixed", training, **options))
