"""Batch inference over a list of image files: one :class:`Record` per file, in input order.

The local engine reads and preprocesses images in one of two backends and runs the model in the
main process::

    for records in iter_embeddings(model, paths, backend="auto"):
        for r in records:          # r.index, r.path, r.status ("ok"/"error"), r.embedding, r.error
            ...

- ``"dataloader"``: a ``torch.utils.data.DataLoader`` over :class:`ImageFileDataset`; each worker
  process opens (:func:`helpers.data.open_image`) and preprocesses one image at a time, and
  :func:`collate` stacks the good ones and keeps the errors, so a bad file never takes its batch
  down.
- ``"dali"``: ``helpers.dali.iter_preprocessed`` decodes and preprocesses on the GPU (imported
  lazily: DALI exists on Colab and GPU machines only).
- ``"auto"``: DALI when a DALI GPU pipeline can run here, else the DataLoader
  (:func:`resolve_backend`).

The model runs under ``torch.inference_mode()``; with ``amp`` it runs under float16 autocast on
CUDA (:func:`autocast_dtype`: float16 is what a T4's tensor cores run, and it is as fast as
bfloat16 on newer GPUs) and in float32 on the CPU (bfloat16 autocast on a CPU is slower than
float32 without AMX units, and less exact). Embeddings come back L2-normalised, float32, on the CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from helpers import env, zeroshot
from helpers.data import ImageReadError, open_image
from helpers.env import usable_cpus  # re-exported: bench and the notebooks ask engines for it
from helpers.models import ClipModel, PreprocessSpec, normalize, preprocess_with_spec, resize_with_spec
from helpers.zeroshot import Scoring

if TYPE_CHECKING:
    from PIL import Image

    from helpers.dali import Fallbacks

__all__ = [
    "BACKENDS",
    "ImageFileDataset",
    "Prediction",
    "Record",
    "SizedDecode",
    "autocast_dtype",
    "backend_notice",
    "classify",
    "collate",
    "dali_engine_available",
    "default_num_workers",
    "encode_batch",
    "iter_embeddings",
    "make_loader",
    "resolve_backend",
    "usable_cpus",
    "worker_preprocess",
]

BACKENDS: tuple[str, ...] = ("auto", "dataloader", "dali")
"""The ways of reading images :func:`iter_embeddings` understands."""

Preprocess = PreprocessSpec | Callable[[list["Image.Image"]], torch.Tensor]
"""A model's preprocessing: its :class:`PreprocessSpec`, or a callable list of PIL images → [B, 3, H, W]."""

Batch = tuple[list[int], torch.Tensor, dict[int, str]]
"""(indices of the good images, their pixels [b, 3, H, W], {index: error reason} of the bad ones)."""


@dataclass
class Record:
    """The result for one input file."""

    index: int
    """Position of the file in the input list."""
    path: Path
    status: Literal["ok", "error"]
    embedding: torch.Tensor | None = None
    """L2-normalised float32 [D] on the CPU (``status == "ok"`` only)."""
    error: str = ""
    """Why the file could not be used (the :class:`~helpers.data.ImageReadError` reason), else ``""``."""


# ---------------------------------------------------------------- reading and preprocessing


@dataclass(frozen=True)
class SizedDecode:
    """The fast worker step: decode at the size the model needs, apply its geometry, hand over uint8.

    JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale as long as the picture stays
    :data:`~helpers.models.base.DECODE_MARGIN` times larger than the model's input
    (:meth:`PreprocessSpec.decode_floor`); then the spec's resize, crop or letterbox; the result is
    uint8 ``[3, size, size]`` (a quarter of float32's bytes). :func:`encode_batch` converts and
    normalises on the model's device.
    """

    spec: PreprocessSpec

    def __call__(self, path: Path) -> torch.Tensor:
        image = open_image(path, at_least=self.spec.decode_floor())
        return resize_with_spec(image, self.spec)[0]


def worker_preprocess(model: ClipModel, exact_decode: bool = False) -> Preprocess | SizedDecode:
    """What the workers run to read a file into the model's input.

    By default :class:`SizedDecode` (reduced-size JPEG decoding, the model's :class:`PreprocessSpec`,
    uint8 out). With ``exact_decode`` the path that reproduces ``model.preprocess`` exactly: the
    model's :class:`PreprocessSpec` (light to send to a worker) when the model's own preprocessing
    *is* :func:`~helpers.models.preprocess_with_spec` (``random:vit-b16``); otherwise the model's
    own ``preprocess`` (an HF image processor, rinna's transform), since the spec reproduces those
    only to within rounding for some models. With the ``fork`` start method (Linux, Colab) workers
    share the model's memory; with ``spawn`` the model is pickled to each.
    """
    if not exact_decode:
        return SizedDecode(model.preprocess_spec)
    own = type(model)._preprocess
    if own is ClipModel._preprocess or getattr(model, "processor", "own") is None:
        return model.preprocess_spec
    return model.preprocess


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files → ``(index, pixels [3, H, W] or None, error reason)``, one file per item.

    ``preprocess`` is a :class:`SizedDecode` (uint8 pixels from a reduced-size decode), a
    :class:`PreprocessSpec` (run with :func:`preprocess_with_spec`) or a callable that turns a list
    of PIL images into a [B, 3, H, W] tensor (a model's ``preprocess``). Unreadable files are not
    raised: their item carries ``None`` and the reason.
    """

    def __init__(self, paths: Sequence[str | Path], preprocess: Preprocess | SizedDecode) -> None:
        self.paths = [Path(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.paths[index]
        with warnings.catch_warnings():  # a worker's warnings would land on the notebook's stderr
            warnings.simplefilter("ignore")
            if isinstance(self.preprocess, SizedDecode):
                try:
                    return index, self.preprocess(path), ""
                except ImageReadError as err:
                    return index, None, err.reason
                except Exception as err:  # a valid image the preprocessing cannot handle
                    return index, None, f"前処理に失敗しました ({type(err).__name__}: {err})"
            try:
                image = open_image(path)
            except ImageReadError as err:
                return index, None, err.reason
            try:
                if isinstance(self.preprocess, PreprocessSpec):
                    pixels = preprocess_with_spec(image, self.preprocess)
                else:
                    pixels = self.preprocess([image])
            except Exception as err:  # a valid image the preprocessing cannot handle
                return index, None, f"前処理に失敗しました ({type(err).__name__}: {err})"
        return index, pixels[0], ""


def collate(samples: Iterable[tuple[int, torch.Tensor | None, str]]) -> Batch:
    """Stack the good samples, keep the bad ones' reasons: ``(indices, pixels, errors)``.

    ``pixels`` is empty (shape [0]) when every sample in the batch failed.
    """
    indices: list[int] = []
    tensors: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    for index, pixels, error in samples:
        if pixels is None:
            errors[index] = error or "読めませんでした (unknown error)"
        else:
            indices.append(index)
            tensors.append(pixels)
    return indices, (torch.stack(tensors) if tensors else torch.empty(0)), errors


def default_num_workers() -> int:
    """DataLoader workers: ``min(cores, 8)``, or at most 2 in quick mode (CI, no GPU).

    ``cores`` counts the cores this process may use (``taskset`` pins count), not the machine's.
    """
    cpus = usable_cpus()
    return min(cpus, 2) if env.quick_mode() else min(cpus, 8)


def make_loader(
    paths: Sequence[str | Path],
    preprocess: Preprocess | SizedDecode,
    batch_size: int = 64,
    num_workers: int | None = None,
    pin_memory: bool | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ImageFileDataset` yielding :data:`Batch` tuples in input order.

    ``pin_memory`` defaults to True on CUDA (page-locked host memory: faster, asynchronous copies);
    workers stay alive between passes (``persistent_workers``) when there are any.
    """
    workers = default_num_workers() if num_workers is None else num_workers
    if workers < 0:
        raise ValueError("num_workers must be 0 or more")
    return torch.utils.data.DataLoader(
        ImageFileDataset(paths, preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=env.cuda_available() if pin_memory is None else pin_memory,
        persistent_workers=workers > 0,
    )


# ---------------------------------------------------------------- backends


def dali_engine_available() -> bool:
    """True when ``helpers.dali`` imports and provides ``iter_preprocessed``."""
    try:
        from helpers import dali
    except Exception:
        return False
    return callable(getattr(dali, "iter_preprocessed", None))


def resolve_backend(backend: str = "auto") -> str:
    """``"dali"`` or ``"dataloader"``: what ``backend`` means here (``"auto"``: DALI when a DALI
    GPU pipeline can run and ``helpers.dali`` provides it, else the DataLoader)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    return "dali" if env.dali_gpu_ok() and dali_engine_available() else "dataloader"


def backend_notice(backend: str = "auto") -> str:
    """One line for callers to print: which backend runs, and why when ``"auto"`` chose it."""
    chosen = resolve_backend(backend)
    if backend != "auto":
        return f"バックエンド: {chosen}"
    if chosen == "dali":
        why = "DALI の GPU パイプラインが使えるため"
    else:
        why = env.dali_problem() or "GPU がないので DALI の GPU パイプラインは使えないため"
    return f"バックエンド: {chosen} (auto: {why})"


def _dali_batches(
    model: ClipModel, paths: list[Path], batch_size: int, num_threads: int, fallbacks: Fallbacks | None
) -> Iterator[Batch]:
    """Batches from ``helpers.dali.iter_preprocessed`` (GPU decoding when the model is on CUDA);
    ``fallbacks`` counts the files it decoded with PIL instead, and why."""
    try:
        from helpers import dali
    except ImportError as err:
        raise RuntimeError(
            f"DALI バックエンドを使えません: helpers.dali を import できません ({err})。"
            " --backend dataloader を使ってください。"
        ) from err
    iter_preprocessed = getattr(dali, "iter_preprocessed", None)
    if not callable(iter_preprocessed):
        raise RuntimeError(
            "DALI バックエンドを使えません: helpers.dali に iter_preprocessed がありません。"
            " --backend dataloader を使ってください。"
        )
    device = "gpu" if model.device.type == "cuda" else "cpu"
    yield from iter_preprocessed(
        paths,
        model.preprocess_spec,
        batch_size=batch_size,
        device=device,
        num_threads=num_threads,
        fallbacks=fallbacks,
    )


def _loader_batches(
    model: ClipModel, paths: list[Path], batch_size: int, num_workers: int | None, exact_decode: bool
) -> Iterator[Batch]:
    loader = make_loader(paths, worker_preprocess(model, exact_decode), batch_size, num_workers)
    yield from loader


# ---------------------------------------------------------------- the model step


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype the engine uses on ``device``: float16 on CUDA, None (float32) on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else None


def encode_batch(model: ClipModel, pixels: torch.Tensor, amp: bool = True) -> torch.Tensor:
    """L2-normalised float32 image embeddings [B, D] on the CPU for a preprocessed batch.

    ``pixels`` are normalised float32 or uint8 at the model's input size (:class:`SizedDecode`),
    converted and normalised here, on the model's device after the (pinned, non-blocking) copy.
    Runs under ``torch.inference_mode()`` and, with ``amp``, under :func:`autocast_dtype` autocast.
    """
    dtype = autocast_dtype(model.device) if amp else None
    autocast = (
        torch.autocast(device_type=model.device.type, dtype=dtype) if dtype is not None else nullcontext()
    )
    with torch.inference_mode(), autocast:
        pixels = pixels.to(model.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = normalize(pixels, model.preprocess_spec)
        features = model.encode_images(pixels)
    return F.normalize(features.float(), dim=-1).cpu()


@dataclass
class _Reorder:
    """Releases records in input order, checking each index arrives exactly once."""

    paths: list[Path]
    next_index: int = 0
    pending: dict[int, Record] = field(default_factory=dict)

    def add(self, record: Record) -> None:
        if not 0 <= record.index < len(self.paths):
            raise RuntimeError(f"backend returned index {record.index} outside 0..{len(self.paths) - 1}")
        if record.index < self.next_index or record.index in self.pending:
            raise RuntimeError(f"backend returned index {record.index} twice")
        self.pending[record.index] = record

    def ready(self) -> list[Record]:
        out = []
        while self.next_index in self.pending:
            out.append(self.pending.pop(self.next_index))
            self.next_index += 1
        return out

    def finish(self) -> None:
        if self.next_index != len(self.paths):
            missing = len(self.paths) - self.next_index
            raise RuntimeError(f"backend never returned {missing} file(s), from index {self.next_index}")


def iter_embeddings(
    model: ClipModel,
    paths: Sequence[str | Path],
    backend: Literal["auto", "dataloader", "dali"] = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    amp: bool = True,
    progress: bool = True,
    fallbacks: Fallbacks | None = None,
    exact_decode: bool = False,
) -> Iterator[list[Record]]:
    """Embed every file of ``paths``: yields lists of :class:`Record`, batch by batch, in input order.

    Every index appears exactly once; an unreadable file gives an ``"error"`` record with its
    reason and never stops the run. ``num_workers`` (DataLoader workers or DALI threads) defaults
    to :func:`default_num_workers`; 0 reads in the main process. The DataLoader decodes JPEGs at the
    size the model needs and sends uint8 (:class:`SizedDecode`) unless ``exact_decode`` asks for the
    model's own preprocessing of the full picture. With the DALI backend, ``fallbacks``
    (a :class:`helpers.dali.Fallbacks`) counts the files decoded with PIL instead, and why.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    files = [Path(p) for p in paths]
    chosen = resolve_backend(backend)
    if chosen == "dali":
        threads = max(1, default_num_workers() if num_workers is None else num_workers)
        source = _dali_batches(model, files, batch_size, threads, fallbacks)
    else:
        source = _loader_batches(model, files, batch_size, num_workers, exact_decode)
    from tqdm.auto import tqdm

    order = _Reorder(files)
    with tqdm(total=len(files), unit="枚", desc="埋め込み", disable=not progress or not files) as bar:
        for indices, pixels, errors in source:
            if indices:
                embeddings = encode_batch(model, pixels, amp)
                for index, embedding in zip(indices, embeddings.unbind(0), strict=True):
                    order.add(Record(int(index), files[int(index)], "ok", embedding))
            for index, reason in errors.items():
                order.add(Record(int(index), files[int(index)], "error", None, str(reason)))
            records = order.ready()
            if records:
                bar.update(len(records))
                yield records
    order.finish()


# ---------------------------------------------------------------- zero-shot classification


@dataclass
class Prediction:
    """Zero-shot answer for one file: the top labels with probabilities, and the best raw cosine."""

    index: int
    path: Path
    status: Literal["ok", "error"]
    top: list[tuple[str, float]] = field(default_factory=list)
    """(label, probability), most probable first (``top_k`` of them); per-label sigmoid probabilities
    for SigLIP models need not sum to 1."""
    best_cosine: float | None = None
    """The largest cosine similarity (before the scale and softmax): compare with a threshold."""
    error: str = ""


def classify(
    records: Iterable[Record],
    text_features: torch.Tensor,
    scoring: Scoring,
    labels: Sequence[str],
    top_k: int = 1,
) -> list[Prediction]:
    """Zero-shot predictions for ``records`` by the model's ``scoring`` (:mod:`helpers.zeroshot`).

    ``text_features`` [T, D] (e.g. ``model.label_features(labels)``) line up with ``labels``; error
    records give error predictions with the same reason.
    """
    if text_features.shape[0] != len(labels):
        raise ValueError(f"{text_features.shape[0]} text features for {len(labels)} labels")
    records = list(records)
    good = [r for r in records if r.status == "ok" and r.embedding is not None]
    answers: dict[int, Prediction] = {}
    if good:
        embeddings = torch.stack([r.embedding for r in good])
        cosine = zeroshot.cosine(embeddings, text_features)
        probs = zeroshot.probabilities(embeddings, text_features, scoring)
        k = max(1, min(top_k, len(labels)))
        values, indices = probs.topk(k, dim=-1)
        for row, record in enumerate(good):
            top = [
                (labels[i], float(p))
                for p, i in zip(values[row].tolist(), indices[row].tolist(), strict=True)
            ]
            answers[record.index] = Prediction(record.index, record.path, "ok", top, float(cosine[row].max()))
    return [
        answers.get(r.index) or Prediction(r.index, r.path, "error", error=r.error or "読めませんでした")
        for r in records
    ]
