"""``python -m helpers.bench``: the batch-inference variants of notebook 02, measured on this machine.

Every variant classifies the same N distinct JPEGs (:func:`helpers.data.make_workload`, or the
images of ``--images DIR``) against the same labels and must give the baseline's probabilities
(within :data:`FP32_TOLERANCE`, :data:`AMP_TOLERANCE` or :data:`DALI_TOLERANCE`); its time is the
median of ``--repeats`` end-to-end passes (decode, preprocess, copy, model, softmax) after a
short warm-up. Writes ``bench.json``, ``bench.md`` and ``bench.png`` to ``--out``::

    python -m helpers.bench                         # the model load_clip() picks, workload_size() images
    python -m helpers.bench --arch vit-b16-random --n 1000 --note "H200, 2 cores, no HW JPEG decoder"
    python -m helpers.bench --model embedded --n 64 --out build/bench

Variants (keys; notebook 02 writes each of them in a ``#@save helpers.bench`` cell and runs it there):
``a`` one image at a time; ``b`` manual slicing into batches; ``c`` a DataLoader over the paths
(decoding still in the main process); ``d`` a :class:`PhotoDataset` that decodes and preprocesses in
worker processes; ``e`` d with ``inference_mode``, fp16 autocast on CUDA (float32 on the CPU:
:func:`precision_label`) and no ``.cpu()`` per batch; ``g`` e with JPEGs decoded at the size the
model needs, uint8 from the workers and the normalisation on the model's device (what the engine
does by default); ``dali`` the engine's ``dali`` backend, when ``helpers.dali.iter_preprocessed``
exists and DALI imports, once per combination of ``--dali-hybrid-threshold`` and
``--dali-hw-decoder-load`` (comma-separated lists: a GPU session sweeps them in one run). Every
variant computes the label text features **once**, before its loop, as the batch-inference
article did.

``--runtime torch,onnx --precision fp32,int8`` adds one row per pair this machine can run
(:func:`runtime_pairs`): variant g with the model run by :mod:`helpers.runtimes` (ONNX files are
exported or read from the cache before the clock starts); the variants above stay as they are.

The same run measures the **ceiling** of the read path: processes (one per usable core) that only
decode and apply the model's geometry, with full-size and with reduced-size JPEG decoding, no
model; every variant is reported as a share of the reduced-size ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from helpers import engines, env, runtimes
from helpers.data import BUILD_DIR, ImageReadError, list_images, make_workload, open_image, sample_photos
from helpers.models import (
    ClipModel,
    ModelCheckError,
    ModelLoadError,
    PreprocessSpec,
    add_loading_options,
    normalize,
    prepare,
    resize_with_spec,
)
from helpers.reading import SizedDecode, open_any
from helpers.timing import ResultsTable, Timing, measure
from helpers.timing import clock as _clock
from helpers.timing import (
    pinned_threads as pinned_threads,  # re-exported: notebook 02 calls bench.pinned_threads
)

if TYPE_CHECKING:
    from helpers.dali import DecoderKnobs, Fallbacks

FP32_TOLERANCE = 1e-3
"""Largest |Δ probability| allowed for float32 variants (batching changes summation order only)."""
AMP_TOLERANCE = 5e-2
"""... for float16 autocast: ~3 significant digits per matmul put ~1e-3 on the cosines, which a
real model's logit scale (up to 100) turns into ~0.1 in the logits and a few 1e-2 in the probabilities."""
DECODE_TOLERANCE = 1e-1
"""... for decoding JPEGs at reduced size (other pixels before the resize: docs/classify.md has the
measured effect)."""
DALI_TOLERANCE = 1e-1
"""... for DALI with autocast (another JPEG decoder and resize kernel: pixels differ by a few levels)."""
INT8_TOLERANCE = 2e-1
"""... for INT8 runtime rows: quantised weights and activations move a real model's cosines by ~1e-2,
which its logit scale turns into up to ~0.2 in a probability (notebook 08's accuracy table measures it)."""
PIL_SHARE_LIMIT = 0.05
"""Above this share of files decoded by PIL, a DALI row is labelled as such, not as a DALI speed."""
TEMPLATE = "{}の写真"
DEFAULT_OUT = BUILD_DIR / "bench"

ARTICLE_T4_SECONDS: dict[str, float] = {
    "1 枚ずつ": 30.5,
    "バッチ (手作業で分割)": 17.2,
    "DataLoader (パスのリスト)": 17.6,
}
"""The batch-inference article's author's own figures (notebook CLIP_acceleration_batch, Colab T4,
the real line-corporation/clip-japanese-base): one ``%%time`` run each (no median, no spread),
seconds for 1,001 files that are ``cp`` copies of one 1024×1024 JPEG, the model loaded beforehand.
``bench.md`` quotes them; notebook 02 section 6 shows the author's whole T4 table."""
ARTICLE_FILES = 1001
ARTICLE_SOURCE = (
    "yagiyuki「PyTorchでCLIP推論を高速化する ── バッチ処理の実践と効果検証」(Zenn) の著者のノートブック "
    "CLIP_acceleration_batch (github.com/yagiyuki/clip-study-playground、コミット 52ecd1c、2025-05-05)。"
    "Colab の T4、line-corporation/clip-japanese-base、1024×1024 の JPEG 1 枚の cp コピー 1,001 枚、"
    "それぞれ 1 回の %%time"
)
REFERENCE_H100_IMAGES_PER_S: dict[str, float] = {
    "1 枚ずつ": 83,
    "バッチ 50": 115,
    "DataLoader + 15 ワーカー + fp16": 534,
    "DALI GPU デコード + リサイズ": 3259,
    "モデルのみ fp16 バッチ 256": 6720,
}
"""Measured 2026-11 on an H100 lent to this project (16 CPU cores), 1000 distinct JPEGs of 1260×750,
``random:vit-b16`` (ViT-B/16 with random weights), before reduced-size decoding existed (the
DataLoader row decodes full-size); the DALI row used the H100's hardware JPEG decoder, which a T4
lacks. The H100's figures, never a T4 estimate (``bench.md``)."""
REFERENCE_H100_SOURCE = (
    "参考値: この講座で 2026-11 に貸与の H100 (CPU 16 コア) で測定、1260×750 の異なる JPEG 1000 枚、"
    "ランダム重みの ViT-B/16 (random:vit-b16)。縮小デコードを入れる前の経路 (元の大きさからデコード)。"
    "DALI の行は H100 のハードウェア JPEG デコーダーを使用 (T4 にはない)"
)
T4_TFLOPS: dict[str, float] = {"fp16": 65.0, "fp32": 8.1}
"""NVIDIA's T4 datasheet: peak fp16 Tensor Core and fp32 throughput (lower when sustained at 70 W)."""
T4_MEMORY_GB_S = 320.0
"""NVIDIA's T4 datasheet: GDDR6 bandwidth."""


def vit_b16_work(
    batch: int,
    value_bytes: int = 2,
    tokens: int = 197,
    width: int = 768,
    mlp: int = 3072,
    layers: int = 12,
) -> tuple[float, float]:
    """FLOPs and bytes of memory traffic per image of a ViT-B/16 image tower at 224 px at ``batch``:
    two FLOPs a multiply-add over the projections, the MLP and attention (patch embedding included);
    the weights read once a batch plus each layer's activations written and read about ten times, at
    ``value_bytes`` a value (2: fp16, 4: fp32; a lower bound on the traffic)."""
    per_layer = tokens * (4 * width * width + 2 * width * mlp) + 2 * tokens * tokens * width
    flops = 2 * (layers * per_layer + (tokens - 1) * width * 3 * 16 * 16)
    weights = value_bytes * layers * (4 * width * width + 2 * width * mlp)
    activations = value_bytes * layers * 10 * tokens * width
    return flops, weights / batch + activations


def t4_model_estimate(batch: int = 64, precision: str = "fp16") -> tuple[float, float, float]:
    """A roofline bound, not a measurement: the most images/s a T4 can give a ViT-B/16 image tower in
    ``precision`` ("fp16" or "fp32") at ``batch``, from NVIDIA's peak figures for compute and memory
    bandwidth. Returns (images/s bound, ms of compute per image, ms of memory traffic per image).
    Notebook 02 section 6."""
    flops, traffic = vit_b16_work(batch, value_bytes=2 if precision == "fp16" else 4)
    compute_ms, memory_ms = flops / T4_TFLOPS[precision] / 1e9, traffic / T4_MEMORY_GB_S / 1e6
    return 1e3 / max(compute_ms, memory_ms), compute_ms, memory_ms


def quoted_markdown() -> str:
    """The article's figures and the H100 reference as Markdown tables, each under its source
    (single runs: no median column). ``bench.md``."""
    lines = [
        f"**{ARTICLE_SOURCE}**",
        "",
        f"| 方式 | {ARTICLE_FILES:,} 枚の時間 (1 回) | 画像/秒 | 1 枚ずつとの比 |",
    ]
    lines.append("|---|---:|---:|---:|")
    base = ARTICLE_T4_SECONDS["1 枚ずつ"]
    for name, seconds in ARTICLE_T4_SECONDS.items():
        lines.append(f"| {name} | {seconds} s | {ARTICLE_FILES / seconds:.1f} | {base / seconds:.2f}× |")
    lines += ["", f"**{REFERENCE_H100_SOURCE}**", ""]
    lines += ["| 方式 | 画像/秒 | 1 枚ずつとの比 |", "|---|---:|---:|"]
    first = REFERENCE_H100_IMAGES_PER_S["1 枚ずつ"]
    for name, rate in REFERENCE_H100_IMAGES_PER_S.items():
        lines.append(f"| {name} | {rate:,.0f} | {rate / first:.2f}× |")
    return "\n".join(lines)


@dataclass
class Setup:
    """What every variant gets: the model, the files, the label prompts and the batch settings
    (notebook 02 section 1 builds one; section 5 hands it to every variant)."""

    model: ClipModel
    paths: list[Path]
    texts: list[str]
    batch_size: int = 64
    num_workers: int = 2
    fallbacks: Fallbacks | None = None
    """What the last DALI pass decoded with PIL instead, and why (set by the DALI variants)."""


@dataclass(frozen=True)
class Variant:
    """One way of running the job; ``run(setup)`` returns probabilities [N, labels] on the CPU.
    ``tolerance``: the largest |Δ probability| from the baseline allowed (notebook 02 section 5)."""

    key: str
    name: str
    run: Callable[[Setup], torch.Tensor]
    tolerance: float = FP32_TOLERANCE


@dataclass
class Outcome:
    """A measured variant: its timing, and how far its probabilities are from the baseline's."""

    variant: Variant
    timing: Timing
    max_diff: float
    correct: bool
    note: str = ""
    """For DALI: which files PIL decoded instead (:meth:`helpers.dali.Fallbacks.describe`)."""


@dataclass
class Report:
    """Everything one bench run found (what the JSON file holds)."""

    machine: dict[str, object]
    settings: dict[str, object]
    outcomes: list[Outcome] = field(default_factory=list)
    ceilings: list[Timing] = field(default_factory=list)
    """Decode + geometry only (full-size, then reduced-size decoding): :func:`ceilings`."""

    def share_of_ceiling(self, timing: Timing) -> float | None:
        """``timing``'s images/s as a share of the reduced-size decode ceiling (None if not measured)."""
        return timing.items_per_s / self.ceilings[-1].items_per_s if self.ceilings else None

    def table(self) -> ResultsTable:
        table = ResultsTable(title=f"バッチ推論の方式と速さ ({self.machine['label']})")
        for outcome in self.outcomes:
            table.add(outcome.timing)
        return table


# ---------------------------------------------------------------- the variants


def per_image(s: Setup) -> torch.Tensor:
    """a. Open, preprocess and classify one image at a time (the label features once, before the loop)."""
    text = s.model.label_features(s.texts)  # once, as the batch-inference article does
    rows = []
    for path in s.paths:
        pixels = s.model.preprocess([open_image(path)])
        features = s.model.encode_images(pixels)  # copies to the model's device, runs the image tower
        rows.append(s.model.probabilities(features, text).cpu())  # .cpu() waits for the GPU
    return torch.cat(rows)


def manual_batches(s: Setup) -> torch.Tensor:
    """b. Slice the list into batches by hand; decoding stays in this process, one file after another."""
    text = s.model.label_features(s.texts)
    rows = []
    for start in range(0, len(s.paths), s.batch_size):
        images = [open_image(p) for p in s.paths[start : start + s.batch_size]]
        features = s.model.encode_images(s.model.preprocess(images))  # one call for the whole batch
        rows.append(s.model.probabilities(features, text).cpu())
    return torch.cat(rows)


def loader_over_paths(s: Setup) -> torch.Tensor:
    """c. A DataLoader over the list of paths: it only batches the names (decoding stays here)."""
    text = s.model.label_features(s.texts)
    loader = torch.utils.data.DataLoader(s.paths, batch_size=s.batch_size, collate_fn=list)
    rows = []
    for batch_paths in loader:
        images = [open_image(p) for p in batch_paths]  # still this (main) process
        features = s.model.encode_images(s.model.preprocess(images))
        rows.append(s.model.probabilities(features, text).cpu())
    return torch.cat(rows)


def read_photo(model: ClipModel, path: Path) -> torch.Tensor:
    """One file opened and preprocessed as a-c do it: float32 [3, H, W]."""
    return model.preprocess([open_image(path)])[0]


class PhotoDataset(torch.utils.data.Dataset):
    """d. One file per item, read by ``read`` in whichever process asks: a DataLoader worker."""

    def __init__(self, files: list[Path], read: Callable[[Path], torch.Tensor]) -> None:
        self.files, self.read = files, read

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.read(self.files[index])


def photo_loader(s: Setup, read: Callable[[Path], torch.Tensor]) -> torch.utils.data.DataLoader:
    """d, e and g read through this: ``num_workers`` processes, page-locked batches on CUDA."""
    return torch.utils.data.DataLoader(
        PhotoDataset(s.paths, read),
        batch_size=s.batch_size,
        num_workers=s.num_workers,
        pin_memory=s.model.device.type == "cuda",
    )


def workers(s: Setup) -> torch.Tensor:
    """d. The Dataset in ``num_workers`` processes: decoding and preprocessing leave the main process."""
    text = s.model.label_features(s.texts)
    rows = []
    for pixels in photo_loader(s, partial(read_photo, s.model)):
        features = s.model.encode_images(pixels.to(s.model.device, non_blocking=True))
        rows.append(s.model.probabilities(features, text).cpu())
    return torch.cat(rows)


def with_autocast(s: Setup) -> torch.Tensor:
    """e. d + ``inference_mode`` + fp16 autocast on CUDA (float32 on the CPU); no ``.cpu()`` per batch."""
    text = s.model.label_features(s.texts).to(s.model.device)
    on_gpu = s.model.device.type == "cuda"
    features = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=on_gpu):
        for pixels in photo_loader(s, partial(read_photo, s.model)):
            features.append(s.model.encode_images(pixels.to(s.model.device, non_blocking=True)))
    return s.model.probabilities(torch.cat(features).float(), text).cpu()  # one wait, at the end


def at_size(s: Setup) -> torch.Tensor:
    """g. e, but the workers decode JPEGs at the size the model needs and send uint8 [3, H, W];
    the conversion to float and the normalisation run on the model's device."""
    text = s.model.label_features(s.texts).to(s.model.device)
    spec, on_gpu = s.model.preprocess_spec, s.model.device.type == "cuda"
    features = []
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=on_gpu):
        for pixels in photo_loader(s, SizedDecode(spec)):
            pixels = normalize(pixels.to(s.model.device, non_blocking=True), spec)
            features.append(s.model.encode_images(pixels))
    return s.model.probabilities(torch.cat(features).float(), text).cpu()


def _engine(
    s: Setup,
    backend: str,
    fallbacks: Fallbacks | None = None,
    exact_decode: bool = True,
    knobs: DecoderKnobs | None = None,
) -> torch.Tensor:
    texts = s.model.label_features(s.texts)  # once
    embeddings = []
    for records in engines.iter_embeddings(
        s.model,
        s.paths,
        backend,
        s.batch_size,
        s.num_workers,
        amp=True,
        progress=False,
        fallbacks=fallbacks,
        exact_decode=exact_decode,
        dali_knobs=knobs,
    ):
        bad = next((r for r in records if r.status != "ok"), None)
        if bad is not None:
            raise ImageReadError(bad.path, bad.error)
        embeddings.extend(r.embedding for r in records)
    return s.model.probabilities(torch.stack(embeddings), texts)


def dali_variant(knobs: DecoderKnobs | None = None) -> Callable[[Setup], torch.Tensor]:
    """The engine's DALI backend (on the GPU when there is one) with the decoder's ``knobs``.
    The files it hands to PIL are counted in ``s.fallbacks`` (fresh for every pass)."""

    def engine_dali(s: Setup) -> torch.Tensor:
        from helpers import dali

        s.fallbacks = dali.Fallbacks()
        return _engine(s, "dali", s.fallbacks, knobs=knobs)

    return engine_dali


def _knob_grid(thresholds: str | None, loads: str | None) -> list[DecoderKnobs | None]:
    """Every combination of the comma-separated ``--dali-hybrid-threshold`` and ``--dali-hw-decoder-load``."""
    if not thresholds and not loads:
        return [None]
    from helpers.dali import HW_DECODER_LOAD, DecoderKnobs

    hybrid = [int(float(t)) for t in thresholds.split(",")] if thresholds else [None]
    load = [float(x) for x in loads.split(",")] if loads else [HW_DECODER_LOAD]
    return [DecoderKnobs(hw_decoder_load=x, hybrid_huffman_threshold=t) for t in hybrid for x in load]


def precision_label(device: torch.device | str) -> str:
    """What the engine's model step runs in on ``device`` (:func:`helpers.engines.autocast_dtype`),
    in words: ``"fp16 autocast"`` on CUDA, ``"float32 (CPU では autocast なし)"`` on the CPU: the
    label of variant e says what actually ran (notebook 02 section 5)."""
    dtype = engines.autocast_dtype(device)
    if dtype is None:
        return f"float32 ({torch.device(device).type.upper()} では autocast なし)"
    return f"{str(dtype).removeprefix('torch.').replace('float16', 'fp16')} autocast"


def variants(
    device: torch.device | str, dali_knobs: Sequence[DecoderKnobs | None] = (None,)
) -> list[Variant]:
    """The variants that can run here, baseline first (DALI only when ``helpers.dali`` provides it,
    one row per entry of ``dali_knobs``). Names say what runs on ``device`` (:func:`precision_label`).
    Notebook 02 writes a-e and g in its cells (``#@save helpers.bench``) and measures them."""
    amp = AMP_TOLERANCE if engines.autocast_dtype(device) is not None else FP32_TOLERANCE
    chosen = [
        Variant("a", "a. 1 枚ずつ", per_image),
        Variant("b", "b. バッチ (手作業で分割)", manual_batches),
        Variant("c", "c. DataLoader (パスのリスト)", loader_over_paths),
        Variant("d", "d. Dataset + ワーカーで前処理", workers),
        Variant("e", f"e. d + {precision_label(device)}", with_autocast, amp),
        Variant("g", "g. e + 縮小デコード + uint8 + デバイスで正規化", at_size, max(amp, DECODE_TOLERANCE)),
    ]
    if env.dali_version() is not None and engines.dali_engine_available():
        where = "GPU" if torch.device(device).type == "cuda" else "CPU"
        for knobs in dali_knobs:
            detail = ""
            if knobs is not None:
                threshold = knobs.hybrid_huffman_threshold
                hybrid = "既定" if threshold is None else f"{threshold:,}"
                detail = f", hybrid_huffman_threshold {hybrid}, hw_decoder_load {knobs.hw_decoder_load}"
            name = f"DALI ({where} でデコード{detail})"
            chosen.append(Variant("dali", name, dali_variant(knobs), max(amp, DALI_TOLERANCE)))
    return chosen


def runtime_pairs(
    runtimes_asked: str | None, precisions_asked: str | None, device: str
) -> list[runtimes.Choice]:
    """The runtime rows asked for with ``--runtime A,B`` and ``--precision X,Y``: every pair of the
    two lists that can run on ``device``. One pair asked for alone is refused when it cannot run
    (:class:`helpers.runtimes.RuntimeUnavailable`, one line listing the valid pairs); of several,
    those that cannot run are left out and named in one printed line."""
    if not runtimes_asked and not precisions_asked:
        return []
    names = (runtimes_asked or "torch").split(",")
    levels = (precisions_asked or "auto").split(",")
    if len(names) * len(levels) == 1:
        return [runtimes.choose(names[0], levels[0], device)]
    chosen, left_out = [], []
    for name in names:
        for level in levels:
            try:
                choice = runtimes.choose(name, level, device)
            except runtimes.RuntimeUnavailable:
                left_out.append(f"{name} {level}")
                continue
            if choice not in chosen:
                chosen.append(choice)
    if left_out:
        valid = ", ".join(f"{r} {p}" for r, p in runtimes.valid_pairs(device))
        print(f"このマシンで動かない組み合わせは測りません: {', '.join(left_out)} (動くのは {valid})")
    return chosen


def runtime_variant(model: ClipModel, choice: runtimes.Choice) -> Variant:
    """A row for ``choice``: variant g (the engine's default path) with the model run by that
    runtime and precision (:func:`helpers.runtimes.use`; ONNX files exported or read from the cache
    before the clock starts)."""
    fast = runtimes.use(model, choice)

    def engine_runtime(s: Setup) -> torch.Tensor:
        texts = fast.label_features(s.texts)  # once, through the same runtime
        embeddings = []
        for records in engines.iter_embeddings(
            fast, s.paths, "dataloader", s.batch_size, s.num_workers, amp=False, progress=False
        ):
            bad = next((r for r in records if r.status != "ok"), None)
            if bad is not None:
                raise ImageReadError(bad.path, bad.error)
            embeddings.extend(r.embedding for r in records)
        return fast.probabilities(torch.stack(embeddings), texts)

    tolerance = INT8_TOLERANCE if choice.precision == "int8" else max(AMP_TOLERANCE, DECODE_TOLERANCE)
    key = f"{choice.runtime}-{choice.precision}"
    return Variant(key, f"g + {choice.label}", engine_runtime, tolerance)


# ---------------------------------------------------------------- measuring on a shared machine


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    n_items: int | Mapping[str, int],
    warmup: int = 1,
    repeats: int = 3,
) -> tuple[dict[str, Timing], dict[str, object]]:
    """Time several functions in turns (a, b, c, a, b, c, ...): ``warmup`` untimed rounds, then
    ``repeats`` timed ones, so a slow spell of a shared machine falls on all of them alike.

    Returns a :class:`~helpers.timing.Timing` per name (median and every run, for
    :func:`helpers.verdict.compare`) and each function's last return value.
    Notebook 02 section 5 and its 発展.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    items = n_items if isinstance(n_items, Mapping) else dict.fromkeys(fns, n_items)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    last: dict[str, object] = {}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = _clock()
            last[name] = fn()
            if round_ >= warmup:
                runs[name].append(_clock() - start)
    timings = {name: Timing(name, statistics.median(r), items[name], tuple(r)) for name, r in runs.items()}
    return timings, last


# ---------------------------------------------------------------- where the time goes


def stages_per_image(s: Setup) -> dict[str, float]:
    """Variant a's work split into stages, seconds per image: デコード (open_image), 前処理 (the
    model's preprocessing), 転送 (to the model's device), モデル (text features once, then features
    and probabilities image by image). The same work as :func:`per_image`, one stage after the
    other over each batch of paths, so the stages add up to its time. Notebook 02, 発展 (the breakdown)."""
    totals = dict.fromkeys(("デコード", "前処理", "転送", "モデル"), 0.0)
    start = _clock()
    text = s.model.label_features(s.texts)
    totals["モデル"] += _clock() - start
    for first in range(0, len(s.paths), s.batch_size):  # in chunks: never all pictures in memory
        t0 = _clock()
        images = [open_image(p) for p in s.paths[first : first + s.batch_size]]
        t1 = _clock()
        pixels = [s.model.preprocess([image]) for image in images]
        t2 = _clock()
        on_device = [p.to(s.model.device) for p in pixels]
        t3 = _clock()
        for p in on_device:
            s.model.probabilities(s.model.encode_images(p), text).cpu()
        t4 = _clock()
        for stage, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            totals[stage] += seconds
    return {stage: seconds / len(s.paths) for stage, seconds in totals.items()}


def _opened_only(images: list) -> torch.Tensor:
    """A 'preprocessing' that only lets the worker open (decode) the picture."""
    return torch.zeros(len(images), 1)


@dataclass(frozen=True)
class _OpenedAtSizeOnly(SizedDecode):
    """Decode at reduced size (as :class:`~helpers.reading.SizedDecode`), nothing more."""

    def __call__(self, path: str | Path) -> torch.Tensor:
        open_any(path, at_least=self.spec.decode_floor())
        return torch.zeros(1)


STARTUP_STAGE = "ワーカーの起動と停止"
"""The stage of :func:`stages_loader` that a persistent DataLoader pays once, not per pass."""


def _passes(s: Setup, preprocess: engines.Preprocess) -> tuple[float, float, float, list[torch.Tensor]]:
    """Seconds of a fresh DataLoader's first pass (its workers start), of its second pass (the
    same, persistent workers), and of stopping its workers; and the second pass's batches."""
    loader = engines.make_loader(s.paths, preprocess, s.batch_size, s.num_workers)
    t0 = _clock()
    for _ in loader:
        pass
    t1 = _clock()
    batches = [pixels for _, pixels, _ in loader]
    t2 = _clock()
    del loader  # its workers stop here, as when e's loader goes away
    t3 = _clock()
    return t1 - t0, t2 - t1, t3 - t2, batches


def stages_loader(s: Setup, exact_decode: bool = True) -> dict[str, float]:
    """Variant e's (``exact_decode``) or g's work in stages, seconds of wall time per image:
    ワーカーの起動と停止 (:data:`STARTUP_STAGE`) the first pass of e's DataLoader minus its second
    pass, plus stopping its workers: what e and g pay once per call because they build a new
    DataLoader, and a persistent one pays once per job; デコード the second pass of a DataLoader
    whose workers only decode; 前処理 the second pass of one that also preprocesses, minus the
    decode pass; 転送 to the model's device; モデル the main process's normalisation (g), model
    and probabilities over the batches already read. In e and g the workers read **while** the
    model runs, so their end-to-end time can be shorter than the sum. Notebook 02, 発展 (the breakdown)."""
    opened = _opened_only if exact_decode else _OpenedAtSizeOnly(s.model.preprocess_spec)
    _, decode, _, _ = _passes(s, opened)
    fresh, read, stop, batches = _passes(s, engines.worker_preprocess(s.model, exact_decode))
    t2 = _clock()
    on_device = [pixels.to(s.model.device, non_blocking=True) for pixels in batches]
    t3 = _clock()
    text, staging = s.model.label_features(s.texts), engines.Staging()
    features = [engines.encode_batch(s.model, pixels, True, staging) for pixels in on_device]
    s.model.probabilities(torch.cat(features), text)
    t4 = _clock()
    seconds = {
        STARTUP_STAGE: max(fresh - read, 0.0) + stop,
        "デコード": decode,
        "前処理": max(read - decode, 0.0),
        "転送": t3 - t2,
        "モデル": t4 - t3,
    }
    return {stage: value / len(s.paths) for stage, value in seconds.items()}


# ---------------------------------------------------------------- the ceiling


def _decode_only(paths: list[Path], spec: PreprocessSpec, at_size: bool) -> int:
    """Decode and apply ``spec``'s geometry (uint8, no normalisation, no model): the least work.
    Returns how many files it decoded (unreadable ones are skipped: the variants report them)."""
    floor, done = (spec.decode_floor() if at_size else None), 0
    for path in paths:
        try:
            resize_with_spec(open_image(path, at_least=floor), spec)
            done += 1
        except ImageReadError:
            pass
    return done


@contextlib.contextmanager
def ceiling_runs(
    paths: list[Path], spec: PreprocessSpec, processes: int
) -> Iterator[dict[str, Callable[[], int]]]:
    """The two decode-only passes of :func:`ceilings` as functions (name → run), on a pool of
    ``processes`` processes started and warmed here: for :func:`measure_interleaved`, so the ceiling
    is measured in rounds with other work (notebook 02, 発展: the breakdown). Each run returns how
    many files it decoded."""
    chunks = [paths[i::processes] for i in range(processes)]
    runs: dict[str, Callable[[], int]] = {}
    with ProcessPoolExecutor(processes) as pool:
        for at_size, label in ((False, "全体をデコード"), (True, "縮小デコード")):
            list(pool.map(_decode_only, [c[:2] for c in chunks], [spec] * processes, [at_size] * processes))

            def run(at_size: bool = at_size) -> int:
                return sum(pool.map(_decode_only, chunks, [spec] * processes, [at_size] * processes))

            runs[f"上限: {processes} プロセスでデコード + リサイズのみ ({label})"] = run
        yield runs


def ceilings(paths: list[Path], spec: PreprocessSpec, processes: int, repeats: int) -> list[Timing]:
    """Images/s of ``processes`` processes that only decode + resize, full-size then at reduced size.

    What any read path on this CPU can reach at best: the engines add the copy between processes,
    batching, the model and the output. The pool is started and warmed before the clock runs
    (:func:`ceiling_runs`). ``bench.md`` shows each variant's share of these.
    """
    with ceiling_runs(paths, spec, processes) as runs:
        return [measure(run, name, len(paths), warmup=0, repeats=repeats) for name, run in runs.items()]


# ---------------------------------------------------------------- running


def machine(note: str | None = None) -> dict[str, object]:
    """What ran the benchmark: GPU, cores, library versions, date; ``label`` names it in one line."""
    import transformers

    gpu = env.gpu_name()
    cores = engines.usable_cpus()
    label = note or (f"{gpu}, CPU {cores} コア" if gpu else f"GPU なし, CPU {cores} コア")
    return {
        "label": label,
        "gpu": gpu,
        "cpu_cores_usable": cores,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dali": env.dali_version(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def run_variant(variant: Variant, setup: Setup, repeats: int) -> tuple[Timing, torch.Tensor]:
    """Warm up on a few images, then time ``repeats`` full passes; the probabilities of the last."""
    warm = Setup(setup.model, setup.paths[: min(len(setup.paths), 2)], setup.texts, 2, setup.num_workers)
    variant.run(warm)
    result: list[torch.Tensor] = []
    timing = measure(
        lambda: result.append(variant.run(setup)),
        variant.name,
        n_items=len(setup.paths),
        warmup=0,
        repeats=repeats,
    )
    return timing, result[-1]


def run_all(setup: Setup, chosen: Sequence[Variant], repeats: int, echo: bool = True) -> list[Outcome]:
    """Measure every variant and compare its probabilities with the first (the baseline)."""
    outcomes: list[Outcome] = []
    baseline: torch.Tensor | None = None
    for variant in chosen:
        setup.fallbacks = None
        timing, probs = run_variant(variant, setup, repeats)
        if baseline is None:
            baseline = probs
        diff = float((probs.float() - baseline.float()).abs().max()) if probs.shape == baseline.shape else 1.0
        note = ""
        if setup.fallbacks is not None:
            note = setup.fallbacks.describe()
            if setup.fallbacks.pil_share > PIL_SHARE_LIMIT:  # mostly PIL: the DALI label would mislead
                timing = replace(timing, name=f"{variant.name} ※ PIL が {setup.fallbacks.pil_share:.0%}")
        outcome = Outcome(variant, timing, diff, diff <= variant.tolerance, note)
        outcomes.append(outcome)
        if echo:
            mark = "OK" if outcome.correct else "NG"
            print(
                f"{timing.name}: {timing.items_per_s:.1f} 画像/秒 (中央値 {timing.seconds:.2f} s),"
                f" 基準との差 {diff:.1e} ≤ {variant.tolerance:.0e} {mark}{f' ({note})' if note else ''}",
                flush=True,
            )
    return outcomes


def to_markdown(report: Report) -> str:
    """The report as Markdown: machine, settings, results, correctness, the article's figures."""
    m, s = report.machine, report.settings
    lines = [
        "# helpers.bench",
        "",
        f"- マシン: {m['label']} (GPU: {m['gpu'] or 'なし'}, 使える CPU コア: {m['cpu_cores_usable']},"
        f" torch {m['torch']}, transformers {m['transformers']}, DALI {m['dali'] or 'なし'}, {m['date']})",
        f"- モデル: {s['model']} / 画像 {s['n_images']} 枚 ({s['images']}) / バッチ {s['batch_size']}"
        f" / ワーカー {s['num_workers']} / 繰り返し {s['repeats']} 回の中央値",
        "",
        report.table().to_markdown(),
        "",
    ]
    for ceiling in report.ceilings:
        lines.append(f"- {ceiling.name}: {ceiling.items_per_s:,.0f} 画像/秒 (ばらつき {ceiling.spread:.0%})")
    lines += [
        "",
        "| 方式 | 基準との確率の差 (最大) | 許容 | 一致 | 上限 (縮小デコード) に対する割合 |",
        "|---|---:|---:|---|---:|",
    ]
    for o in report.outcomes:
        mark = "OK" if o.correct else "NG"
        share = report.share_of_ceiling(o.timing)
        shown = "—" if share is None else f"{share:.0%}"
        lines.append(
            f"| {o.variant.name} | {o.max_diff:.1e} | {o.variant.tolerance:.0e} | {mark} | {shown} |"
        )
    for o in report.outcomes:
        if o.note:
            lines += ["", f"{o.variant.name} のデコード: {o.note}"]
            if o.timing.name != o.variant.name:
                lines.append(
                    f"(PIL でデコードしたファイルが {PIL_SHARE_LIMIT:.0%} を超えたので、"
                    "この行は DALI の速さとは言えません)"
                )
    lines += ["", quoted_markdown()]
    return "\n".join(lines) + "\n"


def write(report: Report, out: Path) -> list[Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers.plots import throughput_bar

    out.mkdir(parents=True, exist_ok=True)
    table = report.table()
    rows = table.rows()
    data = {
        "machine": report.machine,
        "settings": report.settings,
        "results": [
            {
                "key": o.variant.key,
                **row,
                "runs": list(o.timing.runs),
                "max_prob_diff": o.max_diff,
                "tolerance": o.variant.tolerance,
                "correct": o.correct,
                "decoders": o.note,
                "share_of_ceiling": report.share_of_ceiling(o.timing),
            }
            for o, row in zip(report.outcomes, rows, strict=True)
        ],
        "ceilings": [
            {"name": c.name, "images_per_s": c.items_per_s, "seconds": c.seconds, "runs": list(c.runs)}
            for c in report.ceilings
        ],
        "article_t4_seconds_per_1000": ARTICLE_T4_SECONDS,
        "reference_h100_images_per_s": REFERENCE_H100_IMAGES_PER_S,
    }
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    paths[0].write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(to_markdown(report), encoding="utf-8")
    fig = throughput_bar(table)
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.bench", description="バッチ推論の方式を、このマシンで測って比べます。"
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        help="load_clip に渡すモデル名 (既定: $CLIP_MODEL、なければ auto。Hub に届かなければ止まります)",
    )
    which.add_argument(
        "--arch", choices=["vit-b16-random"], help="vit-b16-random は --model random:vit-b16 と同じ"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, help="この画像フォルダーを使う (既定: 生成したワークロード)")
    source.add_argument("--n", type=int, help="生成するワークロードの枚数 (既定: env.workload_size())")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader のワーカー数")
    parser.add_argument("--repeats", type=int, default=None, help="繰り返し回数 (既定: GPU 3、quick 1)")
    parser.add_argument("--variants", help="測る方式のキーをカンマ区切りで (例: a,b,e)。a は必ず含む")
    parser.add_argument("--note", help="マシンの呼び名 (例: 'H200, 2 cores, no HW JPEG decoder')")
    add_loading_options(parser)
    parser.add_argument(
        "--exact-decode",
        action="store_true",
        help="縮小デコードの方式 (g) を測らない (classify と同じフラグ)",
    )
    parser.add_argument(
        "--dali-hybrid-threshold",
        help="DALI の mixed デコーダーの hybrid_huffman_threshold (画素数)。"
        "カンマ区切りで複数: 組み合わせごとに 1 行",
    )
    parser.add_argument(
        "--dali-hw-decoder-load",
        help="DALI の hw_decoder_load (0〜1、カンマ区切りで複数)。"
        "0: ハードウェアデコーダーを使わない (T4 にはない。ただしほかの GPU の値は T4 の値ではない)",
    )
    parser.add_argument("--no-ceiling", action="store_true", help="デコードだけの上限を測らない")
    parser.add_argument(
        "--runtime",
        help="ランタイムの行を足す: torch,onnx (カンマ区切り。--precision との組み合わせごとに 1 行)",
    )
    parser.add_argument(
        "--precision", help="その行の精度: auto,fp32,fp16,bf16,int8 (カンマ区切り。onnx の int8 は CPU)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="書き出し先フォルダー")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: measure, print the table, write the three files; exit 1 if a variant disagrees."""
    args = build_parser().parse_args(argv)
    try:
        model, note = prepare(
            "random:vit-b16" if args.arch else args.model,
            run_check=not args.no_check,
            trust_remote_code=args.trust_remote_code,
        )
    except (ModelLoadError, ModelCheckError) as err:
        print(f"エラー: {err}", file=sys.stderr)
        return 1
    print(note, file=sys.stderr)
    if args.images is not None:
        paths = list_images(args.images)
        if not paths:
            print(f"{args.images} に画像がありません", file=sys.stderr)
            return 1
    else:
        paths = make_workload(args.n or env.workload_size())
    workers = engines.default_num_workers() if args.workers is None else args.workers
    texts = [TEMPLATE.format(p.label_ja) for p in sample_photos()]
    setup = Setup(model, paths, texts, args.batch_size, workers)
    knobs = _knob_grid(args.dali_hybrid_threshold, args.dali_hw_decoder_load)
    if knobs != [None] and model.device.type != "cuda":
        print(
            "--dali-* は GPU の mixed デコーダーの設定です: GPU がないので",
            "DALI は CPU デコードの 1 行だけです",
        )
        knobs = [None]
    chosen = variants(model.device, knobs)
    if args.exact_decode:  # the path as it was: no reduced-size decoding anywhere
        chosen = [v for v in chosen if v.key != "g"]
    if args.variants:
        keys = {"a", *args.variants.split(",")}
        chosen = [v for v in chosen if v.key in keys]
    try:
        pairs = runtime_pairs(args.runtime, args.precision, model.device.type)
        chosen += [runtime_variant(model, choice) for choice in pairs]
    except (runtimes.RuntimeUnavailable, runtimes.ExportError) as err:
        print(f"エラー: {err}", file=sys.stderr)
        return 1
    repeats = args.repeats or (1 if env.quick_mode() else 3)
    report = Report(
        machine(args.note),
        {
            "model": model.name,
            "model_fingerprint": model.fingerprint,
            "images": str(args.images) if args.images else "make_workload",
            "n_images": len(paths),
            "batch_size": args.batch_size,
            "num_workers": workers,
            "repeats": repeats,
            "amp": str(engines.autocast_dtype(model.device) or "float32"),
        },
    )
    model_line = f"{model.name} ({model.fingerprint[:12]})"
    print(f"{report.machine['label']} / {model_line} / {len(paths)} 枚 / {engines.backend_notice()}")
    if not args.no_ceiling:
        report.ceilings = ceilings(paths, model.preprocess_spec, engines.usable_cpus(), repeats)
        for ceiling in report.ceilings:
            print(f"{ceiling.name}: {ceiling.items_per_s:.1f} 画像/秒", flush=True)
    try:
        report.outcomes = run_all(setup, chosen, repeats)
    except ImageReadError as err:
        print(f"読めない画像があります: {err} (読める画像だけのフォルダーで測ってください)", file=sys.stderr)
        return 1
    print()
    print(report.table().to_markdown())
    for path in write(report, args.out):
        print(f"書き出し: {path}")
    return 0 if all(o.correct for o in report.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
