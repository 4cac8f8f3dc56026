"""Image files: list a folder, open one robustly, the labelled sample photos, a benchmark workload."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from helpers import REPO_ROOT

SAMPLE_DIR: Path = REPO_ROOT / "sample_images"
BUILD_DIR: Path = REPO_ROOT / "build"

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
"""File endings treated as images (compared case-insensitively)."""

MAX_PIXELS: int = 80_000_000
"""Largest image (width × height) we decode; bigger ones are refused by name (12000×9000 is 108 M)."""


class ImageReadError(Exception):
    """An image could not be opened; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:  # picklable: it crosses process pools
        return type(self), (self.path, self.reason)


def is_image_file(path: str | Path) -> bool:
    """True when the file name ends in one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageListing:
    """The image files of a folder and what was passed over."""

    root: Path
    files: list[Path]
    """Image files (by extension), sorted by their path relative to ``root`` with ``/`` separators."""
    skipped: int
    """Files that are not images by their extension."""


def scan_images(folder: str | Path, recursive: bool = False) -> ImageListing:
    """The image files in ``folder`` (sub-folders only when ``recursive``) and how many others there were.

    The one listing every command, engine and notebook uses: sorted by the relative ``/`` path (the
    order of classify's CSV rows). Raises ``NotADirectoryError`` with the folder's name when it is not
    a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"画像フォルダーが見つかりません: {root}")
    files, skipped = [], 0
    for entry in root.rglob("*") if recursive else root.iterdir():
        if entry.is_dir():
            continue
        if is_image_file(entry):
            files.append(entry)
        else:
            skipped += 1
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return ImageListing(root, files, skipped)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sub-folders only when ``recursive``), in :func:`scan_images` order."""
    return scan_images(folder, recursive).files


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)  # uint8 2-D → mode "L"
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def draft_request(width: int, height: int, floor: int, side: str) -> tuple[int, int]:
    """The size to ask libjpeg for (``Image.draft``) so that ``side`` of a ``width``×``height`` picture
    stays at least ``floor`` pixels: ``"shorter"``, ``"longer"`` or ``"both"`` (each side)."""
    if side == "both":
        return min(width, floor), min(height, floor)
    reference = min(width, height) if side == "shorter" else max(width, height)
    scale = min(1.0, floor / reference)
    return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))


def open_image(
    path: str | Path, max_pixels: int | None = None, at_least: tuple[int, str] | None = None
) -> Image.Image:
    """Open an image as 8-bit RGB with its EXIF orientation applied.

    Odd but valid files (CMYK, 16-bit, palette, grayscale, alpha, 1×1) are converted.
    Anything unreadable raises :class:`ImageReadError` naming the file: missing, a folder,
    empty, not an image, truncated, or larger than ``max_pixels`` (default :data:`MAX_PIXELS`,
    read at call time; checked on the file's full size).

    ``at_least=(pixels, side)`` lets libjpeg decode a JPEG at 1/2, 1/4 or 1/8 of its size (a
    DCT-domain downscale, several times faster) as long as ``side`` (``"shorter"``, ``"longer"``
    or ``"both"``) keeps at least ``pixels``: for when the picture is resized down afterwards
    (:meth:`helpers.models.PreprocessSpec.decode_floor`). Other formats decode in full.
    """
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    try:
        if path.is_dir():
            raise ImageReadError(path, "画像ではなくフォルダーです (is a directory)")
        if path.stat().st_size == 0:
            raise ImageReadError(path, "空のファイルです (empty file)")
        with warnings.catch_warnings():
            # Our own limit (below) is lower than PIL's warning threshold and names the size.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > limit:
                    raise ImageReadError(
                        path, f"画像が大きすぎます: {width}×{height} > {limit:,} 画素 (too large)"
                    )
                if at_least is not None and image.format == "JPEG":
                    image.draft(image.mode, draft_request(width, height, *at_least))
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # no copy when there is nothing to turn
                return _to_rgb(image)
    except ImageReadError:
        raise
    except FileNotFoundError:
        raise ImageReadError(path, "ファイルが見つかりません (not found)") from None
    except PermissionError:
        raise ImageReadError(path, "読み取り権限がありません (permission denied)") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "画像として認識できません (not an image)") from None
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"画像が大きすぎます (too large): {err}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(path, f"壊れているか読めない画像です ({type(err).__name__}: {err})") from None


@dataclass(frozen=True)
class SamplePhoto:
    """One labelled photo from ``sample_images/`` (see its ATTRIBUTION.csv)."""

    path: Path
    label_ja: str
    label_en: str
    description_ja: str
    license: str


def sample_photos() -> list[SamplePhoto]:
    """The labelled sample photos, in the order of ``sample_images/ATTRIBUTION.csv``."""
    with open(SAMPLE_DIR / "ATTRIBUTION.csv", encoding="utf-8", newline="") as handle:
        return [
            SamplePhoto(
                path=SAMPLE_DIR / row["file"],
                label_ja=row["label_ja"],
                label_en=row["label_en"],
                description_ja=row["description_ja"],
                license=row["license"],
            )
            for row in csv.DictReader(handle)
        ]


def sample_photo(label_en: str) -> Path:
    """The path of the sample photo with this English label (e.g. ``"cat"``)."""
    for photo in sample_photos():
        if photo.label_en == label_en:
            return photo.path
    raise KeyError(f"no sample photo labelled {label_en!r}")


# ---------------------------------------------------------------- benchmark workload

WORKLOAD_SIZE: tuple[int, int] = (1260, 750)
WORKLOAD_QUALITY: int = 90


def _vary(photo: Image.Image, index: int, size: tuple[int, int]) -> Image.Image:
    """A distinct variant of ``photo`` for file ``index``: crop, scale, flip, colour jitter."""
    rng = np.random.default_rng(index)
    width, height = photo.size
    scale = rng.uniform(0.6, 1.0)
    crop_w, crop_h = max(8, int(width * scale)), max(8, int(height * scale))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    image = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    image = image.resize(size, Image.Resampling.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))


def make_workload(
    n: int,
    out_dir: str | Path | None = None,
    size: tuple[int, int] = WORKLOAD_SIZE,
    quality: int = WORKLOAD_QUALITY,
    progress: bool = True,
) -> list[Path]:
    """N distinct, realistic JPEGs for benchmarks, cached on disk and deterministic.

    File ``i`` is sample photo ``i % 9`` cropped, scaled, flipped and colour-jittered with
    seed ``i``, resized to ``size`` and saved at JPEG ``quality``; never N copies of one file,
    which would flatter the caches. Files already there from an earlier call are reused.
    """
    from tqdm.auto import tqdm

    if n < 1:
        raise ValueError("n must be at least 1")
    photos = [photo.path for photo in sample_photos()]
    tag = hashlib.sha1(json.dumps([size, quality, [p.name for p in photos]]).encode()).hexdigest()[:8]
    folder = (
        Path(out_dir)
        if out_dir is not None
        else BUILD_DIR / "workload" / f"{size[0]}x{size[1]}_q{quality}_{tag}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img_{i:05d}.jpg" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        sources = [open_image(p) for p in photos]
        for i in tqdm(missing, desc="ワークロード画像を作成", disable=not progress or len(missing) < 50):
            image = _vary(sources[i % len(sources)], i, size)
            tmp = paths[i].with_suffix(".tmp")
            image.save(tmp, format="JPEG", quality=quality)
            tmp.replace(paths[i])
    return paths
