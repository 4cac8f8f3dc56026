"""Drawn pictures of coloured shapes with Japanese labels: the tiny CLIP's whole world.

Every picture is made here from a seed (numpy RNG + PIL ``ImageDraw``): a shape of one of
:data:`COLORS` x :data:`SHAPES` on a plain, gradient or noisy low-saturation background, at a
random size, position and rotation. The same seed gives the same scene at any pixel size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "赤い": (215, 35, 35),
    "青い": (35, 75, 215),
    "緑の": (30, 155, 55),
    "黄色い": (235, 200, 25),
    "紫の": (140, 50, 185),
}
"""Colour words (as they stand before a noun) and their base RGB; kept saturated, unlike backgrounds."""

SHAPES: tuple[str, ...] = ("丸", "三角", "四角", "星")
"""Shape nouns: circle, triangle, square, five-pointed star."""

LABELS: list[str] = [f"{color}{shape}" for color in COLORS for shape in SHAPES]
"""The 20 label strings, colour-major: 「赤い丸」「赤い三角」…「紫の星」."""


def label_parts(label: str) -> tuple[str, str]:
    """Split a label such as 「緑の四角」 into its colour word and shape noun."""
    for color in COLORS:
        if label.startswith(color) and label[len(color) :] in SHAPES:
            return color, label[len(color) :]
    raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _shape_points(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon corners of ``shape`` with circumradius ``r`` (circles are drawn as ellipses instead)."""
    if shape == "三角":
        corners = [(r, angle + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "四角":
        corners = [(r, angle + math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "星":
        corners = [(r if k % 2 == 0 else 0.45 * r, angle + k * math.pi / 5) for k in range(10)]
    else:
        raise ValueError(f"not a polygon: {shape}")
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in corners]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A float32 [size, size, 3] background in 0-255: grey-ish, plain or gradient."""
    level = rng.uniform(0.12, 0.92)
    tint = rng.uniform(-0.06, 0.06, size=3)
    first = np.clip(level + tint, 0, 1)
    if rng.random() < 0.5:
        second = first
    else:
        second = np.clip(rng.uniform(0.12, 0.92) + rng.uniform(-0.06, 0.06, size=3), 0, 1)
    theta = rng.uniform(0, 2 * math.pi)
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    ramp = math.cos(theta) * axis[None, :] + math.sin(theta) * axis[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    bg = first[None, None, :] * (1 - ramp[..., None]) + second[None, None, :] * ramp[..., None]
    return (bg * 255).astype(np.float32)


def draw_shape(
    label: str,
    rng: np.random.Generator | int,
    size: int = 64,
    radius_range: tuple[float, float] = (0.15, 0.38),
) -> Image.Image:
    """Draw the picture of ``label`` (e.g. 「赤い丸」) as an RGB image of ``size`` x ``size`` pixels.

    ``rng`` is a numpy Generator or an int seed; one seed gives the same scene at every ``size``
    (only the pixel noise differs in detail). Shapes are anti-aliased by drawing a larger mask.
    ``radius_range`` bounds the shape's circumradius as a fraction of the side (at most 0.47).
    """
    color_word, shape = label_parts(label)
    rng = _as_rng(rng)
    # Scene, in units of the image side (so it does not depend on ``size``).
    radius = rng.uniform(*radius_range)
    margin = 0.03
    cx = rng.uniform(radius + margin, 1 - radius - margin)
    cy = rng.uniform(radius + margin, 1 - radius - margin)
    angle = rng.uniform(0, 2 * math.pi)
    base = np.array(COLORS[color_word], dtype=np.float32)
    fill = np.clip(base * rng.uniform(0.85, 1.1) + rng.uniform(-18, 18, size=3), 0, 255)
    outline = rng.random() < 0.25
    noise_std = rng.uniform(0.0, 10.0)
    noise_seed = int(rng.integers(2**31))
    bg = _background(rng, size)

    # Mask drawn supersampled, then reduced: smooth edges at any size.
    scale = 4 if size <= 128 else 2
    canvas = size * scale
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    x, y, r = cx * canvas, cy * canvas, radius * canvas
    if shape == "丸":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    else:
        draw.polygon(_shape_points(shape, x, y, r, angle), fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255

    img = bg * (1 - alpha) + fill[None, None, :] * alpha
    if outline:  # a darker rim, as in a hand-drawn illustration
        edge = alpha * (1 - alpha) * 4
        img = img * (1 - 0.5 * edge)
    if noise_std > 0:
        img = img + np.random.default_rng(noise_seed).normal(0, noise_std, size=img.shape)
    return Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))  # uint8 HxWx3 → "RGB"


def make_dataset(
    n: int,
    seed: int,
    size: int = 64,
    draw_sizes: Sequence[int] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Draw ``n`` labelled pictures, deterministically for ``seed``.

    Returns a uint8 array [n, size, size, 3] and the label index of each picture (into
    :data:`LABELS`; balanced, in shuffled order). With ``draw_sizes``, each picture is drawn at
    one of those sizes (chosen per picture) and scaled to ``size`` with bicubic filtering, as an
    image processor would do with a larger picture. ``start``/``stop`` draw only that slice of
    the ``n`` pictures (the same pictures as in the full set), to split the work.
    """
    order = np.random.default_rng([seed, 0]).permutation(np.arange(n) % len(LABELS))
    order = order[start:stop]
    images = np.empty((len(order), size, size, 3), dtype=np.uint8)
    for i, label_idx in enumerate(order):
        rng = np.random.default_rng([seed, 1, start + i])
        draw_size = size if draw_sizes is None else int(rng.choice(list(draw_sizes)))
        img = draw_shape(LABELS[label_idx], rng, draw_size)
        if draw_size != size:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        images[i] = np.asarray(img)
    return images, [int(v) for v in order]
