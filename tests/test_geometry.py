"""PreprocessSpec.geometry against the processors' own formulas, every size up to 2000×2000.

The references are transcribed from the processors' sources: HF's ``get_resize_output_image_size``
and ``center_crop`` (floor offsets), torchvision's ``Resize(int)`` and ``CenterCrop`` (rinna's
transform: ``int(round(spare / 2.0))`` offsets), and LINE's letterbox
``round(dim * (224 / float(longer)))``.
"""

from __future__ import annotations

import pytest

from helpers.models import PreprocessSpec
from helpers.models.base import Geometry

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
LIMIT = 2000
SIZE = 224


def hf_shortest_edge(width: int, height: int) -> Geometry:
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = SIZE, int(SIZE * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return Geometry(new_w, new_h, (new_w - SIZE) // 2, (new_h - SIZE) // 2)


def torchvision_resize_center_crop(width: int, height: int) -> Geometry:
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = SIZE, int(SIZE * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return Geometry(new_w, new_h, round((new_w - SIZE) / 2.0), round((new_h - SIZE) / 2.0))


def line_letterbox(width: int, height: int) -> Geometry:
    longer = max(width, height)
    new_w = max(1, round(width * (SIZE / float(longer))))
    new_h = max(1, round(height * (SIZE / float(longer))))
    return Geometry(new_w, new_h, -((SIZE - new_w) // 2), -((SIZE - new_h) // 2))


CASES = {
    "hf": (PreprocessSpec(SIZE, "shorter", "bicubic", MEAN, STD), hf_shortest_edge),
    "rinna": (
        PreprocessSpec(SIZE, "shorter", "bilinear", MEAN, STD, crop_rounding="half_even"),
        torchvision_resize_center_crop,
    ),
    "line": (PreprocessSpec(SIZE, "longer", "bicubic", MEAN, STD), line_letterbox),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_geometry_equals_the_processor_for_every_size_up_to_2000(name: str) -> None:
    """Every width ≤ height (both rules are symmetric: the mirrored sizes are checked on a sample)."""
    spec, reference = CASES[name]
    wrong = []
    for height in range(1, LIMIT + 1):
        for width in range(1, height + 1):
            ours = spec.geometry(width, height)
            if ours != reference(width, height):
                wrong.append((width, height))
    assert wrong == [], f"{len(wrong)} sizes differ, first {wrong[:5]}"
    for width, height in [(105, 192), (124, 256), (427, 640), (1, 2000), (1999, 2000), (750, 1260)]:
        assert spec.geometry(height, width) == reference(height, width)


def test_the_two_crop_roundings_differ_where_they_should() -> None:
    """640×427 resizes to 335×224: 111 spare pixels, floor 55 (HF) against round 56 (torchvision)."""
    floor, half_even = CASES["hf"][0], CASES["rinna"][0]
    assert floor.geometry(640, 427) == Geometry(335, 224, 55, 0)
    assert half_even.geometry(640, 427) == Geometry(335, 224, 56, 0)
    assert floor.geometry(500, 381) == half_even.geometry(500, 381)  # 293 - 224 = 69 spare: 34 either way


def test_line_rounds_like_its_float_formula_not_half_up() -> None:
    """256×124: 108.5 rounds to 108 (half to even), where DALI's old integer rule gave 109; 105×192 is one
    of the sizes where the float product rounds away from the exact ratio (123, not 122)."""
    line = CASES["line"][0]
    assert line.geometry(124, 256).width == 108
    assert line.geometry(105, 192).width == 123
    assert line.geometry(1, 2000) == Geometry(1, 224, -111, 0)


def test_squash_and_bad_sizes() -> None:
    squash = PreprocessSpec(SIZE, "squash", "bicubic", MEAN, STD)
    assert squash.geometry(7, 3000) == Geometry(SIZE, SIZE, 0, 0)
    with pytest.raises(ValueError, match="no pixels"):
        squash.geometry(0, 10)
