"""Export a CLIP model's two towers to ONNX, check them against eager PyTorch, cache them.

Each tower is wrapped in a small ``nn.Module`` that calls the backend's own feature function
(:meth:`~helpers.models.ClipModel._image_features` / ``_text_features``), so the graph holds the
model's final norm and projection and its output equals ``encode_images`` / ``encode_texts``
(unnormalised features, float32). Inputs: ``pixel_values`` [batch, 3, H, W] float32 (the model's
own preprocessing, as ``model.preprocess`` gives it) and the tokenizer's tensors [batch, length]
(``input_ids``, and ``attention_mask`` / ``position_ids`` where the backend passes them). Batch and
text length are dynamic.

:func:`export_towers` uses PyTorch's current exporter (``torch.onnx.export(..., dynamo=True)``);
only when that fails does it try the TorchScript-based one (``dynamo=False``) and say so in one
line. After export ONNX Runtime (CPU, fp32) runs both files on a batch size and text lengths the
export never saw and must give eager's features within :data:`EXPORT_TOLERANCE`; the largest
difference is recorded. :func:`exported` keeps the files under :func:`cache_root` (``build/onnx``
or ``$CLIP_ONNX_CACHE``), one folder per model, and builds them again when the model's
fingerprint changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from helpers.data import BUILD_DIR, open_image, sample_photos

if TYPE_CHECKING:
    from helpers.models import ClipModel

__all__ = [
    "CACHE_ENV",
    "EXPORT_TOLERANCE",
    "CheckResult",
    "ExportError",
    "Exported",
    "ImageTower",
    "TextTower",
    "cache_root",
    "check_export",
    "export_towers",
    "exported",
    "model_folder",
    "quiet_export",
]

CACHE_ENV = "CLIP_ONNX_CACHE"
"""Environment variable naming another cache folder than ``build/onnx``."""
EXPORT_TOLERANCE = 1e-4
"""Largest |ONNX Runtime fp32 - eager| allowed after export, relative to the features' largest
magnitude (at least 1): float32 kernels that sum in another order differ by ~1e-6 here."""
CHECK_TEXTS: tuple[str, ...] = ("猫", "犬の写真", "赤い丸と青い三角が描かれた絵")
"""Texts of three different lengths for the export check (the export itself saw two)."""
TEXT_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")


class ExportError(RuntimeError):
    """The export (or its check) failed; the message is one line naming what and why."""


# ---------------------------------------------------------------- the towers as modules


class ImageTower(nn.Module):
    """``pixel_values`` → the model's image features (float32), as ``encode_images`` gives them."""

    def __init__(self, model: ClipModel) -> None:
        super().__init__()
        self.clip = model
        self.inner = model.module  # registered, so export sees its weights as parameters

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip._image_features(pixel_values).float()


class TextTower(nn.Module):
    """The tokenizer's tensors → the model's text features (float32), as ``encode_texts`` gives them."""

    def __init__(self, model: ClipModel) -> None:
        super().__init__()
        self.clip = model
        self.inner = model.module

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return self.clip._text_features({k: v for k, v in given.items() if v is not None}).float()


# ---------------------------------------------------------------- export


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the exporter's and the quantiser's chatter (warnings, log lines) for the block."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch._dynamo", "torch.export", "")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def _example_pixels(model: ClipModel, n: int) -> torch.Tensor:
    photos = [open_image(p.path) for p in sample_photos()[:n]]
    return model.preprocess(photos).to(model.device, model.dtype)


def _example_tokens(model: ClipModel, texts: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
    tokens = model.tokenize(list(texts))
    return {k: v.to(model.device) for k, v in tokens.items() if k in TEXT_KEYS}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # the exporter colours its messages
    return line[:300]


def _unsupported_operator(err: BaseException) -> str | None:
    """The operator the exporter could not convert, when its message names one."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    for pattern in (
        r"(aten::\w+(?:\.\w+)?)",
        r"(torch\.ops\.\w+\.\w+(?:\.\w+)?)",
        r"(OnnxExporterError: .+)",
    ):
        found = re.search(pattern, text)
        if found:
            return found[1]
    return None


def _export_one(
    tower: nn.Module, kwargs: dict[str, torch.Tensor], path: Path, dynamic: dict[str, dict[int, str]]
) -> str:
    """Export ``tower`` called with ``kwargs`` to ``path``; returns the exporter used."""
    names = list(kwargs)
    tower.eval()
    try:
        with quiet_export(), torch.inference_mode(False), torch.no_grad():
            shapes = {k: {axis: torch.export.Dim.DYNAMIC for axis in dynamic[k]} for k in names}
            program = torch.onnx.export(
                tower,
                (),
                kwargs=kwargs,
                dynamo=True,
                input_names=names,
                output_names=["features"],
                dynamic_shapes=shapes,
                external_data=True,
                verbose=False,
            )
            program.save(str(path), external_data=True)
        return "dynamo"
    except Exception as dynamo_err:
        first = _first_line(dynamo_err)
        print(f"dynamo エクスポーターで失敗したので TorchScript 版で書き出します ({path.name}: {first})")
        try:
            with quiet_export(), torch.no_grad():
                torch.onnx.export(
                    tower,
                    (),
                    str(path),
                    kwargs=kwargs,
                    dynamo=False,
                    input_names=names,
                    output_names=["features"],
                    dynamic_axes={k: dynamic[k] for k in names},
                    opset_version=17,
                )
            return "torchscript"
        except Exception as ts_err:
            op = _unsupported_operator(ts_err) or _unsupported_operator(dynamo_err)
            what = f"演算 {op} を変換できません" if op else _first_line(ts_err)
            raise ExportError(f"{path.name} を ONNX に書き出せません: {what} (dynamo: {first})") from None


def export_towers(model: ClipModel, folder: str | Path) -> dict[str, str]:
    """Write ``image.fp32.onnx`` and ``text.fp32.onnx`` (+ their ``.data`` weights) into ``folder``.

    Returns ``{"image": exporter, "text": exporter}`` (``"dynamo"`` or ``"torchscript"``). The model
    must be float32 (the ONNX files are; other precisions are derived from them). Raises
    :class:`ExportError` in one line when both exporters fail.
    """
    if model.dtype != torch.float32:
        raise ExportError(f"ONNX への書き出しには float32 のモデルが要ります (今は {model.dtype})")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = {"pixel_values": _example_pixels(model, 2)}
    tokens = _example_tokens(model, CHECK_TEXTS[1:])
    return {
        "image": _export_one(
            ImageTower(model), pixels, folder / "image.fp32.onnx", {"pixel_values": {0: "batch"}}
        ),
        "text": _export_one(
            TextTower(model),
            tokens,
            folder / "text.fp32.onnx",
            {k: {0: "batch", 1: "length"} for k in tokens},
        ),
    }


# ---------------------------------------------------------------- the check


@dataclass(frozen=True)
class CheckResult:
    """How far ONNX Runtime's float32 output is from eager PyTorch's, per tower."""

    image_max_abs: float
    text_max_abs: float
    image_scale: float
    """The eager image features' largest magnitude (the tolerance is relative to max(1, this))."""
    text_scale: float
    batch: int
    """The check's batch size (the export saw 2)."""

    def ok(self, tolerance: float | None = None) -> bool:
        """Both towers within ``tolerance`` (default :data:`EXPORT_TOLERANCE`) of eager."""
        tolerance = EXPORT_TOLERANCE if tolerance is None else tolerance
        return self.image_max_abs <= tolerance * max(1.0, self.image_scale) and (
            self.text_max_abs <= tolerance * max(1.0, self.text_scale)
        )

    def describe(self) -> str:
        return f"最大差 画像 {self.image_max_abs:.1e}、テキスト {self.text_max_abs:.1e} (バッチ {self.batch})"


def _run_cpu(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    from helpers.runtimes.ort import session

    return session(path, "cpu").run(["features"], feeds)[0]


def check_export(model: ClipModel, folder: str | Path) -> CheckResult:
    """Run both fp32 files with ONNX Runtime's CPU provider and compare with eager (batch 3)."""
    folder = Path(folder)
    pixels = _example_pixels(model, 3)
    tokens = _example_tokens(model, CHECK_TEXTS)
    with torch.inference_mode():
        eager_image = model._image_features(pixels).float().cpu().numpy()
        eager_text = model._text_features(tokens).float().cpu().numpy()
    onnx_image = _run_cpu(folder / "image.fp32.onnx", {"pixel_values": pixels.float().cpu().numpy()})
    onnx_text = _run_cpu(folder / "text.fp32.onnx", {k: v.cpu().numpy() for k, v in tokens.items()})
    if onnx_image.shape != eager_image.shape or onnx_text.shape != eager_text.shape:
        raise ExportError(
            f"ONNX の出力の形が違います: 画像 {onnx_image.shape} (eager {eager_image.shape}),"
            f" テキスト {onnx_text.shape} (eager {eager_text.shape})"
        )
    return CheckResult(
        float(np.abs(onnx_image - eager_image).max()),
        float(np.abs(onnx_text - eager_text).max()),
        float(np.abs(eager_image).max()),
        float(np.abs(eager_text).max()),
        len(pixels),
    )


# ---------------------------------------------------------------- the cache


def cache_root() -> Path:
    """Where exported files live: ``$CLIP_ONNX_CACHE``, else ``build/onnx``."""
    import os

    return Path(os.environ.get(CACHE_ENV) or BUILD_DIR / "onnx").expanduser()


def model_folder(model: ClipModel, root: str | Path | None = None) -> Path:
    """The cache folder of ``model``: its name made safe for a path (one folder per model)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model.name).strip("_") or "model"
    return Path(root or cache_root()) / slug


@dataclass(frozen=True)
class Exported:
    """A model's exported fp32 towers and what is known about them (``meta.json``)."""

    folder: Path
    fingerprint: str
    exporters: dict[str, str]
    check: CheckResult
    built: bool
    """True when this call exported (False: the cached files were used)."""

    @property
    def image(self) -> Path:
        return self.folder / "image.fp32.onnx"

    @property
    def text(self) -> Path:
        return self.folder / "text.fp32.onnx"

    def file(self, tower: str, precision: str) -> Path:
        """The file of ``tower`` (``"image"``/``"text"``) in ``precision`` (``"fp32"``, ``"fp16"``)."""
        return self.folder / f"{tower}.{precision}.onnx"


def _read_meta(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def exported(model: ClipModel, root: str | Path | None = None, rebuild: bool = False) -> Exported:
    """``model``'s fp32 towers, exported and checked once, then reused from the cache.

    The folder is rebuilt (every precision in it removed) when its ``meta.json`` names another
    fingerprint, torch version or exporter result, or when ``rebuild``. Raises :class:`ExportError`
    when the export fails or ONNX Runtime's answers differ from eager beyond :data:`EXPORT_TOLERANCE`.
    """
    folder = model_folder(model, root)
    meta = _read_meta(folder)
    fresh = (
        not rebuild
        and meta is not None
        and meta.get("fingerprint") == model.fingerprint
        and meta.get("torch") == torch.__version__
        and all((folder / f"{t}.fp32.onnx").exists() for t in ("image", "text"))
    )
    if fresh:
        assert meta is not None
        return Exported(folder, model.fingerprint, meta["exporters"], CheckResult(**meta["check"]), False)
    if folder.exists():
        shutil.rmtree(folder)
    exporters = export_towers(model, folder)
    result = check_export(model, folder)
    if not result.ok():
        raise ExportError(
            f"ONNX Runtime (fp32) の答えが eager と合いません: {result.describe()}"
            f" (許容 {EXPORT_TOLERANCE:.0e} × 特徴量の大きさ)"
        )
    import onnx

    (folder / "meta.json").write_text(
        json.dumps(
            {
                "model": model.name,
                "fingerprint": model.fingerprint,
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "exporters": exporters,
                "check": asdict(result),
            },
            ensure_ascii=False,
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return Exported(folder, model.fingerprint, exporters, result, True)
