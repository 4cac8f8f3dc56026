"""Japanese CLIP models behind one small interface: :func:`load_clip`, :class:`ClipModel`, :func:`check`.

Every backend gives the same object (:class:`ClipModel`)::

    model = load_clip()                      # the argument, else $CLIP_MODEL, else "auto"
    pixels = model.preprocess([image])       # float32 [B, 3, H, W] on the CPU
    image_features = model.encode_images(pixels)      # [B, D], unnormalised, as the model gives them
    text_features = model.encode_texts(["猫の写真"])  # [T, D]
    model.logit_scale                        # the model's own inverse temperature (a float)
    model.preprocess_spec                    # size, resize rule, interpolation, mean/std: for DALI

Model names (:func:`load_clip`):

- ``"line-corporation/clip-japanese-base"`` (:data:`DEFAULT_MODEL`): the real default; remote code
  with a timm EVA02 image tower (needs timm, hence torchvision: Colab and the GPU machine have both).
- ``"rinna/japanese-cloob-vit-b-16"``, ``"rinna/japanese-clip-vit-b-16"``: through rinna's optional
  ``japanese_clip`` package (:mod:`helpers.models_rinna`).
- ``"embedded"`` (alias ``"tiny"``): the tiny CLIP shipped in ``helpers/assets/tiny-clip-ja``
  (:mod:`helpers.tiny_clip`); meaningful only on drawn shapes. Runs anywhere, offline.
- ``"random:vit-b16"`` (alias ``"vit-b16-random"``): a random-initialised CLIP of ViT-B/16 size for
  speed measurements; no download, fixed seed, meaningless answers.
- any local folder saved with ``save_pretrained`` (config, weights, tokenizer, image processor),
  or another hub id that ``AutoModel`` understands.
- ``"auto"``: :data:`DEFAULT_MODEL` when the hub answers, else ``"embedded"`` with a one-line notice.

A model that was asked for by name and cannot load raises :class:`ModelLoadError` (cause and what
to do); only ``"auto"`` falls back. :func:`check` classifies a known picture and raises
:class:`ModelCheckError` when the answer is wrong: run it once after loading a real model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import env

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "AUTO",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "RANDOM_VIT_B16",
    "RINNA_MODELS",
    "ClipModel",
    "ModelCheckError",
    "ModelLoadError",
    "PreprocessSpec",
    "check",
    "describe",
    "load_clip",
    "preprocess_with_spec",
    "requested_model",
]

DEFAULT_MODEL = "line-corporation/clip-japanese-base"
"""The real model the course uses by default (Apache-2.0, EVA02-B/16 + BERT, 512-d)."""
RINNA_MODELS: tuple[str, ...] = ("rinna/japanese-cloob-vit-b-16", "rinna/japanese-clip-vit-b-16")
"""rinna's models, loaded through their ``japanese_clip`` package."""
EMBEDDED = "embedded"
"""The tiny CLIP shipped with the course (``helpers/assets/tiny-clip-ja``)."""
RANDOM_VIT_B16 = "random:vit-b16"
"""A random-initialised ViT-B/16-sized CLIP for speed measurements."""
AUTO = "auto"
"""The default real model when the hub answers, else the embedded one."""
ALIASES: dict[str, str] = {"tiny": EMBEDDED, "vit-b16-random": RANDOM_VIT_B16}
"""Other spellings accepted by :func:`load_clip` (bench's ``--arch vit-b16-random`` among them)."""

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI CLIP's normalisation on the 0-1 scale (rinna, the random model and the tiny CLIP use it)."""

OFFLINE_NOTICE = "Hugging Face Hub に接続できないため、同梱の小さなモデル (embedded) を使います。"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """A model that was asked for could not be loaded; the message says why and what to do."""


class ModelCheckError(RuntimeError):
    """A loaded model gave a wrong answer (or NaN/inf) on a known picture; the message names likely causes."""


# ---------------------------------------------------------------- preprocessing


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

    @property
    def target(self) -> int:
        """The side length the resize step produces (``resize_size`` or ``size``)."""
        return self.resize_size or self.size

    def as_dict(self) -> dict[str, Any]:
        """The spec as a JSON-friendly dict."""
        return asdict(self)


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def _resize_one(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """One RGB picture resized, cropped or padded to ``spec.size`` square."""
    image = image.convert("RGB")
    width, height = image.size
    target, resample = spec.target, _RESAMPLE[spec.interpolation]
    if spec.resize == "squash":
        return image.resize((spec.size, spec.size), resample)
    if spec.resize == "shorter":
        if width <= height:
            new = (target, max(1, int(target * height / width)))
        else:
            new = (max(1, int(target * width / height)), target)
        image = image.resize(new, resample)
        left, top = (new[0] - spec.size) // 2, (new[1] - spec.size) // 2
        if left < 0 or top < 0:  # resize_size < size: pad like a centre crop of a small picture
            return _pad_center(image, spec)
        return image.crop((left, top, left + spec.size, top + spec.size))
    if spec.resize == "longer":
        scale = target / max(width, height)
        new = (max(1, round(width * scale)), max(1, round(height * scale)))
        if new != (width, height):
            image = image.resize(new, resample)
        return _pad_center(image, spec)
    raise ValueError(f"unknown resize rule {spec.resize!r}")


def _pad_center(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """``image`` centred on a ``spec.size`` square filled with ``spec.pad_value`` (left/top get the floor)."""
    fill = round(spec.pad_value * 255)
    canvas = Image.new("RGB", (spec.size, spec.size), (fill, fill, fill))
    width, height = image.size
    canvas.paste(image, ((spec.size - width) // 2, (spec.size - height) // 2))
    return canvas


def preprocess_with_spec(images: Image.Image | Sequence[Image.Image], spec: PreprocessSpec) -> torch.Tensor:
    """A float32 CPU batch [B, 3, size, size] made from PIL ``images`` by following ``spec`` with PIL.

    The reference implementation of :class:`PreprocessSpec` (matches transformers' PIL-backend
    processors exactly, torchvision's within a pixel of rounding).
    """
    if isinstance(images, Image.Image):
        images = [images]
    arrays = np.stack([np.asarray(_resize_one(im, spec), dtype=np.float32) for im in images])
    batch = torch.from_numpy(arrays).permute(0, 3, 1, 2).div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return batch.sub_(mean).div_(std).contiguous()


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

    Attributes: ``name`` (as asked for), ``backend`` (``"hf"``, ``"rinna"`` or ``"random"``),
    ``kind`` (``"real"``, ``"embedded"`` or ``"random"``: what :func:`check` can expect of it),
    ``module`` (the underlying ``torch.nn.Module``), ``device``, ``dtype``, ``logit_scale`` (the
    model's own inverse temperature) with ``logit_scale_source`` (where it came from), and
    ``preprocess_spec``. Backends implement ``_preprocess``, ``_tokenize``, ``_image_features``
    and ``_text_features``.
    """

    def __init__(
        self,
        *,
        name: str,
        backend: str,
        kind: str,
        module: nn.Module,
        preprocess_spec: PreprocessSpec,
        logit_scale: float,
        logit_scale_source: str,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.backend = backend
        self.kind = kind
        self.module = module
        self.preprocess_spec = preprocess_spec
        self.logit_scale = float(logit_scale)
        self.logit_scale_source = logit_scale_source
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
    """A one-line summary: name, backend, device, dtype, parameters, logit scale."""
    dtype = str(model.dtype).removeprefix("torch.")
    return (
        f"{model.name} | backend={model.backend} ({model.kind}) | device={model.device} | dtype={dtype}"
        f" | params={model.n_params / 1e6:.{1 if model.n_params >= 10_000_000 else 2}f}M"
        f" | logit_scale={model.logit_scale:.2f} ({model.logit_scale_source})"
    )


def learned_logit_scale(module: nn.Module) -> tuple[float, str]:
    """The model's own inverse temperature and where it came from.

    LINE: ``1 / itc_loss_fn.temperature`` (a learned temperature, as its ``forward`` divides by it);
    CLIP-style models: ``logit_scale.exp()`` (stored as a log); rinna's CLOOB: its fixed
    ``inv_tau`` (the CLOOB recipe fixes 1/τ = 30 rather than learning it). Otherwise CLIP's usual
    ceiling, 100.
    """
    loss_fn = getattr(module, "itc_loss_fn", None)
    temperature = getattr(loss_fn, "temperature", None)
    if temperature is not None:
        return 1.0 / float(temperature), "1/itc_loss_fn.temperature (learned)"
    log_scale = getattr(module, "logit_scale", None)
    if isinstance(log_scale, torch.Tensor):
        return float(log_scale.detach().float().exp()), "logit_scale.exp() (learned)"
    inv_tau = getattr(module, "inv_tau", None)
    if inv_tau is not None:
        return float(inv_tau), "inv_tau (fixed, CLOOB)"
    return 100.0, "default 100 (model has none)"


# ---------------------------------------------------------------- choosing and loading


def requested_model(name: str | None = None) -> str:
    """The model asked for, spelled canonically: ``name``, else ``$CLIP_MODEL``, else ``"auto"``."""
    chosen = (name or os.environ.get("CLIP_MODEL") or AUTO).strip()
    lowered = chosen.lower()
    if lowered in {AUTO, EMBEDDED, RANDOM_VIT_B16} or lowered in ALIASES:
        return ALIASES.get(lowered, lowered)
    return chosen


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device(env.device())


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def load_clip(
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> ClipModel:
    """Load a CLIP model by name (see the module docstring) on ``device`` (default: the GPU when
    there is one) in ``dtype`` (default float32).

    Resolution: ``name``, else the ``CLIP_MODEL`` environment variable, else ``"auto"``. ``"auto"``
    loads :data:`DEFAULT_MODEL` when the hub answers (``helpers.env.hub_reachable``, at most ~3 s)
    and otherwise the embedded model, printing one line that says so. A model asked for by name
    never falls back: it raises :class:`ModelLoadError` with the cause and the fix.
    """
    requested = requested_model(name)
    target_device = _default_device(device)
    target_dtype = dtype or torch.float32
    if requested != AUTO:
        return _load_named(requested, target_device, target_dtype)
    if not env.hub_reachable():
        print(OFFLINE_NOTICE)
        return _load_named(EMBEDDED, target_device, target_dtype)
    try:
        return _load_named(DEFAULT_MODEL, target_device, target_dtype)
    except ModelLoadError as err:
        print(
            f"{DEFAULT_MODEL} を読み込めないため、同梱の小さなモデル (embedded) を使います:"
            f" {_first_line(err)}"
        )
        return _load_named(EMBEDDED, target_device, target_dtype)


def _load_named(name: str, device: torch.device, dtype: torch.dtype) -> ClipModel:
    """Dispatch a canonical model name to its backend."""
    from helpers import models_hf

    if name == EMBEDDED:
        return models_hf.load_embedded(device, dtype)
    if name == RANDOM_VIT_B16:
        return models_hf.load_random_vit_b16(device, dtype)
    if name in RINNA_MODELS:
        from helpers import models_rinna

        return models_rinna.load_rinna(name, device, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        return models_hf.load_pretrained(path, name=name, device=device, dtype=dtype)
    if name == DEFAULT_MODEL:
        return models_hf.load_line(device, dtype)
    if _HUB_ID.match(name) and not name.startswith(("./", "../")):
        return models_hf.load_pretrained(name, name=name, device=device, dtype=dtype)
    choices = ", ".join([AUTO, DEFAULT_MODEL, *RINNA_MODELS, EMBEDDED, RANDOM_VIT_B16])
    raise ModelLoadError(
        f"モデル {name!r} が見つかりません (フォルダーでも Hub の名前でもありません)。選べる名前: {choices}、"
        "または save_pretrained で保存したフォルダー。"
    )


# ---------------------------------------------------------------- the sanity check

PHOTO_LABELS: tuple[str, ...] = ("犬", "猫", "象", "車")
PHOTO_TEMPLATE = "{}の写真"
PHOTO_ANSWER = "猫"
SHAPE_LABELS: tuple[str, ...] = ("赤い丸", "青い三角", "緑の四角", "黄色い星")
SHAPE_SEEDS: tuple[int, ...] = (1, 2)


def _zero_shot_probs(model: ClipModel, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """softmax(logit_scale × cosine similarity) [images, texts], after checking features are finite."""
    image_features = model.encode_images(images).float()
    text_features = model.encode_texts(texts).float()
    for what, feats, n in (("画像", image_features, len(images)), ("テキスト", text_features, len(texts))):
        if feats.ndim != 2 or feats.shape[0] != n:
            raise ModelCheckError(
                f"{what}の特徴量の形が [{n}, D] ではありません: {list(feats.shape)} ({model.name})"
            )
        if not torch.isfinite(feats).all():
            raise ModelCheckError(
                f"{what}の特徴量に NaN/inf が含まれます ({model.name})。{_likely_causes(model)}"
            )
    if image_features.shape[1] != text_features.shape[1]:
        raise ModelCheckError(
            f"画像とテキストの特徴量の次元が違います: {image_features.shape[1]} と {text_features.shape[1]}"
        )
    logits = model.logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    return logits.softmax(dim=-1).cpu()


def _likely_causes(model: ClipModel) -> str:
    """What usually makes a model answer wrongly, and what to do, for this model."""
    import transformers

    causes = []
    if model.dtype in (torch.float16, torch.bfloat16) and model.device.type == "cpu":
        causes.append("CPU で float16/bfloat16 は不安定です: dtype=torch.float32 で読み込んでください")
    if model.name == DEFAULT_MODEL or any(
        type(m).__module__.startswith("timm.") for m in model.module.modules()
    ):
        causes.append(
            f"transformers {transformers.__version__} で EVA02 の回転位置埋め込み (RoPE) バッファが"
            "未初期化のまま"
            " (helpers.clip_compat.reinit_non_persistent_buffers が効いていない): timm を更新するか、"
            "`%pip install transformers==4.51.3` で試してください"
        )
    elif model.backend == "rinna":
        causes.append(
            f"japanese_clip と transformers {transformers.__version__} の組み合わせ: "
            "`%pip install transformers==4.51.3` で試してください"
        )
    elif model.kind == "embedded":
        causes.append(
            "同梱モデルの重みが壊れているか古い: `python -m helpers.tiny_clip train` で作り直してください"
        )
    causes.append("前処理 (preprocess_spec) がモデルの学習時と違う")
    return "考えられる原因: " + " / ".join(causes)


def check(model: ClipModel) -> str:
    """Classify a known picture and return a one-line Japanese OK message, or raise :class:`ModelCheckError`.

    - real models: the cat photo ``sample_images/cat.jpg`` among 「犬」「猫」「象」「車」
      (template 「{}の写真」, normalised features × logit scale → softmax) must come out 「猫」 with
      probability ≥ 0.5;
    - the embedded model: drawn shapes (:func:`helpers.tiny_clip.draw_shape`) of four labels, two
      pictures each, classified among those labels: at least 7 of 8 right;
    - ``random:vit-b16``: only the shapes and finiteness of the features (random weights have no
      meaningful answer).

    NaN/inf features always fail, with the likely cause.
    """
    if model.kind == "random":
        image = Image.new("RGB", (320, 240), (120, 140, 160))
        _zero_shot_probs(model, [image], [PHOTO_TEMPLATE.format(x) for x in PHOTO_LABELS])
        return (
            f"モデル確認 OK ({model.name}): 特徴量の形と値 (NaN/inf なし) を確認しました。"
            "重みがランダムなので答えの正しさは確かめません。"
        )
    if model.kind == "embedded":
        from helpers import tiny_clip

        pictures = [
            (label, tiny_clip.draw_shape(label, seed)) for seed in SHAPE_SEEDS for label in SHAPE_LABELS
        ]
        probs = _zero_shot_probs(model, [p for _, p in pictures], list(SHAPE_LABELS))
        answers = [SHAPE_LABELS[i] for i in probs.argmax(dim=-1).tolist()]
        right = sum(a == label for a, (label, _) in zip(answers, pictures, strict=True))
        if right < len(pictures) - 1:
            wrong = "、".join(
                f"{label}→{a}" for a, (label, _) in zip(answers, pictures, strict=True) if a != label
            )
            raise ModelCheckError(
                f"モデル確認 NG ({model.name}): 図形 {len(pictures)} 枚中 {right} 枚しか正しく分類できません"
                f" ({wrong})。{_likely_causes(model)}"
            )
        mean_p = float(probs.max(-1).values.mean())
        return f"モデル確認 OK: 図形 {right}/{len(pictures)} 枚を正しく分類 (平均確率 {mean_p:.2f})"
    from helpers.data import open_image, sample_photo

    photo = open_image(sample_photo("cat"))
    probs = _zero_shot_probs(model, [photo], [PHOTO_TEMPLATE.format(x) for x in PHOTO_LABELS])[0]
    best = int(probs.argmax())
    answer, p = PHOTO_LABELS[best], float(probs[best])
    if answer != PHOTO_ANSWER or p < 0.5:
        table = "、".join(f"{label} {float(q):.2f}" for label, q in zip(PHOTO_LABELS, probs, strict=True))
        raise ModelCheckError(
            f"モデル確認 NG ({model.name}): 猫の写真の答えが「{answer}」({p:.2f}) でした [{table}]。"
            f"{_likely_causes(model)}"
        )
    return f"モデル確認 OK: {answer} ({p:.2f})"
