"""Zero-shot scoring: the one place where image and label embeddings become probabilities.

It works on tensors and a small :class:`Scoring` value, and knows nothing of the rest of
``helpers``. Both sides are L2-normalised in float32, then:

- ``"softmax"`` (CLIP, CLOOB): ``softmax(scale · cos)`` over the labels; each row sums to 1.
- ``"sigmoid"`` (SigLIP): ``sigmoid(scale · cos + bias)`` for every label on its own, with the
  model's learned bias; a row need not sum to 1 (several labels, or none, may be likely).

A prompt ensemble (several templates per label) averages each label's normalised text embeddings
and normalises again (:func:`ensemble`, :func:`label_embeddings`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["KINDS", "Scoring", "cosine", "ensemble", "label_embeddings", "logits", "probabilities"]

KINDS: tuple[str, ...] = ("softmax", "sigmoid")


@dataclass(frozen=True)
class Scoring:
    """How a model turns cosine similarities into probabilities.

    ``scale`` is the inverse temperature the model learned (or fixed, for CLOOB); ``bias`` is
    SigLIP's learned logit bias (0 for softmax models, where a shared bias would cancel out);
    ``source`` says where the numbers came from, in words (e.g. ``"logit_scale.exp() (learned)"``).
    """

    kind: Literal["softmax", "sigmoid"]
    scale: float
    bias: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown scoring kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if not self.scale > 0:
            raise ValueError(f"the logit scale must be positive, got {self.scale!r}")
        if self.kind == "softmax" and self.bias != 0.0:
            raise ValueError("a softmax over labels has no bias (it would cancel out)")

    def describe(self) -> str:
        """E.g. ``softmax, scale 100.00`` or ``sigmoid, scale 117.33, bias -12.93``."""
        bias = f", bias {self.bias:.2f}" if self.kind == "sigmoid" else ""
        return f"{self.kind}, scale {self.scale:.2f}{bias}"


def cosine(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Cosine similarities [N, T] in float32 on ``images``' device (both sides normalised here)."""
    images = F.normalize(images.float(), dim=-1)
    texts = F.normalize(texts.float().to(images.device), dim=-1)
    return images @ texts.T


def logits(images: torch.Tensor, texts: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """``scale · cos + bias`` [N, T], float32."""
    return scoring.scale * cosine(images, texts) + scoring.bias


def probabilities(images: torch.Tensor, texts: torch.Tensor, scoring: Scoring) -> torch.Tensor:
    """Per-image label probabilities [N, T], float32: a softmax over labels or a per-label sigmoid."""
    z = logits(images, texts, scoring)
    return z.softmax(dim=-1) if scoring.kind == "softmax" else z.sigmoid()


def ensemble(per_template: Sequence[torch.Tensor]) -> torch.Tensor:
    """One embedding per label [T, D] from several templates' [T, D]: mean of normalised, normalised."""
    if not per_template:
        raise ValueError("no templates given")
    stacked = torch.stack([F.normalize(t.float(), dim=-1) for t in per_template])
    return F.normalize(stacked.mean(dim=0), dim=-1)


def label_embeddings(
    encode: Callable[[list[str]], torch.Tensor], labels: Sequence[str], templates: Sequence[str] = ("{}",)
) -> torch.Tensor:
    """Normalised float32 label embeddings [T, D]: ``encode`` each template filled with every label,
    then :func:`ensemble` (one template: simply its normalised embeddings)."""
    if not labels:
        raise ValueError("no labels given")
    return ensemble([encode([template.format(label) for label in labels]) for template in templates])
