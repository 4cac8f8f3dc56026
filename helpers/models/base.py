"""What every backend of :mod:`helpers.models` shares: names, errors, the preprocessing spec and
:class:`ClipModel`, the one interface all backends implement.

Backends import this module (and :mod:`helpers.models.hub`), never each other or the package's
``__init__``, so the model layer has no import cycle.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from helpers import zeroshot
from helpers.zeroshot import Scoring

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ALIASES",
    "AUTO",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "LINE_MODELS",
    "LINE_V2",
    "RANDOM_VIT_B16",
    "RINNA_MODELS",
    "TRUSTED_REMOTE_CODE",
    "ClipModel",
    "ModelCheckError",
    "ModelLoadError",
    "PreprocessSpec",
    "Scoring",
    "describe",
    "normalize",
    "preprocess_with_spec",
    "resize_with_spec",
    "scoring_of",
]

DEFAULT_MODEL = "line-corporation/clip-japanese-base"
"""The real model the course uses by default (Apache-2.0, EVA02-B/16 + BERT, 512-d)."""
LINE_V2 = "line-corporation/clip-japanese-base-v2"
"""LINE's second version (Apache-2.0, same CLYP remote code layout; not verified here: see docs/models.md)."""
LINE_MODELS: tuple[str, ...] = (DEFAULT_MODEL, LINE_V2)
"""LINE's CLYP models, loaded through their remote code with the same shims."""
RINNA_MODELS: tuple[str, ...] = ("rinna/japanese-cloob-vit-b-16", "rinna/japanese-clip-vit-b-16")
"""rinna's models, loaded through their ``japanese_clip`` package."""
EMBEDDED = "embedded"
"""The tiny CLIP shipped with the course (``helpers/assets/tiny-clip-ja``)."""
RANDOM_VIT_B16 = "random:vit-b16"
"""A random-initialised ViT-B/16-sized CLIP for speed measurements."""
AUTO = "auto"
"""The default real model when the hub answers; else the embedded one in notebooks, an error in commands."""
TRUSTED_REMOTE_CODE: tuple[str, ...] = LINE_MODELS
"""Hub ids whose remote code is run without asking (a local folder's code only with ``trust_remote_code``)."""
ALIASES: dict[str, str] = {"tiny": EMBEDDED, "vit-b16-random": RANDOM_VIT_B16}
"""Other spellings accepted by :func:`load_clip` (bench's ``--arch vit-b16-random`` among them)."""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's normalisation on the 0-1 scale (rinna, the random model and the tiny CLIP use it)."""


class ModelLoadError(RuntimeError):
    """A model that was asked for could not be loaded; the message says why and what to do."""


class ModelCheckError(RuntimeError):
    """A loaded model gave a wrong answer (or NaN/inf) on a known picture; the message names likely causes."""


# ---------------------------------------------------------------- preprocessing


DECODE_MARGIN = 1.5
"""Decoding at reduced size keeps the resized side at least this many times the model's input, so the
resize that follows still shrinks (by ≥ 1.5, with its antialiasing filter) rather than working from a
picture at or below the model's size (docs/classify.md: the measured effect on the answers)."""

DecodeSide = Literal["shorter", "longer", "both"]
"""Which side of a picture a reduced decode must keep large enough (``"both"``: each side)."""


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its pictures: enough for DALI (or anyone) to reproduce its preprocessing.

    Steps, in order: convert to RGB; resize so that the ``resize`` side becomes ``resize_size``
    (``size`` when None) with ``interpolation``; then a ``size`` x ``size`` centre crop
    (``"shorter"``) or a centred letterbox pad with ``pad_value`` (``"longer"``); ``"squash"``
    resizes straight to ``size`` x ``size``. Finally ``(pixel / 255 - mean) / std``.
    """

    size: int
    """Output height = width in pixels."""
    resize: Literal["shorter", "longer", "squash"]
    """``"shorter"``: shorter side to ``resize_size``, then centre crop (CLIP, rinna, tiny CLIP).
    ``"longer"``: longer side to ``resize_size``, then letterbox pad to a square (LINE)."""
    interpolation: Literal["bicubic", "bilinear"]
    mean: tuple[float, float, float]
    """Per-channel mean on the 0-1 scale, as HF processors give it (DALI multiplies by 255)."""
    std: tuple[float, float, float]
    """Per-channel standard deviation on the 0-1 scale."""
    pad_value: float = 0.0
    """Letterbox fill on the **0-1 pixel scale, before normalisation** (LINE pads with black, 0.0);
    in normalised units that is ``(pad_value - mean) / std`` per channel."""
    resize_size: int | None = None
    """Side length the resize aims at; None means ``size`` (true for every model here)."""
    crop_rounding: Literal["floor", "half_even"] = "floor"
    """How the centre crop's offset ``(resized - size) / 2`` becomes an integer: ``"floor"`` as HF
    image processors do, ``"half_even"`` as torchvision's ``CenterCrop`` does (Python's ``round``:
    rinna's transform). They differ by 1 pixel when ``resized - size`` is 3 modulo 4 (640×427 → 335×224)."""

    @property
    def target(self) -> int:
        """The side length the resize step produces (``resize_size`` or ``size``)."""
        return self.resize_size or self.size

    def decode_floor(self, margin: float = DECODE_MARGIN) -> tuple[int, DecodeSide]:
        """How small a JPEG may be decoded (libjpeg's DCT-domain downscale) and still feed this resize
        well: ``(pixels, side)``, the ``side`` (``"both"`` for a squash) kept at least ``margin`` times
        the resize target."""
        side: DecodeSide = "both" if self.resize == "squash" else self.resize
        return int(np.ceil(margin * self.target)), side

    def geometry(self, width: int, height: int) -> Geometry:
        """Where a ``width`` x ``height`` picture goes: the one reference for PIL and DALI alike.

        The formulas are the processors' own: shorter side to the target with the longer one
        ``int(target * long / short)`` (HF and torchvision); LINE's letterbox
        ``round(side * (target / float(longer)))``, at least 1; the crop offset by
        :attr:`crop_rounding`; a window larger than the picture pads, the picture placed at
        ``(size - side) // 2``.
        """
        if width < 1 or height < 1:
            raise ValueError(f"no pixels: {width}×{height}")
        size, target = self.size, self.target
        if self.resize == "squash":
            return Geometry(size, size, 0, 0)
        if self.resize == "shorter":
            if width <= height:
                new_w, new_h = target, max(1, int(target * height / width))
            else:
                new_w, new_h = max(1, int(target * width / height)), target
        elif self.resize == "longer":
            scale = target / float(max(width, height))
            new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        else:
            raise ValueError(f"unknown resize rule {self.resize!r}")
        return Geometry(new_w, new_h, self._offset(new_w - size), self._offset(new_h - size))

    def _offset(self, spare: int) -> int:
        """The window's start in the resized picture: ``spare`` pixels to share, negative = pad."""
        if spare < 0:
            return -((-spare) // 2)
        return round(spare / 2) if self.crop_rounding == "half_even" else spare // 2

    def as_dict(self) -> dict[str, Any]:
        """The spec as a JSON-friendly dict."""
        return asdict(self)


@dataclass(frozen=True)
class Geometry:
    """One picture's resize and crop under a :class:`PreprocessSpec` (:meth:`PreprocessSpec.geometry`)."""

    width: int
    """Width after the resize."""
    height: int
    """Height after the resize."""
    left: int
    """Left edge of the ``size`` x ``size`` window in the resized picture (negative: padding)."""
    top: int
    """Top edge of the window (negative: padding)."""


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resize_one(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """One RGB picture resized, cropped or padded to ``spec.size`` (:meth:`PreprocessSpec.geometry`)."""
    if image.mode != "RGB":  # converting an RGB picture would only copy it
        image = image.convert("RGB")
    where = spec.geometry(*image.size)
    if (where.width, where.height) != image.size or spec.resize != "longer":
        image = image.resize((where.width, where.height), _RESAMPLE[spec.interpolation])
    if where.left >= 0 and where.top >= 0:
        return image.crop((where.left, where.top, where.left + spec.size, where.top + spec.size))
    fill = round(spec.pad_value * 255)  # a letterbox (or a picture smaller than the crop): pad
    canvas = Image.new("RGB", (spec.size, spec.size), (fill, fill, fill))
    canvas.paste(image, (-where.left, -where.top))
    return canvas


def resize_with_spec(images: Image.Image | Sequence[Image.Image], spec: PreprocessSpec) -> torch.Tensor:
    """The geometry of ``spec`` only: a uint8 CPU batch [B, 3, size, size] (resized, cropped or padded).

    A quarter of float32's bytes: what workers send; :func:`normalize` finishes the job on the
    model's device.
    """
    if isinstance(images, Image.Image):
        images = [images]
    arrays = np.stack([np.asarray(_resize_one(im, spec), dtype=np.uint8) for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


def normalize(pixels: torch.Tensor, spec: PreprocessSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] → float32 ``(x / 255 - mean) / std``, on the device ``pixels`` are on.

    ``out``: a contiguous float32 tensor of the same shape to write into (the same numbers)."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=pixels.device).view(1, 3, 1, 1)
    floats = pixels.float() if out is None else out.copy_(pixels)
    return floats.div_(255.0).sub_(mean).div_(std).contiguous()


def preprocess_with_spec(images: Image.Image | Sequence[Image.Image], spec: PreprocessSpec) -> torch.Tensor:
    """A float32 CPU batch [B, 3, size, size] made from PIL ``images`` by following ``spec`` with PIL.

    The reference implementation of :class:`PreprocessSpec` (matches transformers' PIL-backend
    processors exactly, torchvision's within a pixel of rounding): :func:`resize_with_spec`, then
    :func:`normalize`.
    """
    return normalize(resize_with_spec(images, spec), spec)


# ---------------------------------------------------------------- the model interface


def _as_pil_list(images: Any) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        return [images]
    images = list(images)
    if not images:
        raise ValueError("no images given")
    bad = [type(im).__name__ for im in images if not isinstance(im, Image.Image)]
    if bad:
        raise TypeError(f"preprocess expects PIL images, got {bad[0]}")
    return images


class ClipModel:
    """One CLIP model, the same small interface whatever the backend.

    Attributes: ``name`` (as asked for), ``backend`` (``"hf"``, ``"siglip"``, ``"rinna"`` or
    ``"random"``), ``kind`` (``"real"``, ``"embedded"`` or ``"random"``: what
    :func:`~helpers.models.check` can expect of it), ``module`` (the underlying ``torch.nn.Module``),
    ``device``, ``dtype``, ``scoring`` (the model's own rule for turning cosines into probabilities:
    a :class:`~helpers.zeroshot.Scoring`) and ``preprocess_spec``. Backends implement
    ``_preprocess``, ``_tokenize``, ``_image_features`` and ``_text_features``.
    """

    def __init__(
        self,
        *,
        name: str,
        backend: str,
        kind: str,
        module: nn.Module,
        preprocess_spec: PreprocessSpec,
        scoring: Scoring,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.backend = backend
        self.kind = kind
        self.module = module
        self.preprocess_spec = preprocess_spec
        self.scoring = scoring
        self.device = torch.device(device)
        self.dtype = dtype

    # -- what backends provide
    def _preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return preprocess_with_spec(images, self.preprocess_spec)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    # -- the interface
    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → the model's own preprocessing → float32 [B, 3, H, W] on the CPU."""
        pixels = self._preprocess(_as_pil_list(images))
        return pixels.to(device="cpu", dtype=torch.float32)

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """The model's own tokenisation of ``texts`` (tensors on the CPU)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts given")
        return {k: torch.as_tensor(v) for k, v in self._tokenize(texts).items()}

    def encode_images(
        self, pixel_values: torch.Tensor | Sequence[Image.Image], batch_size: int | None = None
    ) -> torch.Tensor:
        """Image features [B, D], unnormalised, in the model's dtype on its device.

        ``pixel_values`` is a [B, 3, H, W] batch (moved to the model's device and dtype here) or a
        list of PIL images (preprocessed first). ``batch_size`` splits big batches.
        """
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = self.preprocess(pixel_values)
        chunks = [pixel_values] if batch_size is None else pixel_values.split(batch_size)
        with torch.inference_mode():
            feats = [self._image_features(c.to(device=self.device, dtype=self.dtype)) for c in chunks]
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    def encode_texts(self, texts: str | Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Text features [T, D] for ``texts``, unnormalised, in the model's dtype on its device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        feats = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                inputs = self.tokenize(texts[start : start + batch_size])
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                feats.append(self._text_features(inputs))
        if not feats:
            raise ValueError("no texts given")
        return feats[0] if len(feats) == 1 else torch.cat(feats)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipModel:
        """Move the model to another device and/or dtype (in place); returns ``self``."""
        device = torch.device(device) if device is not None else self.device
        dtype = dtype or self.dtype
        self.module.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        return self

    @property
    def logit_scale(self) -> float:
        """The model's own inverse temperature (``scoring.scale``)."""
        return self.scoring.scale

    @property
    def logit_scale_source(self) -> str:
        """Where :attr:`logit_scale` came from, in words."""
        return self.scoring.source

    def label_features(self, labels: Sequence[str], templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """Normalised float32 text features [T, D] on the CPU, one per label (a prompt ensemble when
        several ``templates`` are given: :func:`helpers.zeroshot.label_embeddings`)."""
        return zeroshot.label_embeddings(lambda texts: self.encode_texts(texts).cpu(), labels, templates)

    def probabilities(self, image_features: torch.Tensor, label_features: torch.Tensor) -> torch.Tensor:
        """Label probabilities [N, T] by the model's own :attr:`scoring` (softmax or per-label sigmoid)."""
        return zeroshot.probabilities(image_features, label_features, self.scoring)

    @property
    def n_params(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.module.parameters())

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits identifying config + weights (computed once, on first use).

        Weights are hashed rounded to float16, so one checkpoint run in float32 or float16 gives
        the same fingerprint; paths, library versions and dtype settings in the config are left out.
        """
        digest = hashlib.sha256()
        digest.update(_config_json(self.module).encode())
        for key, tensor in self.module.state_dict().items():
            data = tensor.detach().to("cpu")
            if data.is_floating_point():
                data = data.to(torch.float16)
            digest.update(f"{key}:{tuple(data.shape)}:{data.dtype}".encode())
            digest.update(data.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def __repr__(self) -> str:
        return f"<ClipModel {describe(self)}>"


_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "_name_or_path",
        "name_or_path",
        "_commit_hash",
        "transformers_version",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "_attn_implementation_autoset",
        "attn_implementation",
        "_experts_implementation",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


def _config_json(module: nn.Module) -> str:
    """The module's config as canonical JSON, without paths, versions and runtime switches."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return type(module).__name__

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(config.to_dict()), sort_keys=True, default=str)


def describe(model: ClipModel) -> str:
    """A one-line summary: name, backend, device, dtype, parameters, scoring rule."""
    dtype = str(model.dtype).removeprefix("torch.")
    return (
        f"{model.name} | backend={model.backend} ({model.kind}) | device={model.device} | dtype={dtype}"
        f" | params={model.n_params / 1e6:.{1 if model.n_params >= 10_000_000 else 2}f}M"
        f" | scoring={model.scoring.describe()} ({model.scoring.source})"
    )


def scoring_of(module: nn.Module) -> Scoring:
    """The model's own scoring rule, read from its weights; :class:`ModelLoadError` when it has none.

    LINE: ``1 / itc_loss_fn.temperature`` (a learned temperature, as its ``forward`` divides by it);
    SigLIP: ``logit_scale.exp()`` and ``logit_bias``, per-label sigmoid; CLIP-style models:
    ``logit_scale.exp()`` (stored as a log); rinna's CLOOB: its fixed ``inv_tau`` (the CLOOB recipe
    fixes 1/τ = 30 rather than learning it). A model with none of these is refused rather than
    given a made-up scale: its probabilities would mean nothing.
    """
    loss_fn = getattr(module, "itc_loss_fn", None)
    temperature = getattr(loss_fn, "temperature", None)
    if temperature is not None:
        return Scoring("softmax", 1.0 / float(temperature), source="1/itc_loss_fn.temperature (learned)")
    log_scale = getattr(module, "logit_scale", None)
    bias = getattr(module, "logit_bias", None)
    if isinstance(log_scale, torch.Tensor) and isinstance(bias, torch.Tensor):
        return Scoring(
            "sigmoid",
            float(log_scale.detach().float().exp()),
            float(bias.detach().float().reshape(-1)[0]),
            source="logit_scale.exp(), logit_bias (learned, SigLIP)",
        )
    if isinstance(log_scale, torch.Tensor):
        return Scoring(
            "softmax", float(log_scale.detach().float().exp()), source="logit_scale.exp() (learned)"
        )
    inv_tau = getattr(module, "inv_tau", None)
    if inv_tau is not None:
        return Scoring("softmax", float(inv_tau), source="inv_tau (fixed by the CLOOB recipe)")
    raise ModelLoadError(
        f"{type(module).__name__} には logit scale がありません (itc_loss_fn.temperature, logit_scale,"
        " inv_tau のどれもない): 確率を計算できないので、このモデルは使えません。"
    )
