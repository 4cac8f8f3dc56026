"""A labelled image set on disk for training: drawn shapes as JPEG files in one folder per class.

``make_shape_folders`` writes ``train/`` and ``val/``, each with one sub-folder per class
(``0_circle``, ``1_triangle``, …: ASCII names whose sorted order is the label order, which is
how ``fn.readers.file(file_root=...)`` and ``ImageFolder`` number classes). Every picture is one
of :data:`helpers.shapes.SHAPES` in a random colour, drawn by :func:`helpers.shapes.draw_shape`
at a random size of at least 300 px with a mild aspect change, and saved as a JPEG. The same
arguments give the same bytes; a finished set is found again and reused.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from helpers import env, shapes
from helpers.data import BUILD_DIR, list_images

CLASSES: tuple[str, ...] = shapes.SHAPES
"""Class names in label order: 丸, 三角, 四角, 星."""

FOLDER_NAMES: tuple[str, ...] = ("0_circle", "1_triangle", "2_square", "3_star")
"""On-disk folder of each class, in the same order (ASCII, sorted = label order)."""

SPLITS: tuple[str, ...] = ("train", "val")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
RADIUS: tuple[float, float] = (0.28, 0.44)
"""Shape size as a fraction of the side: larger than the tiny CLIP's pictures, so a small CNN learns fast."""


@dataclass(frozen=True)
class ShapeFolders:
    """Where a generated set lies and what it holds."""

    root: Path
    classes: tuple[str, ...]
    counts: dict[str, int]
    """Number of images per split."""

    @property
    def train(self) -> Path:
        """Folder with one sub-folder per class of training images."""
        return self.root / "train"

    @property
    def val(self) -> Path:
        """Folder with one sub-folder per class of validation images."""
        return self.root / "val"

    def files(self, split: str) -> list[Path]:
        """Every image of ``split`` in sorted order (class folder, then file name)."""
        return [path for name in FOLDER_NAMES for path in list_images(self.root / split / name)]

    def labels(self, split: str) -> list[int]:
        """The class index of each file of :meth:`files`, read from its folder name."""
        return [FOLDER_NAMES.index(p.parent.name) for p in self.files(split)]


def _draw(
    seed: int, split: int, index: int, sizes: tuple[int, int], max_aspect: float
) -> tuple[int, Image.Image]:
    """Picture ``index`` of ``split``: its class (balanced) and the image."""
    rng = np.random.default_rng([seed, split, index])
    label = index % len(CLASSES)
    color = list(shapes.COLORS)[int(rng.integers(len(shapes.COLORS)))]
    side = int(rng.integers(sizes[0], sizes[1] + 1))
    image = shapes.draw_shape(f"{color}{CLASSES[label]}", rng, side, RADIUS)
    aspect = float(np.exp(rng.uniform(-np.log(max_aspect), np.log(max_aspect))))
    new_size = (round(side * aspect), side) if aspect >= 1 else (side, round(side / aspect))
    return label, image.resize(new_size, Image.Resampling.BICUBIC)


def make_shape_folders(
    n_train: int,
    n_val: int,
    seed: int = 0,
    sizes: tuple[int, int] = (300, 480),
    max_aspect: float = 1.3,
    quality: int = 90,
    root: str | Path | None = None,
    progress: bool = True,
) -> ShapeFolders:
    """Write (or find) ``n_train`` + ``n_val`` labelled JPEGs, balanced over :data:`CLASSES`.

    Sides are drawn from ``sizes`` (shorter side ≥ ``sizes[0]``), the aspect ratio from
    [1/``max_aspect``, ``max_aspect``]. Files are written with a thread per core; a manifest
    written last marks the set complete, so an interrupted call starts again cleanly.
    """
    from tqdm.auto import tqdm

    if n_train < len(CLASSES) or n_val < len(CLASSES):
        raise ValueError(f"need at least {len(CLASSES)} images per split (one per class)")
    if sizes[0] < 1 or sizes[1] < sizes[0] or max_aspect < 1:
        raise ValueError("sizes must be (low, high) with 1 <= low <= high, and max_aspect >= 1")
    settings = {
        "version": FORMAT_VERSION,
        "n": [n_train, n_val],
        "seed": seed,
        "sizes": list(sizes),
        "max_aspect": max_aspect,
        "quality": quality,
    }
    tag = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = Path(root) if root is not None else BUILD_DIR / "shape_folders" / tag
    counts = dict(zip(SPLITS, (n_train, n_val), strict=True))
    result = ShapeFolders(folder, CLASSES, counts)
    manifest = folder / MANIFEST
    if manifest.exists() and json.loads(manifest.read_text(encoding="utf-8")) == settings:
        return result

    for split in SPLITS:
        for name in FOLDER_NAMES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
            # files of an interrupted or different earlier set; nothing else in the folder is touched
            for stale in (folder / split / name).glob("[0-9][0-9][0-9][0-9][0-9].jpg"):
                stale.unlink()

    def write(job: tuple[int, int]) -> None:
        split, index = job
        label, image = _draw(seed, split, index, sizes, max_aspect)
        path = folder / SPLITS[split] / FOLDER_NAMES[label] / f"{index:05d}.jpg"
        image.save(path, format="JPEG", quality=quality)

    jobs = [(s, i) for s, n in enumerate((n_train, n_val)) for i in range(n)]
    workers = min(8, env.usable_cpus())
    with ThreadPoolExecutor(workers) as pool:
        list(tqdm(pool.map(write, jobs), total=len(jobs), desc="学習用の画像を作成", disable=not progress))
    manifest.write_text(json.dumps(settings, sort_keys=True), encoding="utf-8")
    return result
