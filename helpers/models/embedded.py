"""The embedded backend: the tiny Japanese CLIP in ``helpers/assets/tiny-clip-ja``, and its architecture.

A small conv image tower and a character-level text transformer, trained on drawn shapes by
``python -m helpers.tiny_clip train`` (:mod:`helpers.tiny_clip`). ``TinyClipConfig`` /
``TinyClipModel`` are ordinary transformers classes; :func:`register` makes
``AutoConfig``/``AutoModel.from_pretrained`` recognise ``model_type == "tiny-clip-ja"``, and
:func:`load_embedded` loads the shipped folder through the same ``from_pretrained`` path as hub models.
``get_image_features``/``get_text_features`` return plain, *unnormalised* tensors (as CLIP's
towers do); the forward pass normalises them, multiplies by ``logit_scale.exp()`` and, with
``return_loss=True``, computes the contrastive loss.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from helpers.models.base import EMBEDDED, ModelLoadError
from helpers.models.hf import HFClip, load_pretrained

__all__ = [
    "MODEL_DIR",
    "MODEL_TYPE",
    "TinyClipConfig",
    "TinyClipModel",
    "contrastive_loss",
    "load_embedded",
    "register",
]

MODEL_TYPE = "tiny-clip-ja"
MODEL_DIR: Path = Path(__file__).resolve().parent.parent / "assets" / "tiny-clip-ja"
"""The shipped model folder (config, weights, tokenizer, image processor, model card)."""


class TinyClipConfig(PretrainedConfig):
    """Sizes of both towers of the tiny Japanese CLIP."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 64,
        max_text_length: int = 24,
        text_hidden_size: int = 128,
        text_layers: int = 2,
        text_heads: int = 4,
        text_ffn_size: int = 256,
        image_size: int = 64,
        image_channels: tuple[int, ...] | list[int] = (32, 64, 128, 192),
        projection_dim: int = 128,
        logit_scale_init_value: float = math.log(1 / 0.07),
        pad_token_id: int = 0,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.max_text_length = max_text_length
        self.text_hidden_size = text_hidden_size
        self.text_layers = text_layers
        self.text_heads = text_heads
        self.text_ffn_size = text_ffn_size
        self.image_size = image_size
        self.image_channels = list(image_channels)
        self.projection_dim = projection_dim
        self.logit_scale_init_value = logit_scale_init_value
        super().__init__(pad_token_id=pad_token_id, **kwargs)


@dataclass
class TinyClipOutput(ModelOutput):
    """What ``TinyClipModel.forward`` returns (CLIP's names, so code written for CLIP reads it)."""

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None


class ConvImageTower(nn.Module):
    """Four 3x3 conv + BatchNorm + ReLU layers (three of them stride 2), global average pooling."""

    def __init__(self, channels: list[int], out_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, c_out in enumerate(channels):
            stride = 2 if i < 3 else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Linear(c_in, out_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(self.convs(pixel_values).mean(dim=(2, 3)))


class TextBlock(nn.Module):
    """One pre-norm transformer encoder layer (self-attention + MLP)."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        x = x + self.out(attn.transpose(1, 2).reshape(b, t, h))
        return x + self.mlp(self.norm2(x))


class CharTextTower(nn.Module):
    """Character embeddings + positions, a few transformer layers, the first ([CLS]) token out."""

    def __init__(self, config: TinyClipConfig) -> None:
        super().__init__()
        hidden = config.text_hidden_size
        self.tokens = nn.Embedding(config.vocab_size, hidden)
        self.positions = nn.Embedding(config.max_text_length, hidden)
        self.blocks = nn.ModuleList(
            TextBlock(hidden, config.text_heads, config.text_ffn_size) for _ in range(config.text_layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, config.projection_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        input_ids = input_ids[:, : self.positions.num_embeddings]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask[:, : input_ids.shape[1]].bool()
        x = self.tokens(input_ids) + self.positions.weight[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x, keep)
        return self.proj(self.norm(x[:, 0]))


class TinyClipModel(PreTrainedModel):
    """A tiny two-tower CLIP for 64x64 drawn shapes and short Japanese captions."""

    config_class = TinyClipConfig
    base_model_prefix = "tiny_clip"
    main_input_name = "pixel_values"

    def __init__(self, config: TinyClipConfig) -> None:
        super().__init__(config)
        self.vision = ConvImageTower(config.image_channels, config.projection_dim)
        self.text = CharTextTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, TinyClipModel):
            module.logit_scale.data.fill_(float(module.config.logit_scale_init_value))

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] from pixel values [B, 3, 64, 64] (not normalised)."""
        return self.vision(pixel_values)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Text embeddings [B, D] from token ids (first token [CLS]) and their mask (not normalised)."""
        return self.text(input_ids, attention_mask)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool = False,
        label_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> TinyClipOutput:
        """CLIP's forward: cosine similarity x ``logit_scale.exp()`` for every image-text pair.

        With ``return_loss``, the symmetric cross-entropy loss; ``label_ids`` (the class of each
        pair) makes it use soft targets, so pairs of the same class are not counted as wrong.
        """
        image_embeds = F.normalize(self.get_image_features(pixel_values), dim=-1)
        text_embeds = F.normalize(self.get_text_features(input_ids, attention_mask), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_embeds @ text_embeds.T
        loss = None
        if return_loss:
            loss = contrastive_loss(logits_per_image, label_ids)
        return TinyClipOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
        )


def contrastive_loss(logits_per_image: torch.Tensor, label_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP loss; with ``label_ids``, targets spread evenly over pairs of the same label."""
    n = logits_per_image.shape[0]
    if label_ids is None:
        targets = torch.eye(n, device=logits_per_image.device)
    else:
        same = (label_ids[:, None] == label_ids[None, :]).float()
        targets = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2


def register() -> None:
    """Let ``AutoConfig``/``AutoModel`` load folders whose config says ``"model_type": "tiny-clip-ja"``."""
    with contextlib.suppress(ValueError):  # already registered (module imported twice)
        AutoConfig.register(MODEL_TYPE, TinyClipConfig)
    with contextlib.suppress(ValueError):
        AutoModel.register(TinyClipConfig, TinyClipModel)


def load_embedded(
    device: torch.device, dtype: torch.dtype, model_dir: str | Path | None = None, name: str = EMBEDDED
) -> HFClip:
    """The tiny CLIP in ``model_dir`` (default: :data:`MODEL_DIR`), registered and loaded like a hub model."""
    register()
    model_dir = MODEL_DIR if model_dir is None else model_dir
    if not (Path(model_dir) / "model.safetensors").exists():
        raise ModelLoadError(
            f"小さなモデル ({model_dir}) の重みがありません:"
            " `python -m helpers.tiny_clip train` で作ってください。"
        )
    return load_pretrained(model_dir, name=name, device=device, dtype=dtype, kind="embedded")
