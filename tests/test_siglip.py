"""SigLIP through ``load_clip`` and ``python -m helpers.classify``: a per-label sigmoid with the learned
bias, text padded to ``max_length``, equal to transformers' own ``logits_per_image``.

The folder is a tiny random ``SiglipModel`` (model_type ``siglip``) saved with a character tokenizer
and the PIL ``SiglipImageProcessorPil``, written offline by :mod:`helpers.fixtures.siglip` (notebook 01
uses the same folder): no hub, no sentencepiece, no torchvision.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import classify
from helpers.fixtures.siglip import MAX_LENGTH, write_tiny_siglip
from helpers.models import ModelCheckError, ModelLoadError, check, load_clip
from helpers.models.compat import quiet_transformers

LABELS = ["犬", "猫", "車"]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory) -> Path:
    # SigLIP starts at scale 10; bias -1 keeps random probabilities away from 0
    return write_tiny_siglip(tmp_path_factory.mktemp("tiny_siglip"), scale=10.0, bias=-1.0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("siglip_photos")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(48, 40), (32, 32), (64, 20)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


def _reference(folder: Path, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """transformers' own probabilities: sigmoid(logits_per_image), text padded to max_length."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    with quiet_transformers():
        model = AutoModel.from_pretrained(folder).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        processor = SiglipImageProcessorPil.from_pretrained(folder)
    ids = tokenizer(texts, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt")["input_ids"]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits_per_image.sigmoid()


def test_siglip_loads_with_its_own_scoring_and_padding(siglip_dir, photos):
    model = load_clip(str(siglip_dir), device="cpu")
    assert (model.backend, model.kind, model.scoring.kind) == ("siglip", "real", "sigmoid")
    assert model.scoring.scale == pytest.approx(10.0) and model.scoring.bias == pytest.approx(-1.0)
    spec = model.preprocess_spec
    assert (spec.size, spec.resize, spec.interpolation, spec.mean) == (32, "squash", "bicubic", (0.5,) * 3)
    tokens = model.tokenize(LABELS)
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (3, MAX_LENGTH)  # min(64, 16)
    images = [Image.open(p).convert("RGB") for p in sorted(photos.iterdir())]
    ours = model.probabilities(model.encode_images(images), model.label_features(LABELS))
    expected = _reference(siglip_dir, images, LABELS)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(ours.sum(-1), torch.ones(3), atol=0.05)  # not a softmax over labels


def test_classify_gives_transformers_own_sigmoid_probabilities(siglip_dir, photos, tmp_path, capsys):
    out = tmp_path / "siglip.csv"
    argv = [str(photos), "--labels", ",".join(LABELS), "--model", str(siglip_dir), "--no-check"]
    status = classify.main([*argv, "--out", str(out), "--top-k", "3", "--no-progress", "--workers", "0"])
    assert status == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("3 files: 3 ok, 0 errors") and "not checked (--no-check)" in summary
    images = [Image.open(photos / f"p{i}.png").convert("RGB") for i in range(3)]
    expected = _reference(siglip_dir, images, LABELS)
    with open(out, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["path"] for row in rows] == ["p0.png", "p1.png", "p2.png"]
    for row, reference in zip(rows, expected, strict=True):
        got = {row[f"label_{k}"]: float(row[f"prob_{k}"]) for k in (1, 2, 3)}
        for label, p in zip(LABELS, reference.tolist(), strict=True):
            assert got[label] == pytest.approx(p, abs=1e-3)
    sidecar = json.loads(out.with_name(out.name + ".json").read_text(encoding="utf-8"))
    assert sidecar["scoring"] == "sigmoid" and sidecar["checked"] is False


def test_check_on_a_sigmoid_model_needs_the_cat_first_not_half(monkeypatch, siglip_dir):
    """SigLIP's per-label probabilities are often small: check() asks for rank 1, not p ≥ 0.5."""
    model = load_clip(str(siglip_dir), device="cpu")
    text = torch.eye(4, 5)  # 犬 猫 象 車, and a fifth direction no label has
    cat_first = torch.tensor([[0.05, 0.06, 0.0, 0.0, 1.0]])  # low cosines: 猫 ranks first at p ≈ 0.4
    monkeypatch.setattr(model, "encode_texts", lambda texts: text)
    monkeypatch.setattr(model, "encode_images", lambda images: cat_first)
    probs = model.probabilities(cat_first, text)[0]
    assert probs.argmax() == 1 and probs[1] < 0.5
    assert check(model).startswith("モデル確認 OK: 猫")
    monkeypatch.setattr(model, "encode_images", lambda images: torch.tensor([[0.06, 0.05, 0.0, 0.0, 1.0]]))
    with pytest.raises(ModelCheckError, match="「犬」"):
        check(model)


def test_naflex_siglip2_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2"}))
    with pytest.raises(ModelLoadError) as err:
        load_clip(str(tmp_path), device="cpu")
    assert "NaFlex" in str(err.value) and "\n" not in str(err.value)
