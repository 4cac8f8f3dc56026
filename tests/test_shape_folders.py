"""helpers.fixtures.shape_folders and .folder_dataset: labelled training folders on disk, their PIL loader."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.fixtures import shape_folders
from helpers.fixtures.folder_dataset import ImageFolderDataset, center_box, random_crop_box


def _digest(paths) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(p.relative_to(p.parents[2]).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return shape_folders.make_shape_folders(12, 8, root=tmp_path_factory.mktemp("shapes"), progress=False)


def test_class_folders_balanced_and_labelled_in_sorted_order(small_set) -> None:
    assert small_set.classes == ("丸", "三角", "四角", "星")
    for split, n in (("train", 12), ("val", 8)):
        files = small_set.files(split)
        assert len(files) == n == small_set.counts[split]
        labels = small_set.labels(split)
        assert [labels.count(k) for k in range(4)] == [n // 4] * 4
        assert sorted(p.name for p in (small_set.root / split).iterdir()) == list(shape_folders.FOLDER_NAMES)
        assert labels == sorted(labels)  # sorted folders = label order, as fn.readers.file numbers them


def test_images_are_jpegs_of_varied_size_at_least_300_px(small_set) -> None:
    sizes = set()
    for path in small_set.files("train"):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert min(image.size) >= 300
            assert max(image.size) / min(image.size) <= 1.3 + 0.01
            sizes.add(image.size)
    assert len(sizes) > 6


def test_same_arguments_same_bytes_and_a_finished_set_is_reused(small_set, tmp_path) -> None:
    again = shape_folders.make_shape_folders(12, 8, root=tmp_path / "again", progress=False)
    assert _digest(again.files("train")) == _digest(small_set.files("train"))
    stamp = again.files("val")[0].stat().st_mtime_ns
    shape_folders.make_shape_folders(12, 8, root=tmp_path / "again", progress=False)
    assert again.files("val")[0].stat().st_mtime_ns == stamp
    other = shape_folders.make_shape_folders(12, 8, seed=1, root=tmp_path / "other", progress=False)
    assert _digest(other.files("train")) != _digest(small_set.files("train"))


def test_other_settings_in_the_same_folder_replace_the_old_files(tmp_path) -> None:
    shape_folders.make_shape_folders(16, 8, root=tmp_path, progress=False)
    smaller = shape_folders.make_shape_folders(8, 4, root=tmp_path, progress=False)
    assert len(smaller.files("train")) == 8 and len(smaller.files("val")) == 4


def test_files_that_are_not_ours_are_left_alone(tmp_path) -> None:
    mine = tmp_path / "train" / "cats" / "photo.jpg"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"not ours")
    shape_folders.make_shape_folders(8, 4, root=tmp_path, progress=False)
    assert mine.read_bytes() == b"not ours"


def test_too_few_images_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        shape_folders.make_shape_folders(3, 8, progress=False)


def test_random_crop_box_stays_inside_and_covers_the_asked_area() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_crop_box(400, 300, (0.5, 1.0), (3 / 4, 4 / 3), generator=gen)
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        area = (right - left) * (bottom - top) / (400 * 300)
        assert 0.45 <= area <= 1.0
    assert center_box(400, 300) == (50, 0, 350, 300)


def test_folder_dataset_gives_normalised_tensors_and_labels(small_set) -> None:
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    val = ImageFolderDataset(small_set.val, 64, mean, std, train=False)
    assert val.classes == list(shape_folders.FOLDER_NAMES)
    assert [label for _, label in val.samples] == small_set.labels("val")
    x, y = val[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
    assert float(x.min()) >= -2.1 and float(x.max()) <= 2.1
    torch.manual_seed(1)
    again = val[0][0]
    torch.manual_seed(2)
    assert torch.equal(again, val[0][0])  # no randomness without train, whatever the seed
    with Image.open(val.samples[0][0]) as image:  # the centre square, bilinear to 64, then (x - mean) / std
        side = min(image.size)
        box = ((image.width - side) // 2, (image.height - side) // 2)
        square = image.convert("RGB").crop((*box, box[0] + side, box[1] + side))
        by_hand = np.asarray(square.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    expected = (torch.from_numpy(by_hand).permute(2, 0, 1) - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1.01 / 255 / 0.25)  # within one 8-bit grey level
    train = ImageFolderDataset(small_set.train, 64, mean, std, train=True)
    torch.manual_seed(0)
    a = train[1][0]
    torch.manual_seed(1)
    assert not torch.equal(a, train[1][0])


def test_folder_dataset_needs_class_folders(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="クラスのフォルダー"):
        ImageFolderDataset(tmp_path, 64, (0.5,) * 3, (0.25,) * 3)
