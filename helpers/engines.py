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

from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from helpers import env, zeroshot
from helpers.env import usable_cpus  # re-exported: bench and the notebooks ask engines for it
from helpers.models import ClipModel, PreprocessSpec, normalize
from helpers.reading import Preprocess, SizedDecode, read_pixels, worker_preprocess  # re-exported
from helpers.zeroshot import Scoring

if TYPE_CHECKING:
    from helpers.dali import DecoderKnobs, Fallbacks

__all__ = [
    "BACKENDS",
    "ImageFileDataset",
    "InputOrder",
    "Prediction",
    "Record",
    "SizedDecode",
    "Staging",
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


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files → ``(index, pixels [3, H, W] or None, error reason)``, one file per item.

    The engine's version of notebook 02's ``PhotoDataset`` (variant d, section 4). Each item is
    :func:`helpers.reading.read_pixels` (the read path of every engine) with
    ``preprocess``: a :class:`SizedDecode` (uint8 from a reduced-size decode), a
    :class:`~helpers.models.PreprocessSpec` or a model's ``preprocess``. Unreadable files are not
    raised: their item carries ``None`` and the reason.
    """

    def __init__(self, paths: Sequence[str | Path], preprocess: Preprocess) -> None:
        self.paths = [Path(p) for p in paths]
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str]:
        return (index, *read_pixels(self.paths[index], self.preprocess))


def collate(samples: Iterable[tuple[int, torch.Tensor | None, str]]) -> Batch:
    """Stack the good samples, keep the bad ones' reasons: ``(indices, pixels, errors)``.

    ``pixels`` is empty (shape [0]) when every sample in the batch failed. In a DataLoader worker
    the batch is stacked straight into shared memory (as ``default_collate`` does), saving the copy
    the worker would otherwise make to send it.
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
    if not tensors:
        return indices, torch.empty(0), errors
    return indices, torch.utils.data.default_collate(tensors), errors


def default_num_workers() -> int:
    """DataLoader workers: ``min(cores, 8)``, or at most 2 in quick mode (CI, no GPU).

    ``cores`` counts the cores this process may use (``taskset`` pins count), not the machine's.
    """
    cpus = usable_cpus()
    return min(cpus, 2) if env.quick_mode() else min(cpus, 8)


def make_loader(
    paths: Sequence[str | Path],
    preprocess: Preprocess,
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
        why = env.dali_problem() or "GPU がなく、DALI の GPU パイプラインが使えないため"
    return f"バックエンド: {chosen} (auto: {why})"


def _dali_batches(
    model: ClipModel,
    paths: list[Path],
    batch_size: int,
    num_threads: int,
    fallbacks: Fallbacks | None,
    knobs: DecoderKnobs | None,
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
        knobs=knobs,
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


class Staging:
    """One float32 buffer reused for every CPU batch's normalisation.

    A fresh 38 MB tensor per batch of 64 costs more in page faults than the arithmetic (measured
    on the 2-core dev machine: 42 ms against 14 ms a batch); the model reads the buffer before the
    next batch overwrites it. GPU batches are normalised in the CUDA caching allocator's memory.
    """

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None

    def normalize(self, pixels: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
        if pixels.device.type != "cpu":
            return normalize(pixels, spec)
        if self.buffer is None or self.buffer.shape[1:] != pixels.shape[1:] or len(self.buffer) < len(pixels):
            self.buffer = torch.empty(pixels.shape, dtype=torch.float32)
        return normalize(pixels, spec, out=self.buffer[: len(pixels)])


def encode_batch(
    model: ClipModel, pixels: torch.Tensor, amp: bool = True, staging: Staging | None = None
) -> torch.Tensor:
    """L2-normalised float32 image embeddings [B, D] on the CPU for a preprocessed batch.

    The engine's version of notebook 02's variant e (section 4): one ``.cpu()`` per batch here, because
    the engine hands every file its own record.

    ``pixels`` are normalised float32 or uint8 at the model's input size (:class:`SizedDecode`),
    converted and normalised here, on the model's device after the (pinned, non-blocking) copy.
    Runs under ``torch.inference_mode()`` and, with ``amp``, under :func:`autocast_dtype` autocast.
    ``staging`` (the engines pass one per run) reuses one CPU buffer for the normalisation.
    """
    dtype = autocast_dtype(model.device) if amp else None
    autocast = (
        torch.autocast(device_type=model.device.type, dtype=dtype) if dtype is not None else nullcontext()
    )
    with torch.inference_mode(), autocast:
        pixels = pixels.to(model.device, non_blocking=True)
        if pixels.dtype == torch.uint8:
            pixels = (staging or Staging()).normalize(pixels, model.preprocess_spec)
        features = model.encode_images(pixels)
    return F.normalize(features.float(), dim=-1).cpu()


@dataclass
class InputOrder:
    """Releases results in input order, each index exactly once: the one reorder of every engine.

    ``add(index, item)`` takes results as they come (any order); ``ready()`` returns the items that
    can go out now, in order; ``finish()`` raises when some index never came. An index out of range
    raises; one that comes twice raises too, unless ``duplicates="count"`` (Ray may run a task
    again after a worker dies): then it is dropped and counted in ``duplicates``. Holds only the
    results that arrived ahead of a missing one.
    """

    total: int
    on_duplicate: Literal["raise", "count"] = "raise"
    next_index: int = 0
    duplicates: int = 0
    pending: dict[int, object] = field(default_factory=dict)

    def add(self, index: int, item: object) -> None:
        if not 0 <= index < self.total:
            raise RuntimeError(f"backend returned index {index} outside 0..{self.total - 1}")
        if index < self.next_index or index in self.pending:
            if self.on_duplicate == "count":
                self.duplicates += 1
                return
            raise RuntimeError(f"backend returned index {index} twice")
        self.pending[index] = item

    def ready(self) -> list:
        out = []
        while self.next_index in self.pending:
            out.append(self.pending.pop(self.next_index))
            self.next_index += 1
        return out

    def finish(self) -> None:
        if self.next_index != self.total:
            missing = self.total - self.next_index
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
    dali_knobs: DecoderKnobs | None = None,
) -> Iterator[list[Record]]:
    """Embed every file of ``paths``: yields lists of :class:`Record`, batch by batch, in input order.

    Every index appears exactly once; an unreadable file gives an ``"error"`` record with its
    reason and never stops the run. ``num_workers`` (DataLoader workers or DALI threads) defaults
    to :func:`default_num_workers`; 0 reads in the main process. The DataLoader decodes JPEGs at the
    size the model needs and sends uint8 (:class:`SizedDecode`) unless ``exact_decode`` asks for the
    model's own preprocessing of the full picture. With the DALI backend, ``fallbacks``
    (a :class:`helpers.dali.Fallbacks`) counts the files decoded with PIL instead, and why, and
    ``dali_knobs`` (a :class:`helpers.dali.DecoderKnobs`) set the GPU decoder's options.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    files = [Path(p) for p in paths]
    chosen = resolve_backend(backend)
    if chosen == "dali":
        threads = max(1, default_num_workers() if num_workers is None else num_workers)
        source = _dali_batches(model, files, batch_size, threads, fallbacks, dali_knobs)
    else:
        source = _loader_batches(model, files, batch_size, num_workers, exact_decode)
    from tqdm.auto import tqdm

    order = InputOrder(len(files))
    staging = Staging()
    with tqdm(total=len(files), unit="枚", desc="埋め込み", disable=not progress or not files) as bar:
        for indices, pixels, errors in source:
            if indices:
                embeddings = encode_batch(model, pixels, amp, staging)
                for index, embedding in zip(indices, embeddings.unbind(0), strict=True):
                    order.add(int(index), Record(int(index), files[int(index)], "ok", embedding))
            for index, reason in errors.items():
                order.add(int(index), Record(int(index), files[int(index)], "error", None, str(reason)))
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
