"""helpers.models and its backends: resolution, loading, the interface contract, shims, check().

What runs here (no GPU, no hub, no timm, no rinna package):

- the Hugging Face path on folders built in ``tmp_path``: a tiny transformers ``CLIPModel``, a
  tiny CLIP of the embedded model's own architecture (standing in for the shipped weights until
  they exist), and a folder of *remote code* written in the style of LINE's ``clip-japanese-base``
  (an ``is_composition`` config that calls ``dict_torch_dtype_to_str``, a model that never calls
  ``post_init``, an ``_init_weights`` that does nothing, a learned ``itc_loss_fn.temperature`` and
  a rotary-embedding stand-in whose non-persistent buffer transformers 5.x leaves empty);
- ``random:vit-b16`` (once at full size, otherwise with a smaller config);
- rinna's adapter against a FAKE ``japanese_clip`` package (``tests/fake_japanese_clip``) put on
  ``sys.path``: same API, tiny random models, and the imports that break on new libraries;
- the shipped embedded model, offline, when ``helpers/assets/tiny-clip-ja/model.safetensors`` exists.

The RoPE repair is also tested against real timm when timm imports (Colab, the GPU machine).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import helpers.models as models
from helpers import REPO_ROOT, env, tiny_clip
from helpers.models import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MODEL,
    EMBEDDED,
    OFFLINE_NOTICE,
    RANDOM_VIT_B16,
    ClipModel,
    ModelCheckError,
    ModelLoadError,
    PreprocessSpec,
    check,
    describe,
    hub,
    load_clip,
    preprocess_with_spec,
    random_vit,
    requested_model,
)
from helpers.models import hf as models_hf
from helpers.models.compat import (
    apply_legacy_shims,
    as_features,
    ensure_post_init,
    non_persistent_buffer_names,
    quiet_transformers,
    reinit_non_persistent_buffers,
)

CPU = torch.device("cpu")
FAKE_RINNA = Path(__file__).parent / "fake_japanese_clip"
SHIPPED_WEIGHTS = REPO_ROOT / "helpers" / "assets" / "tiny-clip-ja" / "model.safetensors"
needs_shipped = pytest.mark.skipif(not SHIPPED_WEIGHTS.exists(), reason="embedded weights not shipped yet")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No CLIP_MODEL from the caller's shell, and a fresh hub_reachable cache for each test."""
    monkeypatch.delenv("CLIP_MODEL", raising=False)
    env.hub_reachable.cache_clear()
    yield
    if hasattr(env.hub_reachable, "cache_clear"):  # still monkeypatched while this teardown runs
        env.hub_reachable.cache_clear()


def _char_tokenizer(max_length: int = 16):
    """A character-level fast tokenizer ([CLS] + one token per character) knowing the check's words."""
    return tiny_clip.build_tokenizer(max_length, characters="犬猫象車の写真赤い青緑黄色紫丸三角四星絵画像")


def _pil_processor(size: int = 32, **kwargs):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3, **kwargs
    )


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random transformers CLIPModel saved with save_pretrained (+ tokenizer and processor)."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny_hf_clip")
    tokenizer = _char_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    with quiet_transformers():
        CLIPModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _pil_processor(32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def embedded_like_dir(tmp_path_factory) -> Path:
    """A folder like the shipped one (the tiny CLIP's architecture, tokenizer, processor), random weights."""
    import helpers.tiny_clip as tc

    folder = tmp_path_factory.mktemp("tiny_clip_ja")
    tokenizer = tc.build_tokenizer()
    torch.manual_seed(0)
    with quiet_transformers():
        tc.TinyClipModel(tc.TinyClipConfig(vocab_size=len(tokenizer))).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        tc.build_image_processor().save_pretrained(folder)
    return folder


@pytest.fixture
def as_embedded(monkeypatch, embedded_like_dir):
    """Point ``helpers.models.embedded.MODEL_DIR`` at :func:`embedded_like_dir` (the "embedded" model)."""
    from helpers.models import embedded

    monkeypatch.setattr(embedded, "MODEL_DIR", embedded_like_dir)
    return embedded_like_dir


def _picture(width: int = 80, height: int = 50, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _assert_contract(model: ClipModel, size: int) -> None:
    """The interface every backend promises."""
    pixels = model.preprocess([_picture(), _picture(40, 90, 1)])
    assert pixels.dtype == torch.float32 and pixels.device.type == "cpu"
    assert (
        tuple(pixels.shape)
        == (2, 3, size, size)
        == (2, 3, model.preprocess_spec.size, model.preprocess_spec.size)
    )
    image = model.encode_images(pixels)
    text = model.encode_texts(["猫の写真", "犬", "赤い丸"])
    assert image.ndim == 2 and image.shape[0] == 2 and text.shape == (3, image.shape[1])
    assert image.dtype == model.dtype and image.device == model.device
    assert torch.isfinite(image).all() and torch.isfinite(text).all()
    assert torch.allclose(model.encode_images([_picture(), _picture(40, 90, 1)]), image, atol=1e-5)
    assert torch.allclose(model.encode_texts("犬"), text[1:2], atol=1e-5)
    assert torch.allclose(model.encode_images(pixels, batch_size=1), image, atol=1e-5)
    assert isinstance(model.logit_scale, float) and model.logit_scale == model.scoring.scale > 0
    assert model.n_params > 0 and len(model.fingerprint) == 16
    line = describe(model)
    assert "\n" not in line and model.name in line and model.backend in line
    assert f"scoring={model.scoring.kind}" in line and model.scoring.source in line


# ---------------------------------------------------------------- outputs and shims


def test_as_features_accepts_tensors_and_output_objects():
    """transformers 4.x returns a tensor, 5.x a BaseModelOutputWithPooling (features in pooler_output)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    feats = torch.randn(2, 8)
    assert as_features(feats) is feats
    wrapped = BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 5, 8), pooler_output=feats)
    assert as_features(wrapped) is feats
    assert as_features(SimpleNamespace(image_embeds=feats)) is feats
    assert as_features((feats, None)) is feats
    with pytest.raises(TypeError):
        as_features(SimpleNamespace(logits=feats))


def test_legacy_shims_supply_what_old_code_imports(monkeypatch):
    import huggingface_hub
    import transformers.modeling_utils as modeling_utils
    from transformers import CLIPConfig, PretrainedConfig
    from transformers.utils import ModelOutput

    apply_legacy_shims()
    assert apply_legacy_shims() == []  # idempotent
    assert modeling_utils.ModelOutput is ModelOutput
    assert hasattr(PretrainedConfig, "dict_torch_dtype_to_str")
    assert CLIPConfig.has_no_defaults_at_init is False  # transformers' own classes untouched

    class Composite(PretrainedConfig):
        model_type = "composite-test"
        is_composition = True

        def __init__(self, vision_config=None, **kwargs):
            super().__init__(**kwargs)
            if vision_config is None:
                raise ValueError("`vision_config` can not be `None`.")
            self.vision_config = vision_config

    assert Composite.has_no_defaults_at_init is True
    assert "vision_config" in repr(Composite.from_dict({"vision_config": {"width": 4}}))

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or "/cache/file")
    url = huggingface_hub.hf_hub_url("rinna/japanese-clip-vit-b-16", "pytorch_model.bin")
    assert huggingface_hub.cached_download(url, cache_dir="/tmp/jc") == "/cache/file"
    assert (
        calls[0]["repo_id"] == "rinna/japanese-clip-vit-b-16" and calls[0]["filename"] == "pytorch_model.bin"
    )
    assert calls[0]["revision"] == "main" and calls[0]["cache_dir"] == "/tmp/jc"


def test_ensure_post_init_wraps_models_that_forget_it():
    from transformers import PretrainedConfig, PreTrainedModel

    class Forgetful(PreTrainedModel):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.linear = torch.nn.Linear(2, 2)

    assert ensure_post_init(Forgetful) is True
    assert ensure_post_init(Forgetful) is True  # wrapped once only
    assert "all_tied_weights_keys" in Forgetful(PretrainedConfig()).__dict__


class _RopeStandIn(torch.nn.Module):
    """Mimics timm's RotaryEmbeddingCat (>= 1.0.24): a computed, non-persistent buffer and
    ``init_non_persistent_buffers()`` that recomputes it (timm itself does not import here)."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.n = n
        self.register_buffer("pos_embed", torch.arange(n, dtype=torch.float32).sin(), persistent=False)

    def init_non_persistent_buffers(self) -> None:
        self.pos_embed.copy_(torch.arange(self.n, dtype=torch.float32).sin())


def test_reinit_recomputes_buffers_left_empty():
    """transformers 5.x replaces non-persistent buffers with ``torch.empty_like`` after meta-device init."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _RopeStandIn())
    model[1].pos_embed = torch.full_like(model[1].pos_embed, float("nan"))
    assert non_persistent_buffer_names(model) == ["1.pos_embed"]
    assert reinit_non_persistent_buffers(model) == ["1"]
    assert torch.equal(model[1].pos_embed, torch.arange(6, dtype=torch.float32).sin())


def test_reinit_matches_real_timm_eva02_after_transformers_loading(tmp_path):
    """With real timm (Colab, the GPU machine): an EVA02 tower inside a PreTrainedModel whose
    ``_init_weights`` does nothing (as LINE's) loads with broken RoPE on transformers 5.x; the repair
    makes its features equal the original's."""
    try:
        import timm
    except ImportError as err:
        pytest.skip(f"timm does not import here ({err})")
    from transformers import PretrainedConfig, PreTrainedModel

    class EvaConfig(PretrainedConfig):
        model_type = "eva-rope-test"

    class EvaWrap(PreTrainedModel):
        config_class = EvaConfig

        def __init__(self, config):
            super().__init__(config)
            self.backbone = timm.create_model(
                "eva02_base_patch16_clip_224", pretrained=False, num_classes=0, depth=1
            )
            self.post_init()

        def _init_weights(self, module):
            pass

    torch.manual_seed(0)
    original = EvaWrap(EvaConfig()).eval()
    with quiet_transformers():
        original.save_pretrained(tmp_path)
        loaded = EvaWrap.from_pretrained(tmp_path).eval()
    pixels = torch.randn(1, 3, 224, 224)
    assert reinit_non_persistent_buffers(loaded)
    with torch.no_grad():
        assert torch.allclose(original.backbone(pixels), loaded.backbone(pixels), atol=1e-5)


# ---------------------------------------------------------------- preprocessing spec


def test_preprocess_with_spec_letterboxes_and_crops():
    white = Image.new("RGB", (100, 50), (255, 255, 255))
    spec = PreprocessSpec(32, "longer", "bicubic", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), pad_value=0.0)
    out = preprocess_with_spec(white, spec)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert torch.allclose(out[0, :, :8], torch.tensor(-1.0))  # black pad: (0 - 0.5) / 0.5
    assert torch.allclose(out[0, :, 8:24], torch.tensor(1.0), atol=1e-2)  # the picture, 32 x 16
    assert torch.allclose(out[0, :, 24:], torch.tensor(-1.0))
    crop = PreprocessSpec(32, "shorter", "bilinear", CLIP_MEAN, CLIP_STD)
    assert preprocess_with_spec([white, _picture()], crop).shape == (2, 3, 32, 32)
    assert spec.as_dict()["resize"] == "longer" and spec.target == 32


def test_spec_from_processor_for_each_kind():
    clip = models_hf.spec_from_processor(_pil_processor(64))
    assert clip == PreprocessSpec(64, "shorter", "bicubic", CLIP_MEAN, CLIP_STD)
    line = models_hf.spec_from_processor(SimpleNamespace(image_size=224, normalization_type="imagenet"))
    assert line == PreprocessSpec(224, "longer", "bicubic", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.0)
    square = SimpleNamespace(
        size={"height": 48, "width": 48},
        resample=2,
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    assert models_hf.spec_from_processor(square) == PreprocessSpec(
        48, "squash", "bilinear", (0.5,) * 3, (0.5,) * 3
    )


def test_spec_reproduces_the_hf_processor_exactly(clip_dir):
    model = load_clip(str(clip_dir), device="cpu")
    images = [_picture(), _picture(40, 90, 1), _picture(33, 33, 2)]
    assert torch.allclose(
        model.preprocess(images), preprocess_with_spec(images, model.preprocess_spec), atol=1e-6
    )


# ---------------------------------------------------------------- choosing a model


@pytest.fixture
def recorded(monkeypatch):
    """Replace the loading itself: record which canonical name load_clip would load."""
    names: list[str] = []

    def fake(name, device, dtype, trust_remote_code=False):
        names.append(name)
        if name == DEFAULT_MODEL and "fail" in names:
            raise ModelLoadError("timm がありません")
        return name

    monkeypatch.setattr(models, "_load_named", fake)
    return names


def test_resolution_order(monkeypatch, recorded, capsys):
    monkeypatch.setenv("CLIP_MODEL", "vit-b16-random")
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: True)
    assert load_clip("tiny") == EMBEDDED  # explicit argument first
    assert load_clip() == RANDOM_VIT_B16  # then CLIP_MODEL
    monkeypatch.setenv("CLIP_MODEL", "auto")
    assert load_clip() == DEFAULT_MODEL  # auto with the hub answering: the real default
    monkeypatch.delenv("CLIP_MODEL")
    assert load_clip() == DEFAULT_MODEL
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: False)
    assert load_clip() == EMBEDDED  # auto offline: the embedded model, with one notice line
    assert capsys.readouterr().out == OFFLINE_NOTICE + "\n"
    assert load_clip("auto") == EMBEDDED
    assert recorded == [EMBEDDED, RANDOM_VIT_B16, DEFAULT_MODEL, DEFAULT_MODEL, EMBEDDED, EMBEDDED]


def test_auto_falls_back_when_the_default_cannot_load(monkeypatch, recorded, capsys):
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: True)
    recorded.append("fail")
    assert load_clip("auto") == EMBEDDED
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "timm がありません" in out and "embedded" in out


@pytest.mark.parametrize("reachable", [False, True])
def test_commands_never_fall_back(monkeypatch, recorded, capsys, reachable):
    """fallback=False (the commands): auto without the default model is an error naming --model embedded."""
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: reachable)
    recorded.append("fail")
    with pytest.raises(ModelLoadError) as err:
        load_clip("auto", fallback=False)
    assert "--model embedded" in str(err.value) and "\n" not in str(err.value)
    assert EMBEDDED not in recorded and capsys.readouterr().out == ""
    assert ("timm がありません" in str(err.value)) is reachable  # the real cause, when there was one


def test_requested_model_spellings(monkeypatch):
    assert requested_model("TINY") == EMBEDDED
    assert requested_model("vit-b16-random") == requested_model("random:vit-b16") == RANDOM_VIT_B16
    assert requested_model(None) == "auto"
    monkeypatch.setenv("CLIP_MODEL", " rinna/japanese-clip-vit-b-16 ")
    assert requested_model() == "rinna/japanese-clip-vit-b-16"


def test_hub_refusal_is_explained_with_what_to_do():
    refused = OSError("429 Client Error: Too Many Requests")
    refused.response = SimpleNamespace(status_code=429)
    message = hub.explain_load_error(DEFAULT_MODEL, refused)
    assert "HTTP 429" in message and "HF_TOKEN" in message and "\n" not in message
    other = hub.explain_load_error("x/y", AttributeError("no attribute 'all_tied_weights_keys'"))
    assert "AttributeError" in other and "transformers==4.51.3" in other


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="見つかりません"):
        load_clip("no such model", device="cpu")


def test_explicit_real_model_offline_fails_fast(monkeypatch, tmp_path):
    """Asked for by name, LINE never falls back: no timm here, or (given timm) no hub and no cache."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as first:
        load_clip(DEFAULT_MODEL, device="cpu")
    monkeypatch.setattr(models_hf, "_require_timm", lambda name: None)
    with pytest.raises(ModelLoadError, match="Hugging Face Hub に接続できず") as second:
        load_clip(DEFAULT_MODEL, device="cpu")
    assert time.perf_counter() - started < 10
    for err in (first.value, second.value):
        assert DEFAULT_MODEL in str(err) and "\n" not in str(err)


def test_auto_with_hub_but_without_timm_uses_embedded(monkeypatch, as_embedded, capsys):
    """The real chain: hub "reachable", LINE needs timm (absent here) → one notice, the embedded model."""
    try:
        import timm  # noqa: F401

        pytest.skip("timm imports here; LINE would really be downloaded")
    except ImportError:
        pass
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: True)
    model = load_clip("auto", device="cpu")
    assert model.name == EMBEDDED and model.kind == "embedded"
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "timm" in out


# ---------------------------------------------------------------- backends


def test_hf_folder_contract_and_dtype(clip_dir):
    model = load_clip(str(clip_dir), device="cpu")
    assert (model.backend, model.kind, model.name) == ("hf", "real", str(clip_dir))
    assert model.preprocess_spec == PreprocessSpec(32, "shorter", "bicubic", CLIP_MEAN, CLIP_STD)
    assert model.logit_scale == pytest.approx(float(model.module.logit_scale.exp()))
    _assert_contract(model, 32)
    wide = load_clip(str(clip_dir), device="cpu", dtype=torch.float64)
    assert wide.encode_images(model.preprocess([_picture()])).dtype == torch.float64
    assert wide.fingerprint == model.fingerprint  # weights hashed as float16: dtype does not matter
    assert load_clip(str(clip_dir), device="cpu").to(dtype=torch.float16).dtype == torch.float16


def test_embedded_path_with_a_stand_in_folder(as_embedded, capfd):
    """``"embedded"``: from_pretrained on the tiny CLIP's folder (random weights here), quietly."""
    model = load_clip("embedded", device="cpu")
    assert capfd.readouterr() == ("", "")
    assert (model.name, model.backend, model.kind) == (EMBEDDED, "hf", "embedded")
    assert model.preprocess_spec == PreprocessSpec(64, "shorter", "bicubic", CLIP_MEAN, CLIP_STD)
    assert model._text_keys == ("input_ids", "attention_mask")
    _assert_contract(model, 64)
    assert load_clip(str(as_embedded), device="cpu").kind == "embedded"  # its folder, by path


def test_random_vit_b16_full_size():
    model = load_clip("vit-b16-random", device="cpu")
    assert (model.name, model.backend, model.kind) == (RANDOM_VIT_B16, "random", "random")
    assert 120e6 < model.n_params < 160e6
    assert model.preprocess_spec == PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD)
    vision = model.module.config.vision_config
    assert (vision.patch_size, vision.hidden_size, vision.num_hidden_layers, vision.image_size) == (
        16,
        768,
        12,
        224,
    )
    assert model.encode_texts(["猫の写真"]).shape == (1, 512)
    assert "ランダム" in check(model)


def test_random_vit_b16_small_contract_and_determinism():
    small = {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        "text_config": {
            "vocab_size": 256,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 255,
        },
        "projection_dim": 16,
    }
    first = random_vit.load_random_vit_b16(CPU, torch.float32, config_overrides=small)
    second = random_vit.load_random_vit_b16(CPU, torch.float32, config_overrides=small)
    _assert_contract(first, 32)
    assert first.fingerprint == second.fingerprint  # fixed seed
    tokens = first.tokenize(["あいうえおかきくけこさしすせそたちつてと"])  # longer than 16: truncated
    assert tokens["input_ids"].shape == (1, 16) and int(tokens["input_ids"][0, -1]) == 255


# ---------------------------------------------------------------- LINE-style remote code

_CONFIG_CODE = """
from transformers import PretrainedConfig


class FakeClypConfig(PretrainedConfig):
    model_type = "fake-clyp"
    is_composition = True

    def __init__(self, vision_config=None, temperature_init=0.07, **kwargs):
        super().__init__(**kwargs)
        if vision_config is None:
            raise ValueError("`vision_config` can not be `None`.")
        self.vision_config = dict(vision_config)
        self.temperature_init = temperature_init

    def to_diff_dict(self):
        out = super().to_diff_dict()
        self.dict_torch_dtype_to_str(out)
        return out
"""

_MODEL_CODE = """
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_fakeclyp import FakeClypConfig


class Rope(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.n = n
        self.register_buffer("pos_embed", torch.arange(n, dtype=torch.float32).sin(), persistent=False)

    def init_non_persistent_buffers(self):
        self.pos_embed.copy_(torch.arange(self.n, dtype=torch.float32).sin())


class InfoNCE(nn.Module):
    def __init__(self, temperature):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones([]) * temperature)


class FakeClypModel(PreTrainedModel):
    config_class = FakeClypConfig

    def __init__(self, config):
        super().__init__(config)
        self.rope = Rope(config.vision_config["width"])
        self.vision = nn.Linear(config.vision_config["width"], 4)
        self.text = nn.Embedding(64, 4)
        self.itc_loss_fn = InfoNCE(config.temperature_init)

    def _init_weights(self, module):
        pass

    def get_image_features(self, pixel_values=None):
        pooled = pixel_values.mean(dim=(2, 3)).repeat(1, 2)[:, : self.rope.n]
        return self.vision(pooled + self.rope.pos_embed)

    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
        return self.text(input_ids)[:, 0]
"""


@pytest.fixture(scope="module")
def line_like_dir(tmp_path_factory) -> Path:
    """Remote code in LINE's style (see the module docstring), weights and a standard tokenizer/processor."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("line_like")
    (folder / "configuration_fakeclyp.py").write_text(textwrap.dedent(_CONFIG_CODE))
    (folder / "modeling_fakeclyp.py").write_text(textwrap.dedent(_MODEL_CODE))
    config = {
        "model_type": "fake-clyp",
        "architectures": ["FakeClypModel"],
        "auto_map": {
            "AutoConfig": "configuration_fakeclyp.FakeClypConfig",
            "AutoModel": "modeling_fakeclyp.FakeClypModel",
        },
        "vision_config": {"width": 6},
        "temperature_init": 0.07,
    }
    (folder / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    weights = {
        "vision.weight": torch.randn(4, 6, generator=gen),
        "vision.bias": torch.randn(4, generator=gen),
        "text.weight": torch.randn(64, 4, generator=gen),
        "itc_loss_fn.temperature": torch.tensor(0.02),
    }
    save_file(weights, str(folder / "model.safetensors"))
    with quiet_transformers():
        _char_tokenizer().save_pretrained(folder)
        _pil_processor(32).save_pretrained(folder)
    return folder


def test_local_remote_code_runs_only_when_trusted(line_like_dir):
    """A folder's own Python code is not run unless asked: one clear line naming the switch."""
    with pytest.raises(ModelLoadError) as refused:
        load_clip(str(line_like_dir), device="cpu")
    message = str(refused.value)
    assert "auto_map" in message and "--trust-remote-code" in message and "\n" not in message
    assert not any("fakeclyp" in name for name in sys.modules)  # nothing of it was imported
    assert DEFAULT_MODEL in models.TRUSTED_REMOTE_CODE  # the known hub id needs no switch


def test_line_style_remote_code_loads_correctly(line_like_dir, capfd):
    """Shims + post_init + buffer repair: features equal the formula with the saved weights, scale = 1/T."""
    from safetensors.torch import load_file

    model = load_clip(str(line_like_dir), device="cpu", trust_remote_code=True)
    assert capfd.readouterr().err == ""
    assert model.logit_scale == pytest.approx(50.0) and "itc_loss_fn" in model.logit_scale_source
    assert torch.equal(model.module.rope.pos_embed, torch.arange(6, dtype=torch.float32).sin())
    weights = load_file(str(line_like_dir / "model.safetensors"))
    pixels = model.preprocess([_picture()])
    pooled = pixels.mean(dim=(2, 3)).repeat(1, 2)[:, :6] + torch.arange(6, dtype=torch.float32).sin()
    expected = pooled @ weights["vision.weight"].T + weights["vision.bias"]
    assert torch.allclose(model.encode_images(pixels), expected, atol=1e-5)
    _assert_contract(model, 32)


# ---------------------------------------------------------------- rinna through a fake japanese_clip


@pytest.fixture
def fake_rinna(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_RINNA))
    monkeypatch.delitem(sys.modules, "japanese_clip", raising=False)
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: True)
    yield
    sys.modules.pop("japanese_clip", None)


@pytest.mark.parametrize(
    ("name", "scale", "source"),
    [
        ("rinna/japanese-clip-vit-b-16", float(np.exp(2.0)), "logit_scale"),
        ("rinna/japanese-cloob-vit-b-16", 30.0, "inv_tau"),
    ],
)
def test_rinna_adapter_with_fake_package(fake_rinna, name, scale, source):
    model = load_clip(name, device="cpu")
    import japanese_clip

    assert [name] == japanese_clip.LOADED
    assert (model.backend, model.kind) == ("rinna", "real")
    spec = PreprocessSpec(32, "shorter", "bilinear", CLIP_MEAN, CLIP_STD, crop_rounding="half_even")
    assert model.preprocess_spec == spec  # torchvision's CenterCrop rounds the offset
    assert model.logit_scale == pytest.approx(scale, rel=1e-5) and source in model.logit_scale_source
    assert set(model.tokenize(["猫"])) == {"input_ids", "attention_mask", "position_ids"}
    _assert_contract(model, 32)
    images = [_picture(), _picture(40, 90, 1), _picture(35, 32, 2)]  # 35×32: 3 spare columns, offset 2
    assert torch.allclose(
        model.preprocess(images), preprocess_with_spec(images, model.preprocess_spec), atol=1e-5
    )
    floor = dataclasses.replace(spec, crop_rounding="floor")  # HF's offset (1) would not do
    assert not torch.allclose(
        model.preprocess(images[2:]), preprocess_with_spec(images[2:], floor), atol=1e-2
    )


def test_rinna_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "japanese_clip", None)
    with pytest.raises(ModelLoadError) as info:
        load_clip("rinna/japanese-cloob-vit-b-16", device="cpu")
    message = str(info.value)
    assert "%pip install --no-deps git+https://github.com/rinnakk/japanese-clip.git" in message
    assert "\n" not in message


# ---------------------------------------------------------------- check()


def _fixed_features(monkeypatch, model: ClipModel, image, text) -> None:
    monkeypatch.setattr(model, "encode_images", lambda images: torch.as_tensor(image, dtype=torch.float32))
    monkeypatch.setattr(model, "encode_texts", lambda texts: torch.as_tensor(text, dtype=torch.float32))


def test_check_on_the_cat_photo(monkeypatch, clip_dir):
    model = load_clip(str(clip_dir), device="cpu")
    labels = torch.eye(4)  # 犬 猫 象 車
    _fixed_features(monkeypatch, model, [[0.0, 1.0, 0.0, 0.0]], labels)
    assert check(model).startswith("モデル確認 OK: 猫 (")
    _fixed_features(monkeypatch, model, [[1.0, 0.2, 0.0, 0.0]], labels)
    with pytest.raises(ModelCheckError, match="「犬」"):
        check(model)
    _fixed_features(monkeypatch, model, [[float("nan"), 1.0, 0.0, 0.0]], labels)
    with pytest.raises(ModelCheckError, match="NaN"):
        check(model)


def test_check_on_drawn_shapes(monkeypatch, as_embedded):
    model = load_clip("embedded", device="cpu")
    text = torch.eye(4)
    right = torch.eye(4).repeat(2, 1)  # pictures: two seeds x the four labels, label-major within a seed
    _fixed_features(monkeypatch, model, right, text)
    assert check(model).startswith("モデル確認 OK: 図形 8/8")
    _fixed_features(monkeypatch, model, right.roll(1, dims=1), text)
    with pytest.raises(ModelCheckError, match="図形 8 枚中 0 枚"):
        check(model)


def test_check_rejects_infinite_features_of_a_random_model(monkeypatch):
    model = random_vit.load_random_vit_b16(
        CPU,
        torch.float32,
        config_overrides={
            "vision_config": {
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "image_size": 32,
                "patch_size": 16,
            },
            "text_config": {
                "vocab_size": 128,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 16,
                "eos_token_id": 127,
            },
            "projection_dim": 8,
        },
    )
    assert "ランダム" in check(model)
    _fixed_features(monkeypatch, model, [[float("inf")] * 8], torch.ones(4, 8))
    with pytest.raises(ModelCheckError, match="NaN/inf"):
        check(model)


# ---------------------------------------------------------------- the shipped embedded model


@needs_shipped
def test_shipped_embedded_offline_auto_is_quick_and_quiet(monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    model = load_clip(device="cpu")
    elapsed = time.perf_counter() - started
    captured = capfd.readouterr()
    assert captured.out == OFFLINE_NOTICE + "\n" and captured.err == ""
    assert elapsed < 10, f"offline fallback took {elapsed:.1f} s"
    assert model.name == EMBEDDED and model.preprocess_spec.size == 64
    _assert_contract(model, 64)
    assert check(model).startswith("モデル確認 OK")


@needs_shipped
def test_shipped_embedded_in_a_fresh_process():
    """A new Python, offline, CLIP_MODEL unset: exactly the one notice on stdout, nothing on stderr."""
    code = "from helpers.models import load_clip, check; m = load_clip(device='cpu'); check(m)"
    environment = {k: v for k, v in __import__("os").environ.items() if k != "CLIP_MODEL"}
    environment["HF_HUB_OFFLINE"] = "1"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == OFFLINE_NOTICE + "\n" and result.stderr == ""
    assert time.perf_counter() - started < 60


# ---------------------------------------------------------------- never silently wrong


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    """A copy of the model folder ``src`` whose state dict went through ``edit`` (a dict → dict function)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    save_file(edit(dict(weights)), str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_weights_stop_loading(clip_dir, tmp_path):
    """A checkpoint without a weight the model needs would leave it random: loading refuses, naming it."""
    key = "visual_projection.weight"
    broken = _copy_with_weights(
        clip_dir, tmp_path / "missing", lambda w: {k: v for k, v in w.items() if k != key}
    )
    with pytest.raises(ModelLoadError) as err:
        load_clip(str(broken), device="cpu")
    assert key in str(err.value) and "\n" not in str(err.value)


def test_unexpected_weights_are_named_in_one_line(clip_dir, tmp_path, capfd):
    extra = _copy_with_weights(
        clip_dir, tmp_path / "extra", lambda w: {**w, "leftover.weight": torch.ones(2)}
    )
    model = load_clip(str(extra), device="cpu")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "leftover.weight" in err
    assert model.fingerprint == load_clip(str(clip_dir), device="cpu").fingerprint  # same model otherwise


def test_fingerprint_follows_the_weights(clip_dir, tmp_path):
    """Same folder → same fingerprint (in a new object); one weight changed → a different one."""
    first, again = load_clip(str(clip_dir), device="cpu"), load_clip(str(clip_dir), device="cpu")
    assert first is not again and first.fingerprint == again.fingerprint
    changed = _copy_with_weights(
        clip_dir, tmp_path / "changed", lambda w: {**w, "logit_scale": w["logit_scale"] + 0.5}
    )
    assert load_clip(str(changed), device="cpu").fingerprint != first.fingerprint


def test_scoring_comes_from_the_model_never_a_default():
    from helpers.models.base import scoring_of

    clip_like = torch.nn.Module()
    clip_like.logit_scale = torch.nn.Parameter(torch.tensor(np.log(20.0), dtype=torch.float32))
    assert scoring_of(clip_like).kind == "softmax" and scoring_of(clip_like).scale == pytest.approx(20.0)
    clip_like.logit_bias = torch.nn.Parameter(torch.tensor([-3.0]))  # SigLIP: learned scale and bias
    siglip = scoring_of(clip_like)
    assert (siglip.kind, siglip.bias) == ("sigmoid", -3.0) and siglip.scale == pytest.approx(20.0)
    cloob = torch.nn.Module()
    cloob.inv_tau = 30.0
    assert scoring_of(cloob).scale == 30.0 and "CLOOB" in scoring_of(cloob).source
    with pytest.raises(ModelLoadError, match="logit scale がありません"):
        scoring_of(torch.nn.Linear(2, 2))


def test_prepare_checks_once_unless_told_not_to(monkeypatch, as_embedded):
    calls: list[str] = []
    monkeypatch.setattr(models, "check", lambda model: calls.append(model.name) or "モデル確認 OK: stub")
    _, note = models.prepare("embedded")
    assert calls == [EMBEDDED] and note == "モデル確認 OK: stub"
    _, note = models.prepare("embedded", run_check=False)
    assert calls == [EMBEDDED] and "--no-check" in note
    random_model, note = models.prepare(RANDOM_VIT_B16)  # random weights: nothing to check
    assert random_model.kind == "random" and calls == [EMBEDDED] and "ランダム" in note


def test_meta_device_loading_leaves_computed_buffers_and_the_repair_restores_them(tmp_path):
    """The EVA02 RoPE failure without timm: a PreTrainedModel whose non-persistent buffer is computed in
    ``__init__`` and whose ``_init_weights`` does nothing (LINE's style). transformers 5.x builds it on
    the meta device and does not recompute the buffer; the repair restores the original's outputs."""
    import transformers
    from transformers import PretrainedConfig, PreTrainedModel

    class RopeConfig(PretrainedConfig):
        model_type = "rope-repro-test"

    class RopeModel(PreTrainedModel):
        config_class = RopeConfig

        def __init__(self, config):
            super().__init__(config)
            self.rope = _RopeStandIn(64)
            self.proj = torch.nn.Linear(64, 4)
            self.post_init()

        def _init_weights(self, module):
            pass

        def forward(self, x):
            return self.proj(x * self.rope.pos_embed)

    torch.manual_seed(0)
    original = RopeModel(RopeConfig()).eval()
    with quiet_transformers():
        original.save_pretrained(tmp_path)
        loaded = RopeModel.from_pretrained(tmp_path).eval()
    x = torch.randn(3, 64)
    expected = original(x).detach()
    if int(transformers.__version__.split(".")[0]) >= 5:  # the failure this repair exists for
        assert not torch.equal(loaded.rope.pos_embed, original.rope.pos_embed)
    assert reinit_non_persistent_buffers(loaded) == ["rope"]
    assert torch.equal(loaded(x).detach(), expected)


@pytest.mark.parametrize("name", [DEFAULT_MODEL, "line-corporation/clip-japanese-base-v2"])
def test_line_models_go_through_the_line_path_with_their_code_trusted(monkeypatch, name):
    """v1 and v2 by name: the LINE loader (timm checked first), remote code trusted without a switch."""
    seen = []

    def fake_load_pretrained(source, **kwargs):
        seen.append((source, kwargs["trust_remote_code"], kwargs["hub_files"]))
        raise ModelLoadError("stop here")

    monkeypatch.setattr(models_hf, "_require_timm", lambda name: None)
    monkeypatch.setattr(models_hf, "load_pretrained", fake_load_pretrained)
    with pytest.raises(ModelLoadError, match="stop here"):
        load_clip(name, device="cpu")
    assert seen == [(name, True, models_hf.LINE_NEEDS)] and name in models.TRUSTED_REMOTE_CODE
