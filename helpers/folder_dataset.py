"""A PyTorch ``Dataset`` over a folder of class folders, with PIL training augmentation.

The reference loader for the DALI training pipelines: the same random resized crop, flip and
normalisation, done image by image with PIL in DataLoader workers (torchvision's
``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip`` do the same; torchvision is
not needed here). Random numbers come from ``torch``, which the DataLoader seeds per worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from helpers.data import list_images, open_image

DEFAULT_AREA: tuple[float, float] = (0.35, 1.0)
"""Fraction of the image area a random crop keeps (low, high)."""

DEFAULT_RATIO: tuple[float, float] = (3 / 4, 4 / 3)
"""Aspect ratio range (width / height) of a random crop."""


def random_crop_box(
    width: int,
    height: int,
    area: tuple[float, float] = DEFAULT_AREA,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A random (left, top, right, bottom) box covering ``area`` of the image at ``ratio``.

    Falls back to the largest centred box of an allowed ratio when ``attempts`` draws do not fit.
    """
    total = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u = torch.rand(3, generator=generator).tolist()
        target = total * (area[0] + (area[1] - area[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(u[2] * (width - w + 1))
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            return left, top, left + w, top + h
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
    w, h = min(w, width), min(h, height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def center_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The largest centred square."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


class ImageFolderDataset(torch.utils.data.Dataset):
    """``root/<class>/<file>`` → (normalised float32 [3, size, size], class index).

    Classes are the sub-folders in sorted order. ``train=True`` takes a random resized crop and a
    random horizontal flip; ``train=False`` the centre square, resized (no randomness).
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = True,
        area: tuple[float, float] = DEFAULT_AREA,
        ratio: tuple[float, float] = DEFAULT_RATIO,
    ) -> None:
        self.root = Path(root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise FileNotFoundError(f"クラスのフォルダーがありません: {self.root}")
        self.samples = [
            (path, label) for label, name in enumerate(self.classes) for path in list_images(self.root / name)
        ]
        self.size, self.train, self.area, self.ratio = size, train, area, ratio
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = open_image(path)
        box = random_crop_box(*image.size, self.area, self.ratio) if self.train else center_box(*image.size)
        image = image.resize((self.size, self.size), Image.Resampling.BILINEAR, box=box)
        if self.train and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
        return (pixels - self.mean) / self.std, label
