"""A :class:`~helpers.models.ClipModel` whose towers something else runs: the part eager autocast
(:mod:`helpers.runtimes.eager`) and ONNX Runtime (:mod:`helpers.runtimes.ort`) share."""

from __future__ import annotations

import torch
from PIL import Image

from helpers.models import ClipModel


class WrappedClip(ClipModel):
    """``model`` with its towers run another way (subclasses give ``_image_features`` and
    ``_text_features``). Name, fingerprint, scoring, preprocessing and tokenisation stay ``model``'s,
    so the commands, :func:`helpers.models.check` and the engines use it unchanged."""

    def __init__(self, model: ClipModel, label: str, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(
            name=model.name,
            backend=model.backend,
            kind=model.kind,
            module=model.module,
            preprocess_spec=model.preprocess_spec,
            scoring=model.scoring,
            device=device,
            dtype=dtype,
        )
        self.base = model
        self.runtime = label
        """What runs the towers, in words (e.g. ``"onnx int8 (CPUExecutionProvider)"``)."""
        self.processor = getattr(model, "processor", "own")  # what helpers.reading asks of HF models
        self.__dict__["fingerprint"] = model.fingerprint

    def _preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        return self.base._preprocess(images)

    def _tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.base._tokenize(texts)
