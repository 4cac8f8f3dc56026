"""NVIDIA DALI pipelines built from a model's :class:`~helpers.models.PreprocessSpec`.

One pipeline reads JPEG/PNG files, decodes them (``device="gpu"``: nvJPEG through the ``mixed``
decoder, output on the GPU; ``"cpu"``: libjpeg-turbo), resizes, centre-crops or letterboxes and
normalises them exactly the way the model's own processor does, and hands float32
``[B, 3, size, size]`` batches to PyTorch::

    pipe = build_pipeline(files, model.preprocess_spec, batch_size=64, device=default_device())
    for batch in DALIGenericIterator(pipe, OUTPUT_MAP, reader_name=READER_NAME,
                                     last_batch_policy=LastBatchPolicy.PARTIAL):
        pixels, positions = batch[0]["pixels"], batch[0]["labels"]   # labels: [B, 1]

:func:`iter_preprocessed` is the robust form for folders of arbitrary files (used by
``helpers.engines``): every file gets its pixels or its own error, odd files go through PIL.
:func:`training_pipeline` is a training and validation pipeline for a small CNN (the tests' form of
notebook 04's: shuffling, random crops and flips; every file exactly once per epoch).

Matching the PIL reference (:func:`helpers.models.preprocess_with_spec`): the geometry is the
spec's (:meth:`~helpers.models.PreprocessSpec.geometry`): :func:`iter_preprocessed` computes every
resize size and crop offset on the host from the file's header and passes them per sample;
:func:`build_pipeline` computes them in the graph from the file's header with integer arithmetic,
the same except on 28 sizes of LINE's letterbox (see :func:`_graph_geometry`). DALI's CPU JPEG
decoder and PIL both use libjpeg-turbo (whether they give the same pixels was not measured alone);
decoding and resizing together, measured on the sample photos: a mean absolute difference of
0.10-0.15 grey levels (of 255),
fewer than 0.5 % of values off by more than 2 levels, at most 6-16 levels at sharp edges (more
for stronger shrinking). The GPU decoder (nvJPEG) may differ from libjpeg-turbo by a few levels
more (not measured here).

DALI is optional: importing this module does not import DALI; the functions that need it raise
:class:`DaliUnavailableError` with the fix. A machine without a GPU runs ``device="cpu"``
pipelines only (``device_id=None``); :func:`default_device` picks the right one.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image

from helpers import data, env
from helpers.models import CLIP_MEAN, CLIP_STD, PreprocessSpec
from helpers.reading import read_pixels

if TYPE_CHECKING:
    from nvidia.dali.data_node import DataNode
    from nvidia.dali.pipeline import Pipeline

__all__ = [
    "DALI_FORMATS",
    "DALI_MODES",
    "OUTPUT_MAP",
    "READER_NAME",
    "TRAIN_OUTPUTS",
    "DaliUnavailableError",
    "DecoderKnobs",
    "Device",
    "Fallbacks",
    "FileSource",
    "available",
    "build_pipeline",
    "decode_and_preprocess",
    "default_device",
    "host_geometry",
    "iter_preprocessed",
    "preprocess_files",
    "preprocess_images",
    "route",
    "route_reason",
    "training_pipeline",
]

Device = Literal["cpu", "gpu"]

READER_NAME = "Reader"
"""The name of the file reader in :func:`build_pipeline` (for ``DALIGenericIterator(reader_name=...)``)."""
OUTPUT_MAP = ["pixels", "labels"]
"""The outputs of :func:`build_pipeline`, in order (for ``DALIGenericIterator``)."""

DALI_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG"})
"""File formats (as PIL names them) that :func:`iter_preprocessed` gives to DALI; the rest go to PIL."""
DALI_MODES: frozenset[str] = frozenset({"RGB", "L"})
"""PIL modes DALI decodes the way ``helpers.data.open_image`` does (CMYK, 16-bit, palette and
alpha go through PIL, which converts them by the course's rules)."""

HW_DECODER_LOAD = 0.65
"""DALI's default share of JPEG work for the hardware decoder (A100/H100; T4 has none)."""

_TAIL_BYTES = 4096
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND"


class DaliUnavailableError(RuntimeError):
    """DALI cannot be used here (not installed, or a GPU pipeline on a machine without a GPU)."""


def available() -> bool:
    """True when NVIDIA DALI imports here (CPU pipelines work; GPU ones also need :func:`env.dali_gpu_ok`)."""
    return env.dali_version() is not None


def default_device() -> Device:
    """``"gpu"`` when DALI can run GPU (``mixed``) pipelines here, else ``"cpu"``."""
    return "gpu" if env.dali_gpu_ok() else "cpu"


def _require(device: str) -> None:
    if device not in ("cpu", "gpu"):
        raise ValueError(f'device must be "cpu" or "gpu", got {device!r}')
    if not available():
        raise DaliUnavailableError(
            f"NVIDIA DALI を使えません: {env.dali_problem()} (または DataLoader の経路を使ってください)。"
        )
    if device == "gpu" and not env.cuda_available():
        raise DaliUnavailableError(
            'GPU がないので DALI の "gpu" パイプライン (mixed デコーダー) は動きません:'
            ' device="cpu" を使ってください (helpers.dali.default_device() が選びます)。'
        )


def _device_id(device: str) -> int | None:
    """The ``device_id`` of a pipeline: the current CUDA device for ``"gpu"``, None (no GPU) for ``"cpu"``."""
    return torch.cuda.current_device() if device == "gpu" else None


# ---------------------------------------------------------------- the graph


def _interp(spec: PreprocessSpec) -> Any:
    import nvidia.dali.types as types

    return types.INTERP_CUBIC if spec.interpolation == "bicubic" else types.INTERP_LINEAR


def _graph_geometry(encoded: DataNode, spec: PreprocessSpec) -> tuple[Any, Any, Any, Any]:
    """(width, height, crop_pos_x, crop_pos_y) computed in the graph from the encoded file's header.

    ``fn.experimental.peek_image_shape`` reads the size (EXIF orientation applied, like the
    decoder) from the encoded bytes on the CPU, so the geometry never waits for the ``mixed``
    decoder's GPU output: ``images.shape()`` of that output is a GPU → CPU transition, which only
    the asynchronous pipelined executor allows (``exec_async=False, exec_pipelined=False`` failed
    at definition time; tests/test_dali_definition.py).

    Integer arithmetic: the shorter-side sizes and both crop roundings equal
    :meth:`PreprocessSpec.geometry`; LINE's letterbox is rounded half to even on the exact ratio,
    where LINE's processor rounds a float product: they differ on 28 of the 2 million size pairs
    up to 2000 px (e.g. 105×192 → 123 against 122). :func:`iter_preprocessed` passes the host's
    geometry instead, exact for every size.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.math as dmath
    import nvidia.dali.types as types

    def as_int(flag: Any) -> Any:
        return fn.cast(flag, dtype=types.INT32)

    shape = fn.experimental.peek_image_shape(encoded)  # [H, W, C] per sample, from the header (CPU)
    height, width, target, size = shape[0], shape[1], spec.target, spec.size
    if spec.resize == "squash":
        return size, size, 0.0, 0.0
    if spec.resize == "shorter":  # like int(target * long / short)
        short = dmath.min(height, width)
        new_w, new_h = (target * width) // short, (target * height) // short
    elif spec.resize == "longer":  # like round(side * target / long), half to even, at least 1
        long = dmath.max(height, width)

        def rounded(side: Any) -> Any:
            quotient = (target * side) // long
            twice_rest = 2 * (target * side - quotient * long)
            odd = (quotient - 2 * (quotient // 2)) == 1
            up = (twice_rest > long) | ((twice_rest == long) & odd)
            return dmath.max(quotient + as_int(up), 1)

        new_w, new_h = rounded(width), rounded(height)
    else:
        raise ValueError(f"unknown resize rule {spec.resize!r}")

    def as_float(value: Any) -> Any:
        return fn.cast(value, dtype=types.FLOAT)

    def position(new: Any) -> Any:
        if spec.crop_rounding == "floor" or spec.resize == "longer":
            return 0.5  # truncated (see preprocess_images): floor offsets, like // 2
        spare = new - size  # >= 0: the shorter side is resized to the crop size or more
        half = spare // 2 + as_int((spare - 4 * (spare // 4)) == 3)  # round(spare / 2), half to even
        return as_float(half) / as_float(dmath.max(spare, 1))

    return as_float(new_w), as_float(new_h), position(new_w), position(new_h)


def preprocess_images(
    images: DataNode, spec: PreprocessSpec, geometry: DataNode | None = None, encoded: DataNode | None = None
) -> DataNode:
    """Decoded HWC uint8 RGB ``images`` (CPU or GPU) → float32 CHW ``spec.size`` squares, like PIL.

    Call inside a pipeline definition. ``geometry``: per sample float32 ``[width, height,
    crop_pos_x, crop_pos_y]`` computed on the host with :meth:`PreprocessSpec.geometry`
    (:func:`host_geometry`); without it the graph computes it from the header of ``encoded``, the
    files the images were decoded from (:func:`_graph_geometry`). The letterbox is filled with
    ``spec.pad_value`` (given to DALI in
    normalised units). Mean and std are on the 0-1 scale in ``spec``; DALI works on 0-255, hence
    the ``* 255``.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if geometry is not None:
        new_w, new_h, pos_x, pos_y = geometry[0], geometry[1], geometry[2], geometry[3]
        rounding = "round"  # the host's positions land on whole pixels: round away float error
    else:
        if encoded is None:
            raise ValueError("preprocess_images needs the host's geometry or the encoded files")
        new_w, new_h, pos_x, pos_y = _graph_geometry(encoded, spec)
        exact_positions = spec.crop_rounding == "half_even" and spec.resize == "shorter"
        rounding = "round" if exact_positions else "truncate"  # 0.5 truncated: floor offsets, like // 2
    resized = fn.resize(
        images,
        resize_x=new_w,
        resize_y=new_h,
        interp_type=_interp(spec),
        antialias=True,  # PIL's resize filters also widen when shrinking
    )
    fill = round(spec.pad_value * 255) / 255  # PIL pads with an 8-bit grey level
    return fn.crop_mirror_normalize(
        resized,
        crop=(spec.size, spec.size),
        crop_pos_x=pos_x,
        crop_pos_y=pos_y,
        rounding=rounding,
        out_of_bounds_policy="pad",  # letterbox: the window is larger than the picture
        fill_values=[(fill - m) / s for m, s in zip(spec.mean, spec.std, strict=True)],
        mean=[m * 255 for m in spec.mean],
        std=[s * 255 for s in spec.std],
        dtype=types.FLOAT,
        output_layout="CHW",
    )


def host_geometry(spec: PreprocessSpec, width: int, height: int) -> list[float]:
    """``[width, height, crop_pos_x, crop_pos_y]`` for :func:`preprocess_images`: the spec's
    :meth:`~PreprocessSpec.geometry` with the window's offset as DALI's normalised position
    (``offset / (resized - size)``: DALI multiplies back and rounds)."""
    where = spec.geometry(width, height)

    def position(offset: int, new: int) -> float:
        spare = new - spec.size
        return offset / spare if spare else 0.0

    return [where.width, where.height, position(where.left, where.width), position(where.top, where.height)]


def decode_and_preprocess(
    encoded: DataNode,
    spec: PreprocessSpec,
    device: Device = "cpu",
    hw_decoder_load: float = HW_DECODER_LOAD,
    fancy_upsampling: bool = True,
    geometry: DataNode | None = None,
    hybrid_huffman_threshold: int | None = None,
) -> DataNode:
    """Encoded files → decoded RGB (``mixed`` on the GPU, else CPU) → :func:`preprocess_images`.

    ノートブック 03 の発展 3 (デコーダーの 2 つのつまみ).

    EXIF orientation: recent DALI releases apply it in the decoder (``adjust_orientation``), older
    ones do not, so :func:`iter_preprocessed` sends EXIF-rotated files to PIL (see :func:`route`)
    and the pipeline only ever sees upright files. ``fancy_upsampling`` makes nvJPEG upsample
    chroma the way libjpeg-turbo (and so PIL) does. The ``mixed`` decoder's two knobs:
    ``hw_decoder_load``, the share of JPEGs for the hardware JPEG decoder of GPUs that have one
    (A100, A30, H100; a T4 has none; DALI's default 0.65); ``hybrid_huffman_threshold``, the picture
    size in pixels above which nvJPEG uses its hybrid Huffman decoder (which, DALI says, still
    largely uses the CPU); below it the host-side Huffman decoder (None: DALI's default, 1,000,000 px
    in DALI 2.x, so a 1260×750 photo's Huffman decoding is on the CPU). Both are DALI's defaults here:
    this course has measured neither on a GPU;
    ``python -m helpers.bench --dali-hybrid-threshold ... --dali-hw-decoder-load ...`` sweeps them.
    ``geometry``: see :func:`preprocess_images`.
    """
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types

    if device == "gpu":
        knobs: dict[str, Any] = {"hw_decoder_load": hw_decoder_load}
        if hybrid_huffman_threshold is not None:
            knobs["hybrid_huffman_threshold"] = int(hybrid_huffman_threshold)
        images = fn.decoders.image(
            encoded, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=fancy_upsampling, **knobs
        )
    else:
        images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return preprocess_images(images, spec, geometry, encoded)


def _reader_source(source: str | Path | Sequence[str | Path], labels: Sequence[int] | None) -> dict[str, Any]:
    """``fn.readers.file`` arguments for a folder (``file_root``: one sub-folder per class) or a file list."""
    if isinstance(source, str | Path):
        folder = Path(source)
        if not folder.is_dir():
            raise NotADirectoryError(f"画像フォルダーが見つかりません: {folder}")
        return {"file_root": str(folder)}
    files = [str(p) for p in source]
    if not files:
        raise ValueError("no files given")
    if labels is None:
        return {"files": files}
    if len(labels) != len(files):
        raise ValueError("labels and files differ in length")
    return {"files": files, "labels": [int(x) for x in labels]}


def build_pipeline(
    source: str | Path | Sequence[str | Path],
    spec: PreprocessSpec,
    batch_size: int,
    device: Device = "cpu",
    *,
    labels: Sequence[int] | None = None,
    num_threads: int = 2,
    prefetch_queue_depth: int = 2,
    hw_decoder_load: float = HW_DECODER_LOAD,
    fancy_upsampling: bool = True,
    hybrid_huffman_threshold: int | None = None,
    **pipeline_options: Any,
) -> Pipeline:
    """A DALI pipeline: ``fn.readers.file`` → decode → resize/crop/pad → normalise, outputs ``OUTPUT_MAP``.

    ノートブック 03 の発展 1・2 (モデルの前処理、非同期実行) と、講座のエンジンの前処理.

    ``source``: a list of files (labels: ``labels``, default their positions 0, 1, ...), or a
    folder (DALI's ``file_root`` mode: one sub-folder per class, labelled in sorted order; files
    directly in the folder are ignored). The reader is named :data:`READER_NAME`, keeps the
    order (no shuffling) and gives labels as int32 ``[B, 1]``. ``device="gpu"`` decodes with the
    ``mixed`` decoder on the current CUDA device and returns GPU tensors; ``"cpu"`` runs every
    operator on the CPU with ``device_id=None`` (works without a GPU). ``num_threads`` CPU
    threads decode and resize; ``prefetch_queue_depth`` batches are prepared ahead.
    ``pipeline_options`` go to the ``Pipeline`` (e.g. ``exec_async=False, exec_pipelined=False``
    for a pipeline that works only when asked, with no overlap).
    """
    _require(device)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    reader_args: dict[str, Any] = {
        "name": READER_NAME,
        "random_shuffle": False,
        **_reader_source(source, labels),
    }
    device_id = _device_id(device)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_queue_depth,
        seed=0,
        **pipeline_options,
    )
    def clip_pipeline():
        encoded, file_labels = fn.readers.file(**reader_args)
        pixels = decode_and_preprocess(
            encoded,
            spec,
            device,
            hw_decoder_load,
            fancy_upsampling,
            hybrid_huffman_threshold=hybrid_huffman_threshold,
        )
        return pixels, file_labels

    return clip_pipeline()


def preprocess_files(
    files: Sequence[str | Path], spec: PreprocessSpec, device: Device = "cpu", batch_size: int = 8
) -> torch.Tensor:
    """:func:`build_pipeline` over ``files``: one epoch, float32 ``[N, 3, size, size]`` on the CPU, in order.

    Notebook 03 compares it with the PIL reference (発展 1). A copy of every batch: DALI reuses its buffers.
    """
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    pipe = build_pipeline(files, spec, batch_size, device)
    policy = LastBatchPolicy.PARTIAL
    loader = DALIGenericIterator(pipe, OUTPUT_MAP, reader_name=READER_NAME, last_batch_policy=policy)
    rows: dict[int, torch.Tensor] = {}
    for batch in loader:
        pixels = batch[0]["pixels"].to("cpu", copy=True)
        rows.update(zip(batch[0]["labels"].view(-1).tolist(), pixels, strict=True))
    if sorted(rows) != list(range(len(files))):
        raise RuntimeError(f"DALI gave positions {sorted(rows)} for {len(files)} files")
    return torch.stack([rows[i] for i in range(len(files))])


TRAIN_OUTPUTS = ["images", "labels"]
"""The outputs of :func:`training_pipeline`, in order (for ``DALIGenericIterator``)."""


def training_pipeline(
    source: str | Path | Sequence[str | Path],
    batch_size: int,
    decoder: Literal["cpu", "mixed"] = "cpu",
    *,
    augment: bool = True,
    size: int = 64,
    area: tuple[float, float] = (0.75, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    labels: Sequence[int] | None = None,
    num_threads: int = 2,
    **pipeline_options: Any,
) -> Pipeline:
    """A training (``augment=True``) or validation pipeline for a small CNN, outputs :data:`TRAIN_OUTPUTS`.

    テスト (tests/test_dali_epoch.py, tests/gpu) が使う学習用パイプライン (04 は同じ形をセルに書く).

    Training: shuffled order, a random crop of ``area`` of the picture at an aspect ratio in
    ``ratio``, resized to ``size``², flipped left-right half of the time. Validation: the file
    order, shorter side to ``size``, centre crop. Both normalise with ``mean``/``std`` (0-1
    scale) into float32 ``[B, 3, size, size]`` and give labels as int32 ``[B, 1]``. ``source``
    and ``labels`` as in :func:`build_pipeline` (a folder: one sub-folder per class). ``decoder``
    ``"mixed"`` decodes on the GPU and runs every later operator there (GPU tensors out); ``"cpu"``
    runs all on the CPU with ``device_id=None``. With ``DALIGenericIterator(...,
    reader_name=READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)`` every
    epoch gives every file exactly once: ``pad_last_batch=True`` fills the last batch with copies
    that the iterator drops, instead of files of the next epoch, which with shuffling (by
    ``random_shuffle`` or ``shuffle_after_epoch``) made later epochs miss some files and repeat
    others (tests/test_dali_epoch.py).
    """
    if decoder not in ("cpu", "mixed"):
        raise ValueError(f'decoder must be "cpu" or "mixed", got {decoder!r}')
    _require("gpu" if decoder == "mixed" else "cpu")
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    device = "gpu" if decoder == "mixed" else "cpu"  # デコーダーが GPU なら、後の演算子も GPU
    reader_args = _reader_source(source, labels)
    normalize = {"dtype": types.FLOAT, "output_layout": "CHW", "device": device}
    normalize |= {"mean": [m * 255 for m in mean], "std": [s * 255 for s in std]}  # DALI は 0〜255 の尺度
    device_id = _device_id(device)

    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, **pipeline_options
    )
    def cnn_pipeline():
        jpegs, labels = fn.readers.file(
            **reader_args,
            name=READER_NAME,
            random_shuffle=augment,  # 学習: 読む順をシャッフル (フォルダーはクラス順)
            pad_last_batch=True,  # 最後のバッチの空きを次のエポックの画像で埋めない
        )
        images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB)
        if augment:
            images = fn.random_resized_crop(
                images, device=device, size=(size, size), random_area=area, random_aspect_ratio=ratio
            )
            flip = fn.random.coin_flip(probability=0.5)  # 1 枚ごとに 0 か 1
            images = fn.crop_mirror_normalize(images, mirror=flip, **normalize)
        else:
            images = fn.resize(images, device=device, resize_shorter=size)
            images = fn.crop_mirror_normalize(images, crop=(size, size), **normalize)
        if device == "gpu":
            labels = labels.gpu()
        return images, labels

    return cnn_pipeline()


# ---------------------------------------------------------------- a picklable per-sample source


class FileSource:
    """A per-sample ``fn.external_source`` callback: sample ``i`` → (file bytes, ``[i]`` as int32).

    ノートブック 03 の発展 4.

    Picklable (a module-level class holding only paths), so it works with ``parallel=True`` and
    ``py_start_method="spawn"``. A per-sample source only ever makes **full** batches: the epoch
    ends at the first sample that raises ``StopIteration`` and a partial last batch is dropped.
    Give ``batch_size`` to pad the epoch to a multiple of it with copies of the last file whose
    position is ``-1`` (drop those), so that every file comes through.
    """

    def __init__(self, files: Sequence[str | Path], batch_size: int | None = None) -> None:
        self.files = [str(p) for p in files]
        n = len(self.files)
        self.length = n if not batch_size or n == 0 else -(-n // batch_size) * batch_size

    def __len__(self) -> int:
        return self.length

    def __call__(self, sample_info: Any) -> tuple[Any, Any]:
        import numpy as np

        i = sample_info.idx_in_epoch
        if i >= self.length:
            raise StopIteration
        position = i if i < len(self.files) else -1
        encoded = np.fromfile(self.files[min(i, len(self.files) - 1)], dtype=np.uint8)
        return encoded, np.array([position], dtype=np.int32)


# ---------------------------------------------------------------- robust iteration over arbitrary files


_EXIF_ORIENTATION = 0x0112


@dataclass
class Fallbacks:
    """Which files :func:`iter_preprocessed` decoded with DALI, and which with PIL and why: never silent.

    ``by_design``: files the header check sends to PIL (EXIF-rotated, CMYK, 16-bit, other formats...),
    by reason. ``after_error``: files of a batch DALI failed on (a broken file, CUDA out of memory, an
    nvJPEG or driver failure), redone with PIL, by DALI's error. Files that no decoder can read are
    error rows, not counted here.
    """

    dali: int = 0
    by_design: Counter = field(default_factory=Counter)
    after_error: Counter = field(default_factory=Counter)
    pil_files: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Position → ``("by_design" | "after_error", reason)`` of each file decoded with PIL."""

    def add(self, other: Fallbacks) -> None:
        """Add another counter's numbers to this one (the Ray driver sums its actors')."""
        self.dali += other.dali
        self.by_design.update(other.by_design)
        self.after_error.update(other.after_error)

    @property
    def pil(self) -> int:
        """Files decoded with PIL instead of DALI (both kinds)."""
        return sum(self.by_design.values()) + sum(self.after_error.values())

    @property
    def pil_share(self) -> float:
        """The PIL files as a share of all decoded files (0 when none were decoded)."""
        total = self.dali + self.pil
        return self.pil / total if total else 0.0

    def describe(self) -> str:
        """One line, e.g. ``DALI 510, PIL 2 by design (EXIF 回転 2), 0 after DALI errors``."""

        def reasons(counts: Counter) -> str:
            return f" ({', '.join(f'{r} {n}' for r, n in counts.most_common())})" if counts else ""

        return (
            f"DALI {self.dali}, PIL {sum(self.by_design.values())} by design{reasons(self.by_design)},"
            f" {sum(self.after_error.values())} after DALI errors{reasons(self.after_error)}"
        )


def route_reason(path: str | Path) -> str | None:
    """Why :func:`iter_preprocessed` sends ``path`` to PIL (a short reason), or None for DALI.

    DALI gets complete 8-bit RGB/grayscale JPEG and PNG files within ``helpers.data.MAX_PIXELS``.
    Everything else goes to PIL (``helpers.data.open_image``), which converts odd modes (CMYK,
    16-bit, palette, alpha), turns EXIF-rotated photos upright, and reports unreadable files with its reason:
    empty, not an image, too large, truncated (no end marker in the last bytes).
    """
    return _inspect(path)[0]


def _inspect(path: str | Path) -> tuple[str | None, tuple[int, int]]:
    """:func:`route_reason` and the picture's (width, height) from the header ((0, 0) if unreadable)."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                fmt, mode, (width, height) = image.format, image.mode, image.size
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        if fmt not in DALI_FORMATS:
            return f"{fmt} 形式", (width, height)
        if mode not in DALI_MODES:
            return f"{mode} モード", (width, height)
        if width * height > data.MAX_PIXELS:
            return "大きすぎる", (width, height)
        if orientation not in (None, 1):  # rotated by EXIF: DALI applies it only in some versions
            return "EXIF 回転", (width, height)
        bits = 8
        with open(path, "rb") as handle:
            if fmt == "PNG":
                handle.seek(24)
                bits = handle.read(1)[0]  # IHDR bit depth: 16-bit RGB PNGs open as "RGB" in PIL
            handle.seek(max(0, path.stat().st_size - _TAIL_BYTES))
            tail = handle.read()
    except Exception:  # unreadable for PIL too: open_image will say why
        return "読めない", (0, 0)
    if bits != 8:
        return f"{bits} ビット", (width, height)
    complete = (_JPEG_END if fmt == "JPEG" else _PNG_END) in tail
    return (None if complete else "末尾が欠けている"), (width, height)


def route(path: str | Path) -> Literal["dali", "pil"]:
    """Where :func:`iter_preprocessed` decodes ``path``: ``"dali"`` or ``"pil"`` (:func:`route_reason`)."""
    return "dali" if route_reason(path) is None else "pil"


def _first_line(err: BaseException) -> str:
    """The telling line of a DALI error, without the pipeline boilerplate and file paths (≤ 120 chars).

    DALI wraps the cause ("Assert on ... failed", "CUDA error: out of memory") in lines of context:
    "Critical error in pipeline:", the operator, a Python traceback, "encountered:", the C++ context.
    """
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1 :]
    skip = ("Critical error in pipeline", 'File "', "which was used", "C++ context", "Current pipeline")
    useful = [line for line in lines if not line.startswith(skip)]
    reason = useful[0] if useful else type(err).__name__
    return re.sub(r"\s*File: \S+", "", reason)[:120]


@dataclass(frozen=True)
class DecoderKnobs:
    """The ``mixed`` decoder's knobs (see :func:`decode_and_preprocess`); ignored on the CPU."""

    hw_decoder_load: float = HW_DECODER_LOAD
    hybrid_huffman_threshold: int | None = None


class _HostBatches:
    """External-source iterator: batches of (file bytes, position [1], geometry [4]) read on the host."""

    def __init__(
        self, files: list[Path], positions: list[int], geometry: list[list[float]], batch: int
    ) -> None:
        self.files, self.positions, self.geometry, self.batch = files, positions, geometry, batch
        self.next = 0

    def __iter__(self) -> _HostBatches:
        self.next = 0
        return self

    def __next__(self) -> tuple[list[Any], list[Any], list[Any]]:
        import numpy as np

        if self.next >= len(self.files):
            raise StopIteration
        part = range(self.next, min(self.next + self.batch, len(self.files)))
        self.next = part.stop
        return (
            [np.fromfile(self.files[i], dtype=np.uint8) for i in part],
            [np.array([self.positions[i]], dtype=np.int32) for i in part],
            [np.array(self.geometry[i], dtype=np.float32) for i in part],
        )


def _host_pipeline(
    files: list[Path],
    positions: list[int],
    sizes: list[tuple[int, int]],
    spec: PreprocessSpec,
    batch_size: int,
    device: Device,
    num_threads: int,
    knobs: DecoderKnobs,
) -> Pipeline:
    """The engine's pipeline: bytes, positions and :func:`host_geometry` from the host, then
    :func:`decode_and_preprocess` (every size and crop offset exactly the spec's)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    source = _HostBatches(files, positions, [host_geometry(spec, w, h) for w, h in sizes], batch_size)

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=_device_id(device),
        prefetch_queue_depth=2,
        seed=0,
    )
    def engine_pipeline():
        encoded, labels, geometry = fn.external_source(
            source=source, num_outputs=3, dtype=[types.UINT8, types.INT32, types.FLOAT]
        )
        pixels = decode_and_preprocess(
            encoded,
            spec,
            device,
            knobs.hw_decoder_load,
            geometry=geometry,
            hybrid_huffman_threshold=knobs.hybrid_huffman_threshold,
        )
        return pixels, labels

    return engine_pipeline()


def _dali_rows(
    paths: Sequence[Path],
    positions: list[int],
    sizes: list[tuple[int, int]],
    spec: PreprocessSpec,
    batch_size: int,
    device: Device,
    num_threads: int,
    knobs: DecoderKnobs,
) -> Iterator[tuple[int, torch.Tensor | str]]:
    """(position, pixels [3, H, W]) for each of ``positions``, in order; DALI's error (first line)
    instead of the pixels when DALI failed. ``sizes[i]`` is ``paths[i]``'s (width, height).

    When a batch fails (a file DALI cannot decode after all, or CUDA/nvJPEG trouble), its files come
    back with the error (the caller decodes them with PIL, one by one, and counts them) and a fresh
    pipeline continues with the rest.
    """
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    remaining = list(positions)
    while remaining:
        done = 0
        try:
            pipe = _host_pipeline(
                [paths[i] for i in remaining],
                remaining,
                [sizes[i] for i in remaining],
                spec,
                batch_size,
                device,
                num_threads,
                knobs,
            )
            batches = DALIGenericIterator(pipe, OUTPUT_MAP, last_batch_policy=LastBatchPolicy.PARTIAL)
            for batch in batches:
                # a copy: the rows may outlive this pipeline (DALI's tensors are shared, not copied)
                pixels, labels = batch[0]["pixels"].clone(), batch[0]["labels"].view(-1).tolist()
                for row, position in enumerate(labels):
                    yield int(position), pixels[row]
                done += len(labels)
            remaining = []
        except DaliUnavailableError:
            raise
        except RuntimeError as err:  # "Critical error in pipeline", CUDA OOM...: this batch goes to PIL
            reason = _first_line(err)
            failed, remaining = remaining[done : done + batch_size], remaining[done + batch_size :]
            for position in failed:
                yield position, reason
        finally:
            batches = pipe = None


def iter_preprocessed(
    paths: Sequence[Path],
    spec: PreprocessSpec,
    batch_size: int,
    device: Device,
    num_threads: int = 2,
    fallbacks: Fallbacks | None = None,
    knobs: DecoderKnobs | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, dict[int, str]]]:
    """Preprocess ``paths`` with DALI in batches: yields ``(indices, pixels, errors)``.

    講座のエンジン (helpers.engines) の DALI の経路.

    Yield ``k`` covers the positions ``k * batch_size`` ... ``(k + 1) * batch_size - 1`` of
    ``paths``: ``indices`` lists (ascending) those whose pixels are in ``pixels`` (float32
    ``[len(indices), 3, size, size]``, normalised like the model's processor; on the GPU when
    ``device="gpu"``, else on the CPU) and ``errors`` maps each of the others to a short reason
    (the same one ``helpers.data.open_image`` gives). Every position appears exactly once.

    Files pass a cheap header check first (:func:`route_reason`): complete 8-bit RGB/grey JPEG and PNG
    go to a DALI pipeline; odd ones (CMYK, 16-bit, palette, alpha, other formats) and broken
    ones go through PIL and :func:`helpers.models.preprocess_with_spec`. If DALI still fails on a
    batch, that batch is redone with PIL file by file, so one bad file never takes others down.
    ``fallbacks`` (a :class:`Fallbacks`), when given, counts which decoder did what and why.
    Every size and crop offset is computed on the host from the header (:func:`host_geometry`), so
    DALI's geometry is exactly the spec's (and PIL's); ``knobs`` set the GPU decoder's options.
    """
    _require(device)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    paths = [Path(p) for p in paths]
    target = torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")
    headers = [_inspect(p) for p in paths]  # one header read per file: (reason or None = DALI, size)
    reasons, sizes = [reason for reason, _ in headers], [size for _, size in headers]
    on_dali = [i for i, reason in enumerate(reasons) if reason is None]
    stream = _dali_rows(paths, on_dali, sizes, spec, batch_size, device, num_threads, knobs or DecoderKnobs())
    try:
        yield from _assemble(paths, reasons, stream, spec, batch_size, target, fallbacks or Fallbacks())
    finally:
        stream.close()  # releases the pipeline now, not when the garbage collector gets to it


def _assemble(
    paths: list[Path],
    reasons: list[str | None],
    stream: Iterator[tuple[int, torch.Tensor | None]],
    spec: PreprocessSpec,
    batch_size: int,
    target: torch.device,
    fallbacks: Fallbacks,
) -> Iterator[tuple[list[int], torch.Tensor, dict[int, str]]]:
    """Group DALI rows and PIL fallbacks into the batches :func:`iter_preprocessed` yields."""
    pending: dict[int, torch.Tensor | str] = {}
    for start in range(0, len(paths), batch_size):
        chunk = range(start, min(start + batch_size, len(paths)))
        wanted = [i for i in chunk if reasons[i] is None]
        while any(i not in pending for i in wanted):
            position, pixels = next(stream)
            pending[position] = pixels
        rows: dict[int, torch.Tensor] = {}
        errors: dict[int, str] = {}
        for i in chunk:
            pixels = pending.pop(i, None)
            if isinstance(pixels, torch.Tensor):
                fallbacks.dali += 1
                rows[i] = pixels
                continue
            row, error = read_pixels(paths[i], spec)  # the engines' one read path, exact decode
            if row is None:
                errors[i] = error
                continue
            rows[i] = row.to(target)
            if pixels is None:  # sent to PIL by the header check
                fallbacks.by_design[reasons[i]] += 1
                fallbacks.pil_files[i] = ("by_design", str(reasons[i]))
            else:  # DALI failed on its batch
                fallbacks.after_error[pixels] += 1
                fallbacks.pil_files[i] = ("after_error", pixels)
        indices = sorted(rows)
        batch = (
            torch.stack([rows[i] for i in indices])
            if indices
            else torch.empty((0, 3, spec.size, spec.size), dtype=torch.float32, device=target)
        )
        yield indices, batch, errors
