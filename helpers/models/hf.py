"""The Hugging Face backend of :mod:`helpers.models`: ``from_pretrained`` folders and hub ids.

It serves the real default model (LINE's ``clip-japanese-base``, remote code + timm) and any
folder or hub id saved with ``save_pretrained`` whose model has ``get_image_features`` /
``get_text_features``; the SigLIP, embedded and random backends build on it. Loading fails fast
and clearly when the hub cannot be reached and the model is not cached; it raises when weights
are missing from the checkpoint and names unexpected ones in one line; remote code runs only when
trusted; and what transformers 5.x leaves broken in older remote code is repaired (see
:mod:`helpers.models.compat`). Progress bars and transformers' log chatter stay off.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from helpers.models.base import (
    CLIP_MEAN,
    CLIP_STD,
    ClipModel,
    ModelLoadError,
    PreprocessSpec,
    scoring_of,
)
from helpers.models.compat import (
    apply_legacy_shims,
    as_features,
    ensure_post_init,
    lower_case_like_slow_tokenizers,
    quiet_transformers,
    reinit_non_persistent_buffers,
    repair_unigram_unk_id,
)
from helpers.models.hub import explain_load_error, hub_offline, offline_plan, read_config

__all__ = [
    "HFClip",
    "check_loading_info",
    "load_line",
    "load_pretrained",
    "spec_from_processor",
]

LINE_NEEDS: tuple[tuple[str, str], ...] = (
    ("rinna/japanese-clip-vit-b-16", "config.json"),  # LINE's text tower config, read at build time
    ("rinna/japanese-roberta-base", "spiece.model"),  # LINE's tokenizer wraps this one
)
"""Other repositories' files LINE's remote code reads while loading (checked in the cache when offline)."""

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

    backend = "hf"

    def __init__(self, *, tokenizer: Any, processor: Any, **kwargs: Any) -> None:
        super().__init__(backend=self.backend, **kwargs)
        self.tokenizer = tokenizer
        self.processor = processor
        params = inspect.signature(self.module.get_text_features).parameters
        self._text_keys = tuple(k for k in TEXT_INPUT_KEYS if k in params) or ("input_ids",)
        for tok in (tokenizer, getattr(tokenizer, "tokenizer", None)):  # LINE's wraps a T5Tokenizer
            repair_unigram_unk_id(tok)

    def _preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        if self.processor is None:
            return super()._preprocess(images)
        return torch.as_tensor(self.processor(images=images, return_tensors="pt")["pixel_values"])

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = lower_case_like_slow_tokenizers(texts, self.tokenizer)  # as 4.x did for do_lower_case
        if type(self.tokenizer).__module__.startswith("transformers."):
            encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        else:  # remote-code tokenizers (LINE's) pad and return tensors themselves
            encoded = self.tokenizer(texts)
        return {k: torch.as_tensor(encoded[k]) for k in self._text_keys if k in encoded}

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return as_features(self.module.get_image_features(pixel_values=pixel_values))

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return as_features(self.module.get_text_features(**inputs))


# ---------------------------------------------------------------- loading


def check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Raise :class:`ModelLoadError` when the checkpoint lacked weights the model needs (they would be
    random); name unexpected ones (present but unused) in one line on stderr."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [str(m[0] if isinstance(m, list | tuple) else m) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        what = missing or mismatched
        raise ModelLoadError(
            f"{name} のチェックポイントに{'ない' if missing else '形の合わない'}重みが {len(what)} 個あります"
            f" ({', '.join(what[:3])}{' …' if len(what) > 3 else ''}): その部分は乱数のままになるので"
            " 読み込みを止めました。保存し直したフォルダーか、モデルのコードと同じ版の重みを使ってください。"
        )
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        print(
            f"注意: {name} のチェックポイントに使われない重みが {len(unexpected)} 個あります"
            f" ({', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''})。",
            file=sys.stderr,
        )


def _from_pretrained(
    source: str, name: str, trust_remote_code: bool, local_only: bool, processor_class: type | None
) -> tuple[Any, Any, Any]:
    """(model, tokenizer, image processor) through the Auto classes; remote model classes get
    :func:`~helpers.models.compat.ensure_post_init` before their weights load."""
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
        model, info = model_class.from_pretrained(source, config=config, output_loading_info=True, **hub)
    else:
        model, info = AutoModel.from_pretrained(
            source, config=config, trust_remote_code=trust_remote_code, output_loading_info=True, **hub
        )
    check_loading_info(name, info)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
    if processor_class is not None:
        processor = processor_class.from_pretrained(source, **hub)
    else:
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
    kind: str = "real",
    trust_remote_code: bool = False,
    hub_files: Sequence[tuple[str, str]] = (),
    wrapper: type[HFClip] | None = None,
    processor_class: type | None = None,
) -> HFClip:
    """Load a ``save_pretrained`` folder or a hub id as an :class:`HFClip` (or ``wrapper``).

    Code shipped with a model (``auto_map`` in its config) runs only with ``trust_remote_code``:
    :func:`helpers.models.load_clip` grants it to the known hub ids (LINE's) and to a local folder
    only when asked. Models built from remote code get their computed buffers recomputed after
    loading (:func:`~helpers.models.compat.reinit_non_persistent_buffers`): transformers 5.x leaves
    them empty, and LINE's own ``_init_weights`` does not fill them (its EVA02 RoPE). A hub id is
    read from the cache only when the hub cannot be reached. ``processor_class`` replaces
    ``AutoImageProcessor`` (SigLIP's PIL processor).
    """
    local_only = (
        False if Path(source).is_dir() else offline_plan(name, [(str(source), "config.json"), *hub_files])
    )
    try:
        with quiet_transformers(), hub_offline(local_only):
            if read_config(source, local_only).get("auto_map") and not trust_remote_code:
                raise ModelLoadError(
                    f"{name} は自前の Python コード (config.json の auto_map) を含みます:"
                    " 中身を確かめて信頼できる"
                    "なら trust_remote_code=True (コマンドでは --trust-remote-code) を付けてください。"
                )
            if trust_remote_code:
                apply_legacy_shims()  # remote code written for transformers 4.x (LINE's)
            module, tokenizer, processor = _from_pretrained(
                str(source), name, trust_remote_code, local_only, processor_class
            )
            spec = spec_from_processor(processor)
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(explain_load_error(name, err)) from err
    module.float().eval().requires_grad_(False)
    if type(module).__module__.startswith("transformers_modules"):  # remote code: LINE's
        reinit_non_persistent_buffers(module)
    scoring = scoring_of(module)  # from the float32 weights
    module.to(device=device, dtype=dtype)
    return (wrapper or HFClip)(
        name=name,
        kind=kind,
        module=module,
        preprocess_spec=spec,
        scoring=scoring,
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


def load_line(name: str, device: torch.device, dtype: torch.dtype) -> HFClip:
    """LINE's CLYP models (remote code, EVA02 image tower through timm, BERT text tower):
    ``clip-japanese-base`` (verified against transformers 4.51.3) and ``-v2`` (same code layout,
    loaded with the same shims)."""
    _require_timm(name)
    return load_pretrained(
        name,
        name=name,
        device=device,
        dtype=dtype,
        kind="real",
        trust_remote_code=True,
        hub_files=LINE_NEEDS,
    )
