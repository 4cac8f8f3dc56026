"""A stand-in for rinna's ``japanese_clip`` package, for tests only (the real one is not on PyPI).

Same public API (``load``, ``load_tokenizer``, ``tokenize``, ``available_models``) with tiny
random models, and the same things that break on new libraries: it imports
``huggingface_hub.cached_download`` and ``transformers.modeling_utils.ModelOutput`` (both gone
in huggingface_hub 1.x / transformers 5.x) and builds its config from a dict with
``is_composition = True`` and an ``__init__`` that refuses to run without sub-configs, whose
``repr`` transformers >= 4.52 breaks. Importing it proves the shims in ``helpers.models.compat``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from huggingface_hub import cached_download, hf_hub_url  # noqa: F401 - as rinna's auto_model.py
from PIL import Image
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_utils import ModelOutput  # noqa: F401 - as rinna's modeling_clip.py

MEAN = np.array((0.48145466, 0.4578275, 0.40821073), dtype=np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), dtype=np.float32)
IMAGE_SIZE = 32
VOCAB = 100
CLS_ID = 4
LOADED: list[str] = []
"""Names passed to :func:`load`, in order (tests read it)."""


class FakeVisionConfig(PretrainedConfig):
    model_type = "fake_clip_vision_model"

    def __init__(self, image_size: int = IMAGE_SIZE, **kwargs):
        super().__init__(**kwargs)
        self.image_size = image_size


class FakeCLIPConfig(PretrainedConfig):
    """Like rinna's CLIPConfig: cannot be built without sub-configs, says so with is_composition."""

    model_type = "fake_rinna_clip"
    is_composition = True

    def __init__(self, vision_config=None, projection_dim=8, init_inv_tau=None, **kwargs):
        super().__init__(**kwargs)
        if vision_config is None:
            raise ValueError("`vision_config` can not be `None`.")
        self.vision_config = FakeVisionConfig(**vision_config)
        self.projection_dim = projection_dim
        if init_inv_tau is not None:
            self.init_inv_tau = init_inv_tau


class FakeModel(nn.Module):
    """CLIP (learned ``logit_scale``) or CLOOB (fixed ``inv_tau``) with rinna's feature methods."""

    def __init__(self, config: FakeCLIPConfig, cloob: bool) -> None:
        super().__init__()
        self.config = config
        dim = config.projection_dim
        self.vision = nn.Linear(3 * 4 * 4, dim)
        self.embed = nn.Embedding(VOCAB, dim)
        if cloob:
            self.inv_tau = config.init_inv_tau
        else:
            self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def get_image_features(
        self, pixel_values=None, output_attentions=None, output_hidden_states=None, return_dict=None
    ):
        pooled = nn.functional.adaptive_avg_pool2d(pixel_values, 4).flatten(1)
        return self.vision(pooled)

    def get_text_features(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
    ):
        assert position_ids is not None and attention_mask is not None
        return self.embed(input_ids)[:, 0] + self.embed(input_ids).mean(1)


def available_models():
    return ["rinna/japanese-clip-vit-b-16", "rinna/japanese-cloob-vit-b-16"]


def _transform(image: Image.Image) -> torch.Tensor:
    """Shorter side to IMAGE_SIZE (bilinear), centre crop, CLIP mean/std: rinna's torchvision recipe
    (``Resize(size)``, ``CenterCrop(size)``) written in PIL with torchvision's size and offset formulas."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = IMAGE_SIZE, int(IMAGE_SIZE * long / short)  # torchvision's resized size
    image = image.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BILINEAR)
    left = round((image.size[0] - IMAGE_SIZE) / 2.0)  # torchvision's CenterCrop offsets
    top = round((image.size[1] - IMAGE_SIZE) / 2.0)
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE)).convert("RGB")
    array = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(array).permute(2, 0, 1)


def load(model_name: str, device="cpu", **kwargs):
    LOADED.append(model_name)
    cloob = "cloob" in model_name
    settings = {"vision_config": {"image_size": IMAGE_SIZE}, "projection_dim": 8}
    if cloob:
        settings["init_inv_tau"] = 30.0
    config = FakeCLIPConfig.from_dict(settings)  # logs repr(config): needs has_no_defaults_at_init
    torch.manual_seed(0)
    model = FakeModel(config, cloob).eval().to(device)
    return model, _transform


class _Tokenizer:
    cls_token_id = CLS_ID

    def __call__(self, texts, max_length, padding, truncation, add_special_tokens):
        ids = [[5 + ord(c) % (VOCAB - 5) for c in t][:max_length] for t in texts]
        ids = [row + [0] * (max_length - len(row)) for row in ids]
        mask = [[1 if i else 0 for i in row] for row in ids]
        return {"input_ids": ids, "attention_mask": mask}


def load_tokenizer():
    """A stand-in tokenizer; with ``FAKE_JAPANESE_CLIP_SPIECE`` set to a folder holding a SentencePiece
    ``spiece.model``, the real recipe: ``T5Tokenizer`` from it with ``do_lower_case = True``, as rinna's."""
    folder = os.environ.get("FAKE_JAPANESE_CLIP_SPIECE")
    if not folder:
        return _Tokenizer()
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(folder)
    tokenizer.do_lower_case = True  # due to some bug of tokenizer config loading (rinna's comment)
    return tokenizer


def tokenize(texts, tokenizer=None, max_seq_len=77, device="cpu"):
    if isinstance(texts, str):
        texts = [texts]
    tokenizer = tokenizer or load_tokenizer()
    out = tokenizer(
        texts, max_length=max_seq_len - 1, padding="max_length", truncation=True, add_special_tokens=False
    )
    input_ids = [[tokenizer.cls_token_id, *ids] for ids in out["input_ids"]]
    attention_mask = [[1, *am] for am in out["attention_mask"]]
    position_ids = [list(range(len(input_ids[0])))] * len(texts)
    return {
        "input_ids": torch.tensor(input_ids).to(device),
        "attention_mask": torch.tensor(attention_mask).to(device),
        "position_ids": torch.tensor(position_ids).to(device),
    }
