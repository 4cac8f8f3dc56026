"""helpers.data: listing, robust opening (odd and bad files), sample photos, the benchmark workload."""

from __future__ import annotations

import builtins
import csv
import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from helpers import data


def _jpeg(path, size=(32, 24), color=(200, 30, 30), **kwargs):
    Image.new("RGB", size, color).save(path, format="JPEG", **kwargs)
    return path


# ---------------------------------------------------------------- listing


def test_list_images_filters_sorts_and_ignores_case(tmp_path) -> None:
    for name in ("b.JPG", "a.png", "c.Jpeg", "d.webp", "e.txt", "f.TIFF", "notes.md"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "g.jpg").write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a directory is never an image
    names = [p.name for p in data.list_images(tmp_path)]
    assert names == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "f.TIFF"]
    recursive = [p.relative_to(tmp_path).as_posix() for p in data.list_images(tmp_path, recursive=True)]
    assert recursive == ["a.png", "b.JPG", "c.Jpeg", "d.webp", "f.TIFF", "sub/g.jpg"]


def test_list_images_on_missing_folder_names_it(tmp_path) -> None:
    with pytest.raises(NotADirectoryError, match="nope"):
        data.list_images(tmp_path / "nope")


# ---------------------------------------------------------------- odd but valid images


def test_png_with_alpha_is_composited_on_white(tmp_path) -> None:
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(path)
    image = data.open_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_jpeg_becomes_rgb(tmp_path) -> None:
    path = tmp_path / "gray.jpg"
    Image.new("L", (10, 8), 128).save(path)
    image = data.open_image(path)
    assert image.mode == "RGB" and image.size == (10, 8)
    r, g, b = image.getpixel((5, 4))
    assert r == g == b


def test_exif_rotated_jpeg_is_turned_upright(tmp_path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    _jpeg(path, size=(40, 20), exif=exif)
    assert Image.open(path).size == (40, 20)
    assert data.open_image(path).size == (20, 40)


def test_japanese_file_name(tmp_path) -> None:
    path = _jpeg(tmp_path / "猫の写真 1.jpg")
    assert data.open_image(path).size == (32, 24)
    assert data.list_images(tmp_path) == [path]


def test_cmyk_16bit_palette_and_tiny(tmp_path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    palette = Image.new("P", (5, 5), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    _jpeg(tmp_path / "tiny.jpg", size=(1, 1))
    cmyk = data.open_image(tmp_path / "cmyk.jpg")
    assert cmyk.mode == "RGB" and cmyk.getpixel((4, 4))[0] > 200
    deep = data.open_image(tmp_path / "deep.png")
    assert deep.mode == "RGB" and deep.getpixel((0, 0)) == (255, 255, 255)
    assert data.open_image(tmp_path / "palette.png").getpixel((2, 2)) == (0, 0, 255)
    assert data.open_image(tmp_path / "tiny.jpg").size == (1, 1)


# ---------------------------------------------------------------- bad files: a clear error naming the file


def test_missing_file(tmp_path) -> None:
    with pytest.raises(data.ImageReadError, match=r"ghost\.jpg"):
        data.open_image(tmp_path / "ghost.jpg")


def test_empty_file(tmp_path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(data.ImageReadError, match=r"empty\.jpg.*empty"):
        data.open_image(tmp_path / "empty.jpg")


def test_text_file_with_image_extension(tmp_path) -> None:
    (tmp_path / "fake.png").write_text("hello, not an image")
    with pytest.raises(data.ImageReadError, match=r"fake\.png.*not an image"):
        data.open_image(tmp_path / "fake.png")


def test_truncated_jpeg(tmp_path) -> None:
    path = tmp_path / "cut.jpg"
    arr = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(data.ImageReadError, match=r"cut\.jpg"):
        data.open_image(path)


def test_directory_and_dangling_link_are_unreadable(tmp_path) -> None:
    (tmp_path / "dir.jpg").mkdir()
    os.symlink(tmp_path / "nowhere.jpg", tmp_path / "dangling.jpg")
    for name in ("dir.jpg", "dangling.jpg"):
        with pytest.raises(data.ImageReadError, match=name):
            data.open_image(tmp_path / name)


def test_permission_denied(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Everything runs as root here, so chmod 000 cannot make a file unreadable: patch open instead.
    path = _jpeg(tmp_path / "locked.jpg")
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(data.ImageReadError, match=r"locked\.jpg.*permission"):
        data.open_image(path)


def test_too_many_pixels_is_refused_before_decoding(tmp_path) -> None:
    path = _jpeg(tmp_path / "huge.jpg", size=(300, 200))
    with pytest.raises(data.ImageReadError, match=r"huge\.jpg.*300×200"):
        data.open_image(path, max_pixels=50_000)


# ---------------------------------------------------------------- sample photos


def test_sample_photos_are_attributed_and_labelled() -> None:
    photos = data.sample_photos()
    assert len(photos) >= 8
    on_disk = {p.name for p in data.list_images(data.SAMPLE_DIR)}
    assert on_disk == {p.path.name for p in photos}
    with open(data.SAMPLE_DIR / "ATTRIBUTION.csv", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            assert row["license"] and row["author"] and row["source"] and row["label_ja"] and row["label_en"]
    for photo in photos:
        assert data.open_image(photo.path).mode == "RGB"
    assert data.sample_photo("cat").name == "cat.jpg"
    with pytest.raises(KeyError):
        data.sample_photo("unicorn")


# ---------------------------------------------------------------- workload


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_workload_is_distinct_deterministic_and_cached(tmp_path) -> None:
    first = data.make_workload(12, out_dir=tmp_path / "a", size=(126, 75), progress=False)
    second = data.make_workload(12, out_dir=tmp_path / "b", size=(126, 75), progress=False)
    assert [_digest(p) for p in first] == [_digest(p) for p in second]
    assert len({_digest(p) for p in first}) == 12  # never copies of one file
    with Image.open(first[0]) as image:
        assert image.size == (126, 75) and image.format == "JPEG"
    stamp = first[3].stat().st_mtime_ns
    again = data.make_workload(12, out_dir=tmp_path / "a", size=(126, 75), progress=False)
    assert again == first and first[3].stat().st_mtime_ns == stamp


def test_workload_default_is_the_reference_photo_size_and_quality(tmp_path) -> None:
    """By default the files are what the GPU reference numbers were measured on: 1260×750 JPEGs at q90."""
    (path,) = data.make_workload(1, out_dir=tmp_path, progress=False)
    Image.new("RGB", (8, 8)).save(tmp_path / "q90.jpg", quality=90)
    with Image.open(path) as image, Image.open(tmp_path / "q90.jpg") as q90:
        assert image.size == (1260, 750) and image.format == "JPEG"
        assert image.quantization == q90.quantization  # the encoder's tables for quality 90
    with pytest.raises(ValueError):
        data.make_workload(0)
