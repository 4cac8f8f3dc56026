"""How far a runtime/precision's answers are from eager fp32's: the accuracy table of notebook 08.

Per candidate: the minimum cosine between its image embeddings and the reference's, the share of
pictures whose zero-shot top-1 label agrees, and the largest |Δ probability| of any label. Each
model's own text tower encodes the labels (as ``python -m helpers.classify`` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from helpers.models import ClipModel

__all__ = ["Agreement", "agreement", "agreement_table"]


@dataclass(frozen=True)
class Agreement:
    """One candidate against the reference on ``n`` pictures."""

    name: str
    min_cosine: float
    top1_agreement: float
    """Share of pictures whose most probable label is the reference's."""
    max_prob_diff: float
    n: int


def _answers(model: ClipModel, pixels: torch.Tensor, labels: Sequence[str], template: str):
    image = F.normalize(model.encode_images(pixels, batch_size=16).float().cpu(), dim=-1)
    text = model.label_features(labels, (template,))
    return image, model.probabilities(image, text)


def agreement(
    reference: ClipModel,
    candidates: Mapping[str, ClipModel],
    images: Sequence[Image.Image],
    labels: Sequence[str],
    template: str = "{}の写真",
) -> list[Agreement]:
    """Compare every candidate with ``reference`` on ``images`` classified among ``labels``."""
    pixels = reference.preprocess(list(images))
    ref_image, ref_probs = _answers(reference, pixels, labels, template)
    rows = []
    for name, model in candidates.items():
        image, probs = _answers(model, pixels, labels, template)
        rows.append(
            Agreement(
                name,
                float((image * ref_image).sum(dim=-1).min()),
                float((probs.argmax(-1) == ref_probs.argmax(-1)).float().mean()),
                float((probs - ref_probs).abs().max()),
                len(images),
            )
        )
    return rows


def agreement_table(rows: Sequence[Agreement], title: str = "") -> str:
    """The rows as a Markdown table (Japanese headers)."""
    lines = [f"**{title}**", ""] if title else []
    lines += [
        "| 実行方法 | 最小コサイン (対 eager fp32) | top-1 の一致 | 確率の差 (最大) | 画像数 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.min_cosine:.4f} | {r.top1_agreement:.0%} | {r.max_prob_diff:.3f} | {r.n} |"
        )
    return "\n".join(lines)
