"""helpers.dali on the CPU (no GPU here): pipeline outputs, the match with the PIL reference, and
``iter_preprocessed`` over a folder of good, odd and bad files.

Tolerances (0-255 grey levels, measured on the sample photos and 1260×750 workload JPEGs with
DALI 2.4 and Pillow 13): the geometry is exact and DALI's CPU JPEG decoder gives PIL's pixels, so
the only difference is the resize filter: mean |Δ| 0.06-0.15, max 4-16 (a few pixels at sharp
edges, more for stronger shrinking: 96 px from 640 px gave 16), at most 0.4 % of values off by
more than 2 levels. The asserts allow mean 0.5, max 24, 2 % above 2 levels.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import data, env
from helpers.models import CLIP_MEAN, CLIP_STD, PreprocessSpec, preprocess_with_spec

if env.dali_version() is None:  # requirements.txt installs it: its absence is a broken set-up, not a skip
    pytest.fail(
        "NVIDIA DALI does not import, but requirements.txt installs it (nvidia-dali-cuda120):"
        " re-create .venv (make venv) and look at the import error: python -c 'import nvidia.dali'",
        pytrace=False,
    )

from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from helpers import dali

MEAN_TOL, MAX_TOL, FAR_TOL = 0.5, 24.0, 0.02  # on the 0-255 scale; FAR_TOL: share of values off by > 2

LINE_MEAN = (0.5, 0.5, 0.5)
SPECS = {
    "shorter-bicubic-224": PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD),
    "shorter-bilinear-224": PreprocessSpec(224, "shorter", "bilinear", CLIP_MEAN, CLIP_STD),
    "shorter-bicubic-64": PreprocessSpec(64, "shorter", "bicubic", CLIP_MEAN, CLIP_STD),
    "shorter-256-crop-224": PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD, resize_size=256),
    "longer-letterbox": PreprocessSpec(224, "longer", "bicubic", LINE_MEAN, LINE_MEAN, pad_value=0.0),
    "longer-grey-pad": PreprocessSpec(96, "longer", "bilinear", CLIP_MEAN, CLIP_STD, pad_value=0.5),
    "squash": PreprocessSpec(160, "squash", "bicubic", CLIP_MEAN, CLIP_STD),
}
SMALL = PreprocessSpec(48, "shorter", "bicubic", CLIP_MEAN, CLIP_STD)


def _levels(diff: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """A difference in normalised units, back on the 0-255 pixel scale."""
    return diff.abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255


def _run_all(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    batches = DALIGenericIterator(
        pipe, dali.OUTPUT_MAP, reader_name=dali.READER_NAME, last_batch_policy=LastBatchPolicy.PARTIAL
    )
    got = [(b[0]["pixels"], b[0]["labels"]) for b in batches]
    return torch.cat([p for p, _ in got]), torch.cat([lab for _, lab in got])


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    return [photo.path for photo in data.sample_photos()]


def test_pipeline_outputs_shape_dtype_and_every_file_once(photos: list[Path]) -> None:
    pipe = dali.build_pipeline(photos, SMALL, batch_size=4, device="cpu")  # 9 files: 4 + 4 + 1
    pixels, labels = _run_all(pipe)
    assert pixels.dtype == torch.float32 and pixels.device.type == "cpu"
    assert tuple(pixels.shape) == (len(photos), 3, 48, 48)
    assert labels.dtype == torch.int32 and tuple(labels.shape) == (len(photos), 1)  # labels are [B, 1]
    assert labels.view(-1).tolist() == list(range(len(photos)))


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_the_pil_reference(name: str, photos: list[Path]) -> None:
    spec = SPECS[name]
    pixels, _ = _run_all(dali.build_pipeline(photos, spec, batch_size=len(photos), device="cpu"))
    reference = preprocess_with_spec([data.open_image(p) for p in photos], spec)
    assert pixels.shape == reference.shape
    levels = _levels(pixels - reference, spec)
    assert float(levels.mean()) < MEAN_TOL, name
    assert float(levels.max()) < MAX_TOL, name
    assert float((levels > 2).float().mean()) < FAR_TOL, name


@pytest.mark.parametrize("name", list(SPECS))
def test_a_one_pixel_shift_fails_the_tolerance(name: str, photos: list[Path]) -> None:
    """The tolerance catches geometry bugs: DALI's output moved by one pixel (either axis) is off by more
    than twice MEAN_TOL on average (tests/gpu holds the mixed decoder to the same MEAN_TOL)."""
    spec = SPECS[name]
    pixels, _ = _run_all(dali.build_pipeline(photos, spec, batch_size=len(photos), device="cpu"))
    reference = preprocess_with_spec([data.open_image(p) for p in photos], spec)
    for dim in (-1, -2):
        levels = _levels(pixels.roll(1, dims=dim) - reference, spec)
        assert float(levels.mean()) > 2 * MEAN_TOL, (name, dim, float(levels.mean()))


def test_letterbox_padding_is_exact(photos: list[Path]) -> None:
    spec = SPECS["longer-grey-pad"]
    wide = [p for p in photos if Image.open(p).width > Image.open(p).height]
    pixels, _ = _run_all(dali.build_pipeline(wide, spec, batch_size=len(wide), device="cpu"))
    reference = preprocess_with_spec([data.open_image(p) for p in wide], spec)
    fill = ((torch.tensor([128 / 255] * 3) - torch.tensor(spec.mean)) / torch.tensor(spec.std)).view(
        1, 3, 1, 1
    )

    def padded_rows(batch: torch.Tensor) -> torch.Tensor:  # [B, H]: rows that are all letterbox
        return ((batch - fill).abs() < 1e-5).all(dim=1).all(dim=2)

    assert padded_rows(reference).any(dim=1).all()  # every wide photo has bars above and below
    assert torch.equal(padded_rows(pixels), padded_rows(reference))


def test_folder_source_labels_sub_folders(tmp_path: Path, photos: list[Path]) -> None:
    for sub, photo in (("a", photos[0]), ("b", photos[1])):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / photo.name).write_bytes(photo.read_bytes())
    pixels, labels = _run_all(dali.build_pipeline(tmp_path, SMALL, batch_size=2, device="cpu"))
    assert tuple(pixels.shape) == (2, 3, 48, 48) and labels.view(-1).tolist() == [0, 1]


def test_gpu_pipeline_without_a_gpu_says_so(photos: list[Path]) -> None:
    if env.cuda_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(dali.DaliUnavailableError, match="cpu"):
        dali.build_pipeline(photos, SMALL, batch_size=2, device="gpu")
    assert dali.default_device() == "cpu"


def test_file_source_is_picklable_stops_and_pads(photos: list[Path]) -> None:
    def info(i: int):
        return type("SampleInfo", (), {"idx_in_epoch": i})()

    source = pickle.loads(pickle.dumps(dali.FileSource(photos[:2])))
    encoded, position = source(info(1))
    assert encoded.dtype == np.uint8 and encoded[:2].tolist() == [0xFF, 0xD8] and position.tolist() == [1]
    with pytest.raises(StopIteration):
        source(info(2))
    padded = dali.FileSource(photos[:5], batch_size=4)  # 5 files → an epoch of 8, positions 5-7 are -1
    assert len(padded) == 8 and padded(info(7))[1].tolist() == [-1] and padded(info(4))[1].tolist() == [4]
    with pytest.raises(StopIteration):
        padded(info(8))


# ---------------------------------------------------------------- iter_preprocessed: good, odd and bad files


def _cat(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """A picture whose orientation shows: a red left half, a blue bottom-right quarter."""
    image = Image.new("RGB", size, (240, 240, 240))
    w, h = size
    image.paste((220, 20, 20), (0, 0, w // 2, h))
    image.paste((20, 20, 220), (w // 2, h // 2, w, h))
    return image


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory: pytest.TempPathFactory, photos: list[Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("odd")
    files: dict[str, Path] = {}

    def add(name: str) -> Path:
        files[name] = root / name
        return files[name]

    for i, photo in enumerate(photos[:3]):
        add(f"good{i}.jpg").write_bytes(photo.read_bytes())
    add("zero.jpg").write_bytes(b"")
    add("text.jpg").write_text("これは画像ではありません\n", encoding="utf-8")
    whole = photos[0].read_bytes()
    add("truncated.jpg").write_bytes(whole[: len(whole) // 2])
    _cat().convert("CMYK").save(add("cmyk.jpg"), quality=95)
    Image.fromarray(np.asarray(_cat().convert("L"), dtype=np.uint16) * 257).save(add("deep16.png"))
    _cat().convert("P", palette=Image.Palette.ADAPTIVE).save(add("palette.png"))
    _cat().convert("L").save(add("gray.jpg"), quality=95)
    _cat().save(add("plain.png"))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    _cat().save(add("rotated.jpg"), exif=exif, quality=95)
    Image.new("RGB", (1, 1), (200, 20, 20)).save(add("one.jpg"))
    _cat((800, 800)).save(add("big.jpg"), quality=95)  # "too large" once MAX_PIXELS is lowered
    return files


BAD_WORDS = {
    "zero.jpg": "empty",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
    "big.jpg": "too large",
}
LIMIT = 500_000  # MAX_PIXELS in these tests: the photos (≤ 512×512) pass, big.jpg (800×800) does not


def test_routes(odd_folder: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "MAX_PIXELS", LIMIT)
    to_dali = {name for name, path in odd_folder.items() if dali.route(path) == "dali"}
    assert to_dali == {
        "good0.jpg",
        "good1.jpg",
        "good2.jpg",
        "gray.jpg",
        "plain.png",
        "one.jpg",
    }  # rotated.jpg goes to PIL: DALI applies EXIF orientation only in some releases


def test_iter_preprocessed_accounts_for_every_file(
    odd_folder: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "MAX_PIXELS", LIMIT)
    names = list(odd_folder)
    paths = [odd_folder[n] for n in names]
    seen: list[int] = []
    pixels_by_name: dict[str, torch.Tensor] = {}
    errors_by_name: dict[str, str] = {}
    fallbacks = dali.Fallbacks()
    batches = dali.iter_preprocessed(paths, SMALL, 4, "cpu", fallbacks=fallbacks)
    for k, (indices, pixels, errors) in enumerate(batches):
        chunk = set(range(4 * k, min(4 * k + 4, len(paths))))
        assert set(indices) | set(errors) == chunk and not set(indices) & set(errors)
        assert indices == sorted(indices)
        assert pixels.dtype == torch.float32 and tuple(pixels.shape) == (len(indices), 3, 48, 48)
        seen += [*indices, *errors]
        pixels_by_name.update({names[i]: pixels[j] for j, i in enumerate(indices)})
        errors_by_name.update({names[i]: reason for i, reason in errors.items()})
    assert sorted(seen) == list(range(len(paths)))
    assert fallbacks.dali == 6 and not fallbacks.after_error  # the six test_routes sends to DALI
    assert fallbacks.by_design == {"CMYK モード": 1, "I;16 モード": 1, "P モード": 1, "EXIF 回転": 1}
    assert set(errors_by_name) == set(BAD_WORDS)
    for name, word in BAD_WORDS.items():
        assert word in errors_by_name[name], (name, errors_by_name[name])
        with pytest.raises(data.ImageReadError) as err:  # the very reason open_image gives
            data.open_image(odd_folder[name], max_pixels=data.MAX_PIXELS)
        assert err.value.reason == errors_by_name[name]
    for name, pixels in pixels_by_name.items():
        reference = preprocess_with_spec(data.open_image(odd_folder[name]), SMALL)
        levels = _levels(pixels[None] - reference, SMALL)
        assert float(levels.mean()) < MEAN_TOL and float(levels.max()) < MAX_TOL, name


def test_exif_rotation_matches_pil(odd_folder: dict[str, Path]) -> None:
    spec = PreprocessSpec(64, "longer", "bicubic", CLIP_MEAN, CLIP_STD)  # the letterbox shows the turn
    path = odd_folder["rotated.jpg"]
    assert dali.route(path) == "pil"
    [(indices, pixels, errors)] = list(dali.iter_preprocessed([path], spec, 2, "cpu"))
    assert indices == [0] and not errors
    upright = preprocess_with_spec(data.open_image(path), spec)
    unturned = preprocess_with_spec(Image.open(path).convert("RGB"), spec)
    assert float(_levels(pixels - upright, spec).mean()) < MEAN_TOL
    assert float(_levels(pixels - unturned, spec).mean()) > 20


def test_a_batch_dali_cannot_decode_is_redone_file_by_file(
    odd_folder: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # every header passes: the bad files reach DALI and fail their batch
    monkeypatch.setattr(dali, "_inspect", lambda path: (None, (64, 64)))
    names = ["good0.jpg", "text.jpg", "good1.jpg", "zero.jpg", "good2.jpg", "gray.jpg"]
    fallbacks = dali.Fallbacks()
    results = list(
        dali.iter_preprocessed([odd_folder[n] for n in names], SMALL, 2, "cpu", fallbacks=fallbacks)
    )
    assert [r[0] for r in results] == [[0], [2], [4, 5]]
    assert fallbacks.dali == 2 and sum(fallbacks.after_error.values()) == 2  # good0 and good1, redone by PIL
    assert all(
        "Critical error" not in reason for reason in fallbacks.after_error
    )  # the cause, not boilerplate
    assert [sorted(r[2]) for r in results] == [[1], [3], []]
    assert "not an image" in results[0][2][1] and "empty" in results[1][2][3]


def test_empty_list_and_bad_arguments() -> None:
    assert list(dali.iter_preprocessed([], SMALL, 4, "cpu")) == []
    with pytest.raises(ValueError):
        list(dali.iter_preprocessed([], SMALL, 0, "cpu"))
    with pytest.raises(ValueError):
        list(dali.iter_preprocessed([], SMALL, 4, "cuda"))  # type: ignore[arg-type]


# Sizes where the rounding rules part: 640×427 (torchvision's crop offset 56, HF's 55), 256×124
# (LINE's 108.5 → 108, half-up 109), 105×192 and 45×320 (LINE's float product rounds away from the
# exact ratio), 1-pixel and 2000-pixel sides, exact squares.
GEOMETRY_SIZES = [
    (640, 427), (427, 640), (256, 124), (124, 256), (105, 192), (192, 105), (45, 320), (320, 45),
    (224, 224), (225, 224), (227, 224), (223, 500), (1, 1), (3, 700), (700, 3), (2000, 1999),
    (333, 777), (1260, 750), (500, 381), (100, 100),
]  # fmt: skip
GEOMETRY_SPECS = {
    "hf": PreprocessSpec(224, "shorter", "bicubic", CLIP_MEAN, CLIP_STD),
    "rinna": PreprocessSpec(224, "shorter", "bilinear", CLIP_MEAN, CLIP_STD, crop_rounding="half_even"),
    "line": PreprocessSpec(224, "longer", "bicubic", LINE_MEAN, LINE_MEAN),
}
SHIFT_TOL = 3.0  # mean |Δ| in grey levels on noise: filters differ by ~1.5, a 1-pixel shift by > 20


@pytest.fixture(scope="module")
def noise_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Lossless noise pictures of :data:`GEOMETRY_SIZES`: any 1-pixel shift shows."""
    folder, rng = tmp_path_factory.mktemp("sizes"), np.random.default_rng(0)
    files = []
    for width, height in GEOMETRY_SIZES:
        path = folder / f"{width}x{height}.png"
        Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)
        files.append(path)
    return files


def _mean_levels(got: torch.Tensor, want: torch.Tensor, spec: PreprocessSpec) -> list[float]:
    return _levels(got - want, spec).mean(dim=(1, 2, 3)).tolist()


@pytest.mark.parametrize("name", sorted(GEOMETRY_SPECS))
def test_engine_geometry_is_the_spec_at_every_tricky_size(name: str, noise_files: list[Path]) -> None:
    """iter_preprocessed passes the host's sizes and offsets: PIL's within the filters' difference."""
    spec = GEOMETRY_SPECS[name]
    reference = preprocess_with_spec([data.open_image(p) for p in noise_files], spec)
    rows: dict[int, torch.Tensor] = {}
    for indices, pixels, errors in dali.iter_preprocessed(noise_files, spec, batch_size=8, device="cpu"):
        assert errors == {}
        rows.update(zip(indices, pixels, strict=True))
    got = torch.stack([rows[i] for i in range(len(noise_files))])
    far = {
        size: round(d, 2)
        for size, d in zip(GEOMETRY_SIZES, _mean_levels(got, reference, spec), strict=True)
        if d > SHIFT_TOL
    }
    assert far == {}, f"{name}: sizes off the spec: {far}"


def test_a_one_pixel_crop_shift_would_show(noise_files: list[Path]) -> None:
    """The tolerance above bites: HF's floor offset against rinna's rounded one on 640×427."""
    index = GEOMETRY_SIZES.index((640, 427))
    image = data.open_image(noise_files[index])
    floor = preprocess_with_spec(image, dataclasses.replace(GEOMETRY_SPECS["rinna"], crop_rounding="floor"))
    rounded = preprocess_with_spec(image, GEOMETRY_SPECS["rinna"])
    assert _mean_levels(floor, rounded, GEOMETRY_SPECS["rinna"])[0] > 5 * SHIFT_TOL


@pytest.mark.parametrize("name", sorted(GEOMETRY_SPECS))
def test_graph_geometry_differs_only_where_documented(name: str, noise_files: list[Path]) -> None:
    """build_pipeline computes sizes in the graph: exact, but for LINE's float-rounding sizes."""
    spec = GEOMETRY_SPECS[name]
    pixels, labels = _run_all(dali.build_pipeline(noise_files, spec, batch_size=8, device="cpu"))
    assert labels.view(-1).tolist() == list(range(len(noise_files)))
    reference = preprocess_with_spec([data.open_image(p) for p in noise_files], spec)
    far = {
        size
        for size, d in zip(GEOMETRY_SIZES, _mean_levels(pixels, reference, spec), strict=True)
        if d > SHIFT_TOL
    }
    assert far == ({(105, 192), (192, 105), (45, 320), (320, 45)} if name == "line" else set())
