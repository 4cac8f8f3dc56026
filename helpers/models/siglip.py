"""The SigLIP backend: plain-transformers ``SiglipModel`` folders and hub ids, scored per label.

SigLIP was trained with a sigmoid loss: every image-text pair is scored on its own,
``sigmoid(logit_scale.exp() · cos + logit_bias)``, so its labels are *not* a softmax over each
other (:mod:`helpers.zeroshot`, ``kind="sigmoid"``). Two more things differ from CLIP and are
done here as SigLIP was trained:

- text is padded to ``max_length = min(tokenizer.model_max_length,
  text_config.max_position_embeddings)`` (the text tower pools the last position, so padding to
  the longest text in a batch would change every feature), and only ``input_ids`` go in;
- images go through the PIL SigLIP image processor (a square resize, no crop; on transformers
  5.15 ``AutoImageProcessor`` would ask for torchvision).

Fixed-resolution checkpoints (``model_type`` ``"siglip"``; the SigLIP2 "patch16-256" ones such as
``llm-jp/waon-siglip2-base-patch16-256`` are published this way) load here. NaFlex SigLIP2
(``model_type`` ``"siglip2"``: variable resolution with ``pixel_attention_mask`` and
``spatial_shapes``) is refused in one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from helpers.models.base import ModelLoadError
from helpers.models.compat import lower_case_like_slow_tokenizers
from helpers.models.hf import HFClip, load_pretrained

__all__ = ["MODEL_TYPES", "SiglipClip", "load_siglip", "text_max_length"]

MODEL_TYPES: tuple[str, ...] = ("siglip", "siglip2")
"""``model_type`` values this backend answers for (``siglip2``: to refuse it clearly)."""


def text_max_length(tokenizer: Any, module: Any) -> int:
    """The length SigLIP's text was padded to in training: the smaller of the tokenizer's and the model's."""
    limit = int(getattr(module.config.text_config, "max_position_embeddings", 64))
    model_max = getattr(tokenizer, "model_max_length", None)
    return min(int(model_max), limit) if isinstance(model_max, int) and model_max > 0 else limit


class SiglipClip(HFClip):
    """A ``SiglipModel`` with its tokenizer (padded to ``max_length``) and its PIL image processor."""

    backend = "siglip"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_length = text_max_length(self.tokenizer, self.module)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = lower_case_like_slow_tokenizers(texts, self.tokenizer)  # a no-op unless it asks for it
        encoded = self.tokenizer(
            texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return {"input_ids": torch.as_tensor(encoded["input_ids"])}


def _pil_processor_class() -> type:
    """SigLIP's PIL image processor (``SiglipImageProcessorPil`` on 5.x; the slow class on 4.x is PIL)."""
    try:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    except ImportError:
        from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

        return SiglipImageProcessor
    return SiglipImageProcessorPil


def load_siglip(
    source: str | Path,
    *,
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    model_type: str = "siglip",
    hub_files: Sequence[tuple[str, str]] = (),
) -> SiglipClip:
    """A fixed-resolution SigLIP (``model_type`` ``"siglip"``) as a :class:`SiglipClip`; NaFlex refused."""
    if model_type == "siglip2":
        raise ModelLoadError(
            f"{name} は NaFlex 版 SigLIP2 (model_type siglip2: 可変解像度で pixel_attention_mask と"
            " spatial_shapes を使う) なので、この教材では扱いません。固定解像度の版"
            " (例: llm-jp/waon-siglip2-base-patch16-256、model_type siglip) を使ってください。"
        )
    model = load_pretrained(
        source,
        name=name,
        device=device,
        dtype=dtype,
        hub_files=hub_files,
        wrapper=SiglipClip,
        processor_class=_pil_processor_class(),
    )
    assert isinstance(model, SiglipClip)
    if model.scoring.kind != "sigmoid":
        raise ModelLoadError(f"{name} は SigLIP ですが logit_bias がありません: 確率を計算できません。")
    return model
