"""Runtimes and precisions for a loaded CLIP model: eager PyTorch or ONNX Runtime, fp32 to INT8.

::

    from helpers import runtimes
    choice = runtimes.choose("onnx", "int8")          # validated for this machine, or refused
    fast = runtimes.use(model, choice)                 # a ClipModel: same interface, other runtime

Valid pairs (:func:`valid_pairs`): ``torch`` with ``fp32``, ``bf16`` (a CPU with native bfloat16:
:func:`~helpers.runtimes.eager.native_bf16`; or a CUDA GPU that has it) or ``fp16`` (CUDA);
``onnx`` with ``fp32`` or ``int8`` on the CPU and ``fp16`` on CUDA (ONNX Runtime's CUDA provider,
or TensorRT's with ``tensorrt=True``). ``auto`` keeps the engines' behaviour: fp16 on CUDA, fp32
on every CPU; bfloat16 and INT8 run only when asked for. Any other pair is refused in one line
that lists the valid ones (:class:`~helpers.runtimes.ort.RuntimeUnavailable`).

``int8`` is dynamic quantisation (:func:`~helpers.runtimes.quantize.int8_dynamic`) of both towers;
static QDQ quantisation, calibrated on photos, is :func:`build` with ``"int8-static"`` (notebook 08).
Exported files are cached per model (:func:`~helpers.runtimes.export.exported`). Nothing here falls
back to another runtime: a missing onnxruntime, an export that fails or a provider that does not
load is an error.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from helpers import env
from helpers.data import open_image, sample_photos
from helpers.models import ClipModel
from helpers.runtimes import quantize
from helpers.runtimes.eager import AutocastClip, native_bf16
from helpers.runtimes.export import Exported, ExportError, exported
from helpers.runtimes.ort import PROVIDERS, OnnxClip, RuntimeUnavailable, import_onnxruntime, session

__all__ = [
    "PRECISIONS",
    "RUNTIMES",
    "Choice",
    "ExportError",
    "Exported",
    "RuntimeUnavailable",
    "build",
    "calibration_batches",
    "choose",
    "exported",
    "native_bf16",
    "tensorrt_available",
    "use",
    "valid_pairs",
]

RUNTIMES: tuple[str, ...] = ("torch", "onnx")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16", "int8")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Choice:
    """A validated runtime and precision (never ``auto``) for ``device``; ``provider`` for ONNX."""

    runtime: str
    precision: str
    device: str
    provider: str | None = None
    """``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (ONNX Runtime's execution provider), None for torch."""

    @property
    def label(self) -> str:
        """``"torch fp32"``, ``"onnx int8 (CPUExecutionProvider)"``..."""
        where = f" ({PROVIDERS[self.provider]})" if self.provider else ""
        return f"{self.runtime} {self.precision}{where}"


def _bf16_on(device: str) -> tuple[bool, str]:
    if device == "cuda":
        ok = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
        return ok, "GPU の bfloat16" if ok else "この GPU に bfloat16 の演算器なし"
    return native_bf16()


def valid_pairs(device: str | None = None) -> list[tuple[str, str]]:
    """The (runtime, precision) pairs that can run on ``device`` (default: the engines' device)."""
    device = torch.device(device or env.device()).type
    bf16 = [("torch", "bf16")] if _bf16_on(device)[0] else []
    if device == "cuda":
        return [("torch", "fp32"), ("torch", "fp16"), *bf16, ("onnx", "fp16")]
    return [("torch", "fp32"), *bf16, ("onnx", "fp32"), ("onnx", "int8")]


def choose(
    runtime: str = "torch", precision: str = "auto", device: str | None = None, tensorrt: bool = False
) -> Choice:
    """Validate ``runtime``/``precision`` for ``device``; ``auto`` → fp16 on CUDA, fp32 on the CPU.
    ``tensorrt``: ONNX fp16 through TensorRT's provider instead of CUDA's. Refuses in one line."""
    device = torch.device(device or env.device()).type
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(
            f"ランタイム {runtime!r} はありません: {' / '.join(RUNTIMES)} から選んでください"
        )
    if precision not in PRECISIONS:
        raise RuntimeUnavailable(
            f"精度 {precision!r} はありません: {' / '.join(PRECISIONS)} から選んでください"
        )
    resolved = precision if precision != "auto" else ("fp16" if device == "cuda" else "fp32")
    pairs = valid_pairs(device)
    if (runtime, resolved) not in pairs:
        why = ""
        if resolved == "bf16":
            why = f" (bf16: {_bf16_on(device)[1]})"
        listed = ", ".join(f"{r} {p}" for r, p in pairs)
        where = "GPU" if device == "cuda" else "CPU"
        raise RuntimeUnavailable(
            f"--runtime {runtime} --precision {resolved} はこのマシン ({where}) では使えません{why}。"
            f" 使える組み合わせ: {listed}"
        )
    if tensorrt and (runtime, resolved) != ("onnx", "fp16"):
        raise RuntimeUnavailable("TensorRT は --runtime onnx --precision fp16 (GPU) だけで使えます")
    provider = None
    if runtime == "onnx":
        provider = "tensorrt" if tensorrt else ("cuda" if device == "cuda" else "cpu")
    return Choice(runtime, resolved, device, provider)


def tensorrt_available() -> tuple[bool, str]:
    """(can ONNX Runtime's TensorRT provider run here, why not): ``tensorrt`` must import and the
    installed onnxruntime must list the provider."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "tensorrt パッケージがありません"
    try:
        ort = import_onnxruntime()
    except RuntimeUnavailable as err:
        return False, str(err)
    if PROVIDERS["tensorrt"] not in ort.get_available_providers():
        return False, f"onnxruntime {ort.__version__} に TensorrtExecutionProvider がありません"
    return True, ""


# ---------------------------------------------------------------- building files


def calibration_batches(
    model: ClipModel, paths: Sequence[str | Path] | None = None, batch: int = quantize.CALIBRATION_BATCH
) -> Iterator[np.ndarray]:
    """Float32 pixel batches for static calibration: ``paths`` (default: the course's sample photos)
    through the model's own preprocessing, ``batch`` images at a time (one batch in memory)."""
    files = [p.path for p in sample_photos()] if paths is None else [Path(p) for p in paths]
    for start in range(0, len(files), batch):
        images = [open_image(p) for p in files[start : start + batch]]
        yield model.preprocess(images).numpy()


def build(
    model: ClipModel,
    files: Exported,
    tower: str,
    precision: str,
    calibration: Callable[[], Iterator[np.ndarray]] | None = None,
) -> Path:
    """The file of ``tower`` in ``precision`` (``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``),
    made from the fp32 file when it is not cached yet. ``int8-static`` calibrates the image tower
    on ``calibration()`` (default: :func:`calibration_batches` of the sample photos)."""
    target = files.file(tower, precision)
    if target.exists():
        return target
    source = files.file(tower, "fp32")
    partial = target.with_name(target.name + ".tmp")
    if precision == "int8-dynamic":
        quantize.int8_dynamic(source, partial)
    elif precision == "int8-static":
        if tower != "image":
            raise ValueError("int8-static は画像の塔だけです (較正に写真を使います)")
        batches = calibration() if calibration is not None else calibration_batches(model)
        quantize.int8_static(source, partial, batches)
    elif precision == "fp16":
        quantize.fp16(source, target)
        return target
    elif precision != "fp32":
        raise ValueError(f"unknown ONNX precision {precision!r}")
    partial.replace(target)
    return target


_FILE_PRECISION = {"fp32": "fp32", "int8": "int8-dynamic", "fp16": "fp16"}


def use(
    model: ClipModel,
    choice: Choice,
    root: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    threads: int | None = None,
) -> ClipModel:
    """``model`` running as ``choice`` says: the model itself (torch fp32), an autocast wrapper
    (torch fp16/bf16) or an :class:`~helpers.runtimes.ort.OnnxClip` (ONNX, exported and converted
    once, then from the cache under ``root``). ``log`` gets one line on what was built or reused."""
    if choice.runtime == "torch":
        if choice.precision == "fp32":
            return model
        return AutocastClip(model, _DTYPES[choice.precision], choice.label)
    import_onnxruntime()
    files = exported(model, root)
    if log is not None:
        how = "に書き出しました" if files.built else "のキャッシュを使います"
        exporter = "/".join(sorted(set(files.exporters.values())))
        log(
            f"ONNX ({exporter}): {files.folder} {how} (ONNX Runtime fp32 と eager の{files.check.describe()})"
        )
    precision = _FILE_PRECISION[choice.precision]
    paths = [build(model, files, tower, precision) for tower in ("image", "text")]
    cache = files.folder / "trt-cache"
    image, text = (session(p, choice.provider or "cpu", threads, cache) for p in paths)
    return OnnxClip(model, image, text, choice.label)
