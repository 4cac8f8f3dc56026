"""helpers.zeroshot: the one place labels are scored (softmax over labels, or SigLIP's per-label sigmoid)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import zeroshot
from helpers.zeroshot import Scoring


def test_softmax_is_over_labels_and_ignores_lengths():
    images = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    texts = torch.tensor([[2.0, 0.0], [0.0, 7.0], [1.0, 1.0]])
    probs = zeroshot.probabilities(images, texts, Scoring("softmax", 10.0))
    # by hand: cosines of the first image are 1, 0, 1/√2 → softmax(10 × that)
    z = torch.tensor([10.0, 0.0, 10 / math.sqrt(2)])
    assert torch.allclose(probs[0], z.softmax(-1), atol=1e-6)
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    assert torch.equal(zeroshot.probabilities(images * 4, texts / 3, Scoring("softmax", 10.0)), probs)


def test_sigmoid_scores_each_label_on_its_own_with_the_bias():
    images = torch.tensor([[1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    probs = zeroshot.probabilities(images, texts, Scoring("sigmoid", 10.0, -12.0))
    expected = torch.tensor([10.0 - 12.0, -12.0, -10.0 - 12.0]).sigmoid()
    assert torch.allclose(probs[0], expected, atol=1e-6)
    assert probs.sum() < 0.2  # independent per label: here no label is likely, and nothing sums to 1
    fewer = zeroshot.probabilities(images, texts[:1], Scoring("sigmoid", 10.0, -12.0))
    assert torch.allclose(fewer[0, 0], probs[0, 0])  # adding labels changes no other label's score


def test_scores_are_float32_even_from_half_features():
    half = torch.randn(4, 8).half()
    assert zeroshot.probabilities(half, half, Scoring("softmax", 100.0)).dtype == torch.float32


def test_ensemble_averages_normalised_template_embeddings():
    a = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 0.1], [0.0, 5.0]])
    out = zeroshot.ensemble([a, b])
    assert torch.allclose(out[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))  # lengths do not weigh
    assert torch.allclose(out[1], torch.tensor([0.0, 1.0]))
    seen: list[list[str]] = []

    def encode(texts: list[str]) -> torch.Tensor:
        seen.append(texts)
        return torch.tensor([[1.0, float(len(t))] for t in texts])

    labels = zeroshot.label_embeddings(encode, ["犬", "猫"], ["{}", "{}の写真"])
    assert seen == [["犬", "猫"], ["犬の写真", "猫の写真"]] and labels.shape == (2, 2)
    with pytest.raises(ValueError):
        zeroshot.label_embeddings(encode, [], ["{}"])


def test_scoring_refuses_nonsense():
    with pytest.raises(ValueError):
        Scoring("softmax", 0.0)
    with pytest.raises(ValueError):
        Scoring("softmax", 10.0, bias=-1.0)  # a shared bias cancels out of a softmax
    with pytest.raises(ValueError):
        Scoring("cosine", 10.0)  # type: ignore[arg-type]
    assert Scoring("sigmoid", 117.3, -12.9).describe() == "sigmoid, scale 117.30, bias -12.90"
