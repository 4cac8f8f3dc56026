"""The embedded tiny Japanese CLIP: shipped folder, drawing, accuracy, and a short training run."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import helpers.tiny_clip as tc


@pytest.fixture(scope="module")
def shipped():
    """(model, tokenizer, processor) loaded once from the shipped folder."""
    return tc.load(tc.MODEL_DIR)


def test_labels_and_templates():
    assert len(tc.LABELS) == len(tc.COLORS) * len(tc.SHAPES) >= 20
    assert "赤い丸" in tc.LABELS and "緑の四角" in tc.LABELS
    assert tc.TEMPLATES[0] == "{}"
    assert all("{}" in t for t in tc.TEMPLATES + tc.SENTENCE_TEMPLATES)


def test_shipped_folder_loads_offline_through_auto_classes(monkeypatch, capfd):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    files = ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md")
    for name in files:
        assert (tc.MODEL_DIR / name).is_file(), name
    assert sum(p.stat().st_size for p in tc.MODEL_DIR.iterdir()) < 10_000_000
    with tc.quiet_transformers():
        config = AutoConfig.from_pretrained(tc.MODEL_DIR)
        model = AutoModel.from_pretrained(tc.MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(tc.MODEL_DIR)
    processor = AutoImageProcessor.from_pretrained(tc.MODEL_DIR, backend="pil")
    assert config.model_type == "tiny-clip-ja"
    assert isinstance(model, tc.TinyClipModel)
    assert processor.crop_size == {"height": 64, "width": 64}
    assert list(processor.image_mean) == pytest.approx(tc.IMAGE_MEAN)
    ids = tokenizer("赤い丸")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "赤", "い", "丸"]
    assert capfd.readouterr().err == ""  # loading is quiet


def test_features_are_plain_unnormalised_tensors(shipped):
    model, tokenizer, processor = shipped
    images = [tc.draw_shape(label, 7) for label in tc.LABELS[:2]]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (2, 3, 64, 64)
    tokens = tokenizer(["赤い丸", "紫の星の絵", "青い三角が描かれている"], padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixels)
        text = model.get_text_features(tokens["input_ids"], tokens["attention_mask"])
        out = model(**tokens, pixel_values=pixels)
    assert type(image) is torch.Tensor and type(text) is torch.Tensor
    assert image.shape == (2, model.config.projection_dim) and text.shape == (3, model.config.projection_dim)
    assert not torch.allclose(image.norm(dim=-1), torch.ones(2), atol=1e-2)
    assert not torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-2)
    scale = model.logit_scale.exp()
    assert 1 < scale.item() <= 100
    expected = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
    torch.testing.assert_close(out.logits_per_image, expected)


def test_padding_does_not_change_text_features(shipped):
    model, tokenizer, _ = shipped
    alone = tokenizer(["赤い丸"], return_tensors="pt")
    padded = tokenizer(["赤い丸", "黄色い三角が描かれている"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model.get_text_features(alone["input_ids"], alone["attention_mask"])
        b = model.get_text_features(padded["input_ids"], padded["attention_mask"])[:1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_zero_shot_accuracy_on_held_out_drawings():
    assert tc.evaluate(n=200) >= 0.90


def test_large_drawings_survive_png_and_downscaling(shipped, tmp_path):
    model, tokenizer, processor = shipped
    targets = list(range(len(tc.LABELS))) * 2
    images = []
    for i, target in enumerate(targets):
        path = tmp_path / f"{i}.png"
        tc.draw_shape(tc.LABELS[target], 1000 + i, size=224).save(path)
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    assert tc.zero_shot_accuracy(model, tokenizer, processor, images, targets) >= 0.85


def test_drawing_is_deterministic():
    a = np.asarray(tc.draw_shape("緑の四角", 123))
    b = np.asarray(tc.draw_shape("緑の四角", np.random.default_rng(123)))
    c = np.asarray(tc.draw_shape("緑の四角", 124))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert tc.draw_shape("紫の星", 5, size=224).size == (224, 224)
    with pytest.raises(ValueError):
        tc.draw_shape("犬", 0)


def test_make_dataset_is_deterministic_balanced_and_sliceable():
    images, labels = tc.make_dataset(40, seed=3)
    again, labels_again = tc.make_dataset(40, seed=3)
    other, _ = tc.make_dataset(40, seed=4)
    assert images.shape == (40, 64, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and labels == labels_again
    assert not np.array_equal(images, other)
    assert sorted(labels) == sorted(list(range(20)) * 2)
    part, part_labels = tc.make_dataset(40, seed=3, start=10, stop=25)
    assert np.array_equal(part, images[10:25]) and part_labels == labels[10:25]


def test_training_smoke_run_saves_a_loadable_folder(tmp_path, capsys):
    threads = torch.get_num_threads()
    args = ["--steps", "20", "--images", "400", "--batch-size", "64", "--eval-n", "40"]
    code = tc.main(["train", "--out", str(tmp_path), *args])
    assert code == 0
    assert torch.get_num_threads() == threads  # restored
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"accuracy: \d\.\d\d", lines[-1])
    model, _, processor = tc.load(tmp_path)
    assert isinstance(model, tc.TinyClipModel)
    assert "20 ステップ" in (tmp_path / "README.md").read_text(encoding="utf-8")
    pixels = processor(images=[tc.draw_shape("青い星", 0)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert model.get_image_features(pixels).shape == (1, model.config.projection_dim)


def test_evaluate_command_ends_with_the_accuracy_line(capsys):
    assert tc.main(["evaluate", "--n", "40"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(r"accuracy: \d\.\d\d", lines[-1])
    assert any(line.startswith("logit scale:") for line in lines)
