"""``random:vit-b16``: a random-initialised CLIP of ViT-B/16 size, built locally, for speed measurements.

Same cost as the real towers (image 224, patch 16, 12 x 768 vision; 12 x 512 text; projection
512), no download, fixed seed; its answers mean nothing, so :func:`helpers.models.check` only
checks shapes and finiteness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from helpers.models.base import CLIP_MEAN, CLIP_STD, RANDOM_VIT_B16, PreprocessSpec, scoring_of
from helpers.models.compat import quiet_transformers
from helpers.models.hf import HFClip
from helpers.zeroshot import Scoring

__all__ = ["CharTokenizer", "RandomClip", "load_random_vit_b16", "random_vit_b16_config"]


class RandomClip(HFClip):
    """A transformers ``CLIPModel`` with random weights and a character tokenizer."""

    backend = "random"


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
) -> RandomClip:
    """``random:vit-b16``: a random-initialised CLIP (seed 0) of ViT-B/16 size, built locally.

    Same cost as the real towers, no download; answers mean nothing. Preprocessing: shorter side
    to the image size (bicubic), centre crop, CLIP mean/std.
    """
    from transformers import CLIPModel

    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        config = random_vit_b16_config(**(config_overrides or {}))
        torch.manual_seed(RANDOM_SEED)
        module = CLIPModel(config)
    learned = scoring_of(module)
    scoring = Scoring(learned.kind, learned.scale, learned.bias, learned.source + ", random init")
    module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    size = int(config.vision_config.image_size)
    return RandomClip(
        name=RANDOM_VIT_B16,
        kind="random",
        module=module,
        preprocess_spec=PreprocessSpec(size, "shorter", "bicubic", CLIP_MEAN, CLIP_STD),
        scoring=scoring,
        device=device,
        dtype=dtype,
        tokenizer=CharTokenizer(
            int(config.text_config.vocab_size), int(config.text_config.max_position_embeddings)
        ),
        processor=None,
    )
