"""The Hugging Face backend of :mod:`helpers.models`: ``from_pretrained`` folders and hub ids.

It serves the real default model (LINE's ``clip-japanese-base``, remote code + timm), any folder
saved with ``save_pretrained`` (the embedded tiny CLIP among them) and the random ViT-B/16-sized
CLIP for speed measurements. Loading is quiet (no progress bars or warnings on stderr), fails
fast and clearly when the hub cannot be reached and the model is not cached, and repairs what
transformers 5.x leaves broken in older remote code (see :mod:`helpers.clip_compat`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from helpers import env
from helpers.clip_compat import (
    apply_legacy_shims,
    as_features,
    ensure_post_init,
    quiet_transformers,
    reinit_non_persistent_buffers,
)
from helpers.models import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MODEL,
    EMBEDDED,
    RANDOM_VIT_B16,
    ClipModel,
    ModelLoadError,
    PreprocessSpec,
    learned_logit_scale,
)

__all__ = [
    "CharTokenizer",
    "HFClip",
    "hub_offline",
    "load_embedded",
    "load_line",
    "load_pretrained",
    "load_random_vit_b16",
    "random_vit_b16_config",
    "spec_from_processor",
]

LINE_NEEDS: tuple[tuple[str, str], ...] = (
    (DEFAULT_MODEL, "config.json"),
    ("rinna/japanese-clip-vit-b-16", "config.json"),  # LINE's text tower config, read at build time
    ("rinna/japanese-roberta-base", "spiece.model"),  # LINE's tokenizer wraps this one
)
"""Hub files LINE's remote code reads while loading (checked in the cache when offline)."""

TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids")


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


# ---------------------------------------------------------------- preprocessing spec from an HF processor

_CLYP_NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet_inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "openai_clip": (CLIP_MEAN, CLIP_STD),
}
"""LINE's ``CLYPImageProcessor`` normalisation choices (timm's constants)."""

_INTERPOLATION = {2: "bilinear", 3: "bicubic"}  # PIL / HF ``resample`` codes


def _size_dict(size: Any) -> dict[str, int]:
    """An HF ``size``/``crop_size`` (dict, ``SizeDict`` or int) as a plain dict of the set keys."""
    if size is None:
        return {}
    if isinstance(size, int):
        return {"shortest_edge": size}
    keys = ("shortest_edge", "longest_edge", "height", "width")
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items() if k in keys and v is not None}
    return {k: int(getattr(size, k)) for k in keys if getattr(size, k, None) is not None}


def spec_from_processor(processor: Any) -> PreprocessSpec:
    """The :class:`~helpers.models.PreprocessSpec` an HF image processor implements.

    Understands CLIP-style processors (shorter side + centre crop, or a square resize) and LINE's
    ``CLYPImageProcessor`` (longer side to ``image_size`` with bicubic, black letterbox, its
    ``normalization_type``'s mean/std).
    """
    if hasattr(processor, "image_size") and hasattr(processor, "normalization_type"):
        mean, std = _CLYP_NORMALIZATION[processor.normalization_type]
        return PreprocessSpec(int(processor.image_size), "longer", "bicubic", mean, std, pad_value=0.0)
    resample = getattr(processor, "resample", 3)
    code = int(getattr(resample, "value", resample))
    if code not in _INTERPOLATION:
        raise ValueError(f"unsupported interpolation (resample={resample!r}); expected bicubic or bilinear")
    if getattr(processor, "do_normalize", True):
        mean = tuple(float(x) for x in processor.image_mean)
        std = tuple(float(x) for x in processor.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    size = _size_dict(getattr(processor, "size", None))
    crop = (
        _size_dict(getattr(processor, "crop_size", None))
        if getattr(processor, "do_center_crop", False)
        else {}
    )
    interpolation = _INTERPOLATION[code]
    if "shortest_edge" in size and crop.get("height") == crop.get("width") and crop:
        resize_size = size["shortest_edge"] if size["shortest_edge"] != crop["height"] else None
        return PreprocessSpec(crop["height"], "shorter", interpolation, mean, std, resize_size=resize_size)
    if size.get("height") is not None and size.get("height") == size.get("width") and not crop:
        return PreprocessSpec(size["height"], "squash", interpolation, mean, std)
    raise ValueError(
        f"cannot describe this image processor as a square preprocessing: size={size}, crop={crop}"
    )


# ---------------------------------------------------------------- the model object


class HFClip(ClipModel):
    """A transformers model with ``get_image_features``/``get_text_features``, its tokenizer and processor."""

    def __init__(self, *, tokenizer: Any, processor: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.processor = processor
        params = inspect.signature(self.module.get_text_features).parameters
        self._text_keys = tuple(k for k in TEXT_INPUT_KEYS if k in params) or ("input_ids",)

    def _preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        if self.processor is None:
            return super()._preprocess(images)
        return torch.as_tensor(self.processor(images=images, return_tensors="pt")["pixel_values"])

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if type(self.tokenizer).__module__.startswith("transformers."):
            encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        else:  # remote-code tokenizers (LINE's) pad and return tensors themselves
            encoded = self.tokenizer(texts)
        return {k: torch.as_tensor(encoded[k]) for k in self._text_keys if k in encoded}

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return as_features(self.module.get_image_features(pixel_values=pixel_values))

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return as_features(self.module.get_text_features(**inputs))


# ---------------------------------------------------------------- hub access


@contextlib.contextmanager
def hub_offline(active: bool) -> Iterator[None]:
    """Make huggingface_hub use only its cache for the duration (no network waits) when ``active``."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    before, env_before = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env_before


def _missing_from_cache(files: Sequence[tuple[str, str]]) -> list[str]:
    """The ``repo/file`` entries of ``files`` that the local hub cache does not hold."""
    from huggingface_hub import try_to_load_from_cache

    return [
        f"{repo}/{name}" for repo, name in files if not isinstance(try_to_load_from_cache(repo, name), str)
    ]


def offline_plan(name: str, files: Sequence[tuple[str, str]]) -> bool:
    """True when the hub cannot be reached and ``files`` are all cached (load from the cache only).

    Raises :class:`ModelLoadError` at once when the hub cannot be reached and something is missing.
    """
    if env.hub_reachable():
        return False
    missing = _missing_from_cache(files)
    if missing:
        raise ModelLoadError(
            f"{name} を読み込めません: Hugging Face Hub に接続できず、キャッシュにもありません"
            f" ({missing[0]})。ネットワークを確認するか、接続できる環境で一度読み込んで"
            "キャッシュ (HF_HOME) を用意してください。"
            "同梱の小さなモデルで進めるなら CLIP_MODEL=embedded (または load_clip('auto'))。"
        )
    return True


def explain_load_error(name: str, err: BaseException) -> str:
    """A one-paragraph Japanese explanation (cause + what to do) of why loading ``name`` failed."""
    import transformers

    status = getattr(getattr(err, "response", None), "status_code", None)
    kind = type(err).__name__
    detail = str(err).strip().splitlines()[0] if str(err).strip() else kind
    if status in (401, 403, 429):
        return (
            f"{name} を読み込めません: Hugging Face Hub がダウンロードを断りました (HTTP {status})。"
            "教室など多人数が同じ回線を使うと起きます: HF_TOKEN を設定する (huggingface_hub.login())、"
            "または講師が事前にダウンロードしたキャッシュ (HF_HOME) を使ってください。"
        )
    if kind in {"RepositoryNotFoundError", "GatedRepoError"}:
        return f"{name} を読み込めません: Hub にこの名前のモデルがないか、アクセスできません ({detail})。"
    if kind in {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "offline" in detail.lower():
        return f"{name} を読み込めません: オフラインでキャッシュにも見つかりません ({detail})。"
    return (
        f"{name} を読み込めません ({kind}: {detail})。transformers {transformers.__version__} との相性なら "
        "`%pip install transformers==4.51.3` で試せます。"
    )


# ---------------------------------------------------------------- loaders


def _register_embedded() -> Path | None:
    """Import :mod:`helpers.tiny_clip` (registers its Auto classes); its folder, or None if unavailable."""
    try:
        from helpers import tiny_clip
    except ImportError:
        return None
    return tiny_clip.MODEL_DIR


def _from_pretrained(source: str, trust_remote_code: bool, local_only: bool) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) through the Auto classes; remote model classes get
    :func:`~helpers.clip_compat.ensure_post_init` before their weights load."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    # The top-level ``transformers.AutoImageProcessor`` demands torchvision on 5.15; its module does not.
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    hub: dict[str, Any] = {"local_files_only": True} if local_only else {}
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    reference = (getattr(config, "auto_map", None) or {}).get("AutoModel")
    if trust_remote_code and reference:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        reference = reference[0] if isinstance(reference, list | tuple) else reference
        model_class = get_class_from_dynamic_module(reference, source, **hub)
        ensure_post_init(model_class)
        model = model_class.from_pretrained(source, config=config, **hub)
    else:
        model = AutoModel.from_pretrained(source, config=config, trust_remote_code=trust_remote_code, **hub)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    backend = {"backend": "pil"} if _transformers_major() >= 5 else {}  # same pixels on every machine
    processor = AutoImageProcessor.from_pretrained(
        source, trust_remote_code=trust_remote_code, **hub, **backend
    )
    return model, tokenizer, processor


def load_pretrained(
    source: str | Path,
    *,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    kind: str | None = None,
    trust_remote_code: bool | None = None,
    hub_files: Sequence[tuple[str, str]] = (),
) -> HFClip:
    """Load a ``save_pretrained`` folder or a hub id as an :class:`HFClip`.

    ``kind`` defaults to ``"embedded"`` for the shipped tiny CLIP's folder and ``"real"`` otherwise.
    Remote code is trusted for local folders (their code is already on this machine) and when
    asked (LINE). Models built from remote code (LINE's) get their computed buffers recomputed
    after loading (:func:`~helpers.clip_compat.reinit_non_persistent_buffers`): transformers 5.x
    leaves them empty, and LINE's own ``_init_weights`` does not fill them (its EVA02 RoPE).
    A hub id is read from the cache only when the hub cannot be reached.
    """
    is_dir = Path(source).is_dir()
    embedded_dir = _register_embedded()
    if kind is None:
        same = is_dir and embedded_dir is not None and Path(source).resolve() == embedded_dir.resolve()
        kind = "embedded" if same else "real"
    trust = is_dir if trust_remote_code is None else trust_remote_code
    local_only = False if is_dir else offline_plan(name, [(str(source), "config.json"), *hub_files])
    if trust:
        apply_legacy_shims()  # remote code written for transformers 4.x (LINE's)
    try:
        with quiet_transformers(), hub_offline(local_only), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, tokenizer, processor = _from_pretrained(str(source), trust, local_only)
            spec = spec_from_processor(processor)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(explain_load_error(name, err)) from err
    module.float().eval().requires_grad_(False)
    if type(module).__module__.startswith("transformers_modules"):  # remote code: LINE's
        reinit_non_persistent_buffers(module)
    scale, scale_source = learned_logit_scale(module)  # from the float32 weights
    module.to(device=device, dtype=dtype)
    return HFClip(
        name=name,
        backend="hf",
        kind=kind,
        module=module,
        preprocess_spec=spec,
        logit_scale=scale,
        logit_scale_source=scale_source,
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        processor=processor,
    )


def _require_timm(name: str) -> None:
    """Raise a one-line :class:`ModelLoadError` when timm (LINE's image tower) cannot be imported."""
    try:
        import timm  # noqa: F401
    except ModuleNotFoundError as err:
        if err.name == "timm":
            raise ModelLoadError(
                f"{name} の画像側は timm の EVA02 です: timm がありません"
                " (`%pip install timm`、torchvision も必要)。"
            ) from err
        raise ModelLoadError(
            f"{name} には timm が必要ですが import できません ({err.name} がありません;"
            " timm は torchvision を使います)。"
        ) from err
    except Exception as err:
        raise ModelLoadError(
            f"{name} には timm が必要ですが import できません ({type(err).__name__}: {err})。"
        ) from err


def load_line(device: torch.device, dtype: torch.dtype) -> HFClip:
    """LINE's ``clip-japanese-base`` (remote code, EVA02 image tower through timm, BERT text tower)."""
    _require_timm(DEFAULT_MODEL)
    return load_pretrained(
        DEFAULT_MODEL,
        name=DEFAULT_MODEL,
        device=device,
        dtype=dtype,
        kind="real",
        trust_remote_code=True,
        hub_files=LINE_NEEDS[1:],
    )


def load_embedded(device: torch.device, dtype: torch.dtype) -> HFClip:
    """The tiny CLIP shipped in ``helpers/assets/tiny-clip-ja`` (see :mod:`helpers.tiny_clip`)."""
    model_dir = _register_embedded()
    if model_dir is None:
        raise ModelLoadError("同梱の小さなモデルのコード (helpers.tiny_clip) を import できません。")
    if not (model_dir / "model.safetensors").exists():
        raise ModelLoadError(
            "同梱の小さなモデル (helpers/assets/tiny-clip-ja) の重みがありません: "
            "`python -m helpers.tiny_clip train` で作ってください。"
        )
    return load_pretrained(
        model_dir, name=EMBEDDED, device=device, dtype=dtype, kind="embedded", trust_remote_code=False
    )


# ---------------------------------------------------------------- random ViT-B/16-sized CLIP

RANDOM_SEED = 0
RANDOM_VOCAB = 8192


class CharTokenizer:
    """Characters to ids by code point (``random:vit-b16`` only): ``[BOS] chars [EOS]``, padded with 0.

    Needs no vocabulary file; ids 2..vocab-2 are characters (folded by code point), 1 is BOS and
    ``vocab - 1`` is EOS (where CLIP's text tower pools).
    """

    pad_token_id = 0
    bos_token_id = 1

    def __init__(self, vocab_size: int = RANDOM_VOCAB, max_length: int = 77) -> None:
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.eos_token_id = vocab_size - 1

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        span = self.vocab_size - 3
        rows = [
            [self.bos_token_id, *(2 + ord(c) % span for c in text[: self.max_length - 2]), self.eos_token_id]
            for text in texts
        ]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def random_vit_b16_config(**overrides: Any):
    """A ``CLIPConfig`` of ViT-B/16 size: image 224, patch 16, 12 layers x 768 (vision); 12 x 512 text;
    projection 512; a small character vocabulary. ``overrides`` replace top-level keys (tests)."""
    from transformers import CLIPConfig

    eos = RANDOM_VOCAB - 1
    settings: dict[str, Any] = {
        "text_config": {
            "vocab_size": RANDOM_VOCAB,
            "hidden_size": 512,
            "intermediate_size": 2048,
            "num_hidden_layers": 12,
            "num_attention_heads": 8,
            "max_position_embeddings": 77,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": eos,
        },
        "vision_config": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 16,
        },
        "projection_dim": 512,
    }
    settings.update(overrides)
    return CLIPConfig(**settings)


def load_random_vit_b16(
    device: torch.device, dtype: torch.dtype, *, config_overrides: dict[str, Any] | None = None
) -> HFClip:
    """``random:vit-b16``: a random-initialised CLIP (seed 0) of ViT-B/16 size, built locally.

    Same cost as the real towers, no download; answers mean nothing. Preprocessing: shorter side
    to the image size (bicubic), centre crop, CLIP mean/std.
    """
    from transformers import CLIPModel

    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        config = random_vit_b16_config(**(config_overrides or {}))
        torch.manual_seed(RANDOM_SEED)
        module = CLIPModel(config)
    scale, scale_source = learned_logit_scale(module)
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    size = int(config.vision_config.image_size)
    return HFClip(
        name=RANDOM_VIT_B16,
        backend="random",
        kind="random",
        module=module,
        preprocess_spec=PreprocessSpec(size, "shorter", "bicubic", CLIP_MEAN, CLIP_STD),
        logit_scale=scale,
        logit_scale_source=scale_source + ", random init",
        device=device,
        dtype=dtype,
        tokenizer=CharTokenizer(
            int(config.text_config.vocab_size), int(config.text_config.max_position_embeddings)
        ),
        processor=None,
    )
