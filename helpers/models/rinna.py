"""rinna's Japanese CLIP/CLOOB through their optional ``japanese_clip`` package.

The package is not on PyPI; it installs from its git repository, without its pins (it asks for
``sentencepiece<=0.1.94``, which has no wheels for Python >= 3.10)::

    %pip install --no-deps git+https://github.com/rinnakk/japanese-clip.git

It was written for transformers 4.x and huggingface_hub < 0.26:
:func:`helpers.models.compat.apply_legacy_shims` supplies what it imports
(``huggingface_hub.cached_download``, ``transformers.modeling_utils.ModelOutput``) and lets its
``is_composition`` configs print. It also needs torchvision (Colab has it).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from PIL import Image

from helpers.models.base import CLIP_MEAN, CLIP_STD, ClipModel, ModelLoadError, PreprocessSpec, scoring_of
from helpers.models.compat import (
    apply_legacy_shims,
    as_features,
    lower_case_like_slow_tokenizers,
    quiet_transformers,
    repair_unigram_unk_id,
)
from helpers.models.hub import explain_load_error, hub_offline, offline_plan

__all__ = ["INSTALL_COMMAND", "RinnaClip", "load_rinna"]

INSTALL_COMMAND = "%pip install --no-deps git+https://github.com/rinnakk/japanese-clip.git"
TOKENIZER_REPO = "rinna/japanese-roberta-base"
MAX_SEQ_LEN = 77


class RinnaClip(ClipModel):
    """A ``japanese_clip`` model with its torchvision transform and its T5 (sentencepiece) tokenizer."""

    def __init__(self, *, package: Any, transform: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.package = package
        self.transform = transform
        self.tokenizer = tokenizer
        repair_unigram_unk_id(tokenizer)  # <unk> is 0 in rinna's SentencePiece model; 5.x says 2
        params = inspect.signature(self.module.get_image_features).parameters
        self._return_dict = {"return_dict": True} if "return_dict" in params else {}

    def _preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return torch.stack([self.transform(image.convert("RGB")) for image in images])

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = lower_case_like_slow_tokenizers(
            texts, self.tokenizer
        )  # rinna sets do_lower_case; 5.x ignores it
        return self.package.tokenize(texts, tokenizer=self.tokenizer, max_seq_len=MAX_SEQ_LEN, device="cpu")

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # return_dict=True so the model never reads config.use_return_dict (deprecated in 5.x, warns)
        return as_features(self.module.get_image_features(pixel_values=pixel_values, **self._return_dict))

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return as_features(self.module.get_text_features(**inputs, **self._return_dict))


def _import_package() -> Any:
    """``japanese_clip`` with the shims in place, or a one-line :class:`ModelLoadError`."""
    apply_legacy_shims()
    try:
        import japanese_clip
    except ModuleNotFoundError as err:
        if err.name == "japanese_clip":
            raise ModelLoadError(f"rinna のモデルには japanese_clip が必要です: {INSTALL_COMMAND}") from err
        raise ModelLoadError(f"japanese_clip を import できません ({err.name} がありません)。") from err
    except ImportError as err:
        raise ModelLoadError(f"japanese_clip を import できません ({err})。") from err
    return japanese_clip


def load_rinna(name: str, device: torch.device, dtype: torch.dtype) -> RinnaClip:
    """``rinna/japanese-clip-vit-b-16`` or ``rinna/japanese-cloob-vit-b-16`` through ``japanese_clip``.

    Preprocessing is rinna's own (shorter side to 224 bilinear, centre crop, CLIP mean/std);
    logit scale: CLIP's learned ``logit_scale.exp()``, CLOOB's fixed ``inv_tau``.
    """
    package = _import_package()
    local_only = offline_plan(name, [(name, "config.json"), (TOKENIZER_REPO, "spiece.model")])
    try:
        with quiet_transformers(), hub_offline(local_only):
            module, transform = package.load(name, device="cpu")
            tokenizer = package.load_tokenizer()
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(explain_load_error(name, err)) from err
    module.float().eval().requires_grad_(False)
    scoring = scoring_of(module)  # from the float32 weights
    module.to(device=device, dtype=dtype)
    size = int(module.config.vision_config.image_size)
    return RinnaClip(
        name=name,
        backend="rinna",
        kind="real",
        module=module,
        preprocess_spec=PreprocessSpec(
            # torchvision's CenterCrop rounds the crop offset
            size,
            "shorter",
            "bilinear",
            CLIP_MEAN,
            CLIP_STD,
            crop_rounding="half_even",
        ),
        scoring=scoring,
        device=device,
        dtype=dtype,
        package=package,
        transform=transform,
        tokenizer=tokenizer,
    )
