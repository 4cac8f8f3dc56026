"""``python -m helpers.classify``: every file once, bad input reported by name, shards, resume."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import classify, engines, env, models, zeroshot
from helpers.fixtures import shapes
from helpers.models import ModelCheckError, load_clip

LABELS = "赤い丸,青い三角,緑の四角,黄色い星"
DALI_PROB_TOLERANCE = 0.02
"""The most a probability may move between the DALI and the PIL (DataLoader) backends (docs/classify.md)."""
GOOD = {  # file → the label drawn in it
    "赤い 丸.jpg": "赤い丸",
    "blue triangle.png": "青い三角",
    "green.JPEG": "緑の四角",
    "star.webp": "黄色い星",
}
ODD_OK = ["cmyk.jpg", "gray.jpg", "deep16.png", "palette.png", "rgba.png", "tiny.jpg", "rotated.jpg"]
BAD = {  # file → a word its error reason must contain
    "truncated.jpg": "truncated",
    "empty.jpg": "empty",
    "not_an_image.png": "not an image",
    "huge.jpg": "12000×9000",
    "dangling.jpg": "not found",
}


def _huge_jpeg(path: Path) -> None:
    """A JPEG whose header says 12000×9000 (refused before decoding, so the pixels need not exist)."""
    Image.new("RGB", (16, 16), "white").save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (9000).to_bytes(2, "big") + (12000).to_bytes(2, "big")
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good drawings, odd-but-valid images, bad files, a non-image and a sub-folder."""
    root = tmp_path_factory.mktemp("photos")
    for name, label in GOOD.items():
        shapes.draw_shape(label, 3, size=160).save(root / name)
    base = shapes.draw_shape("赤い丸", 5, size=96)
    base.convert("CMYK").save(root / "cmyk.jpg")
    base.convert("L").save(root / "gray.jpg")
    Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257).save(root / "deep16.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    rgba = base.convert("RGBA")
    rgba.putalpha(200)
    rgba.save(root / "rgba.png")
    Image.new("RGB", (1, 1), (200, 20, 20)).save(root / "tiny.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.resize((120, 80)).save(root / "rotated.jpg", exif=exif)
    good = root / "green.JPEG"
    (root / "truncated.jpg").write_bytes((root / "cmyk.jpg").read_bytes()[:400])
    (root / "empty.jpg").write_bytes(b"")
    (root / "not_an_image.png").write_text("this is text, not a PNG")
    _huge_jpeg(root / "huge.jpg")
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    (root / "notes.txt").write_text("not an image, skipped")
    (root / "sub").mkdir()
    (root / "sub" / "inner.jpg").write_bytes(good.read_bytes())
    return root


def _run(folder: Path, out: Path, *extra: str) -> int:
    return classify.main(
        [str(folder), "--labels", LABELS, "--model", "embedded", "--out", str(out), "--batch-size", "4",
         "--workers", "0", "--no-progress", *extra]
    )  # fmt: skip


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _check_rows(rows: list[dict[str, str]]) -> None:
    by_path = {row["path"]: row for row in rows}
    assert len(by_path) == len(rows) == len(GOOD) + len(ODD_OK) + len(BAD)
    assert [row["path"] for row in rows] == sorted(by_path)
    for name, label in GOOD.items():
        assert by_path[name]["status"] == "ok" and by_path[name]["label_1"] == label, name
        assert 0.0 < float(by_path[name]["prob_1"]) <= 1.0
    for name in ODD_OK:
        assert by_path[name]["status"] == "ok", (name, by_path[name]["error"])
    for name, word in BAD.items():
        assert by_path[name]["status"] == "error", name
        assert word in by_path[name]["error"], (name, by_path[name]["error"])


def test_every_file_once_with_errors_named(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "results.csv"
    assert _run(folder, out, "--backend", "dataloader") == 2
    rows = _rows(out)
    _check_rows(rows)
    assert list(rows[0]) == [
        "path",
        "status",
        "label_1",
        "prob_1",
        "label_2",
        "prob_2",
        "label_3",
        "prob_3",
        "error",
    ]
    captured = capsys.readouterr()
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("16 files: 11 ok, 5 errors, 1 skipped (not images), ")
    fingerprint = load_clip("embedded", device="cpu").fingerprint
    assert summary.endswith(f" images/s, model embedded ({fingerprint[:12]})")
    assert "モデル確認 OK" in captured.err  # checked once, before any file
    sidecar = json.loads(out.with_name(out.name + ".json").read_text(encoding="utf-8"))
    assert (sidecar["model"], sidecar["model_fingerprint"]) == ("embedded", fingerprint)
    assert sidecar["scoring"] == "softmax" and sidecar["checked"] is True


def test_worker_processes_give_the_same_answers(folder: Path, tmp_path: Path) -> None:
    assert _run(folder, tmp_path / "a.csv", "--backend", "dataloader") == 2
    assert classify.main(
        [str(folder), "--labels", LABELS, "--model", "embedded", "--out", str(tmp_path / "b.csv"),
         "--backend", "dataloader", "--workers", "2", "--no-progress"]
    ) == 2  # fmt: skip
    assert _rows(tmp_path / "a.csv") == _rows(tmp_path / "b.csv")


def test_dali_backend_on_cpu_matches_dataloader(folder: Path, tmp_path: Path) -> None:
    assert _run(folder, tmp_path / "loader.csv", "--backend", "dataloader") == 2
    assert _run(folder, tmp_path / "dali.csv", "--backend", "dali") == 2
    loader, dali_rows = _rows(tmp_path / "loader.csv"), _rows(tmp_path / "dali.csv")
    _check_rows(dali_rows)
    assert [(r["path"], r["status"], r["label_1"]) for r in loader] == [
        (r["path"], r["status"], r["label_1"]) for r in dali_rows
    ]
    gaps = [
        abs(float(a[f"prob_{k}"]) - float(b[f"prob_{k}"]))
        for a, b in zip(loader, dali_rows, strict=True)
        if a["status"] == "ok"
        for k in (1, 2, 3)
    ]
    assert max(gaps) <= DALI_PROB_TOLERANCE  # DALI's resampling is not PIL's: close, not equal


def test_dali_summary_counts_what_went_to_pil_and_why(
    folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """No silent fallback: odd files go to PIL by header, and a failing DALI is counted with its error."""
    from helpers import dali

    assert _run(folder, tmp_path / "dali.csv", "--backend", "dali") == 2
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.endswith(", 0 to PIL after DALI errors") and "to PIL by header" in summary
    assert not summary.endswith(", 0 to PIL by header, 0 to PIL after DALI errors")  # CMYK, 16-bit, EXIF...

    def broken(*args, **kwargs):
        raise RuntimeError("Critical error in pipeline:\nencountered:\nCUDA error: out of memory")

    monkeypatch.setattr(dali, "_host_pipeline", broken)  # what the engine's DALI path builds
    out = tmp_path / "broken.csv"
    assert _run(folder, out, "--backend", "dali") == 2  # every file still answered, by PIL
    captured = capsys.readouterr()
    summary = captured.out.strip().splitlines()[-1]
    redone = int(summary.rsplit(", ", 1)[1].split()[0])
    to_dali = [p for p in folder.iterdir() if p.is_file() and dali.route(p) == "dali"]
    assert redone == len(to_dali) > 0 and summary.endswith(f", {redone} to PIL after DALI errors")
    assert f"CUDA error: out of memory {redone}" in captured.err
    assert _run(folder, tmp_path / "loader.csv", "--backend", "dataloader") == 2
    assert _rows(out) == _rows(tmp_path / "loader.csv")  # what PIL gives, file for file


def test_auto_backend_says_what_it_chose_and_why(folder: Path, tmp_path: Path, capsys) -> None:
    assert _run(folder, tmp_path / "auto.csv") == 2  # --backend auto is the default
    notice = capsys.readouterr().err.strip().splitlines()[0]
    assert notice == engines.backend_notice("auto")  # dataloader here; dali on a GPU machine with DALI
    assert notice.startswith("バックエンド: ") and "(auto: " in notice


def test_recursive_includes_sub_folders(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.csv"
    assert _run(folder, out, "--backend", "dataloader", "--recursive") == 2
    assert "sub/inner.jpg" in [row["path"] for row in _rows(out)]


def test_shards_are_disjoint_and_cover(folder: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.csv"
    _run(folder, whole, "--backend", "dataloader")
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}.csv"
        _run(folder, out, "--backend", "dataloader", "--shard", f"{i}/3")
        parts.append([row["path"] for row in _rows(out)])
    merged = [p for part in parts for p in part]
    assert len(merged) == len(set(merged)) and sorted(merged) == [row["path"] for row in _rows(whole)]
    assert all(parts)


def test_resume_after_an_interruption(folder: Path, tmp_path: Path, interrupt_engine) -> None:
    full = tmp_path / "full.csv"
    _run(folder, full, "--backend", "dataloader")
    out = tmp_path / "resumed.csv"
    restore = interrupt_engine(2)
    with pytest.raises(KeyboardInterrupt):
        _run(folder, out, "--backend", "dataloader")
    assert len(_rows(out)) == 8  # two batches of 4 were written before the interruption
    restore()
    assert _run(folder, out, "--backend", "dataloader", "--resume") == 2
    assert _rows(out) == _rows(full)


def test_resume_refuses_other_labels(folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.csv"
    _run(folder, out, "--backend", "dataloader")
    code = classify.main(
        [
            str(folder),
            "--labels",
            "犬,猫",
            "--model",
            "embedded",
            "--out",
            str(out),
            "--resume",
            "--no-progress",
        ]
    )
    assert code == 1 and "labels" in capsys.readouterr().err


def test_min_score_gives_none_below_the_threshold_only(folder: Path, tmp_path: Path) -> None:
    """A threshold between two measured best cosines: files below it answer none, the others keep theirs."""
    from helpers.data import open_image

    model = load_clip("embedded", device="cpu")
    labels = model.label_features(LABELS.split(","))
    names = sorted(GOOD)
    images = model.encode_images([open_image(folder / name) for name in names])
    best = dict(zip(names, zeroshot.cosine(images, labels).max(dim=-1).values.tolist(), strict=True))
    low, high = sorted(best.values())[1:3]  # between the 2nd and 3rd: two files on each side
    threshold = (low + high) / 2
    out = tmp_path / "none.csv"
    _run(folder, out, "--backend", "dataloader", "--min-score", f"{threshold:.6f}")
    by_path = {row["path"]: row for row in _rows(out)}
    for name in names:
        expected = classify.NONE_LABEL if best[name] < threshold else GOOD[name]
        assert by_path[name]["label_1"] == expected, (name, best[name], threshold)
    assert sum(by_path[name]["label_1"] == classify.NONE_LABEL for name in names) == 2


def test_template_ensemble_and_labels_file(folder: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("# shapes\n赤い丸\n青い三角\n緑の四角\n黄色い星\n", encoding="utf-8")
    out = tmp_path / "t.csv"
    code = classify.main(
        [str(folder), "--labels-file", str(labels), "--template", "{}の絵", "--template", "{}が描かれている",
         "--model", "embedded", "--out", str(out), "--workers", "0", "--backend", "dataloader",
         "--no-progress"]
    )  # fmt: skip
    assert code == 2
    by_path = {row["path"]: row for row in _rows(out)}
    assert all(by_path[name]["label_1"] == label for name, label in GOOD.items())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--labels", ""], "ラベルがありません"),
        (["--labels", "猫,猫"], "重複"),
        (["--labels", "猫", "--shard", "3/3"], "--shard"),
        (["--labels", "猫", "--template", "写真"], "{}"),
    ],
)
def test_usage_errors_exit_1(folder: Path, tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert classify.main([str(folder), "--out", str(tmp_path / "x.csv"), "--model", "embedded", *argv]) == 1
    assert message in capsys.readouterr().err


def test_empty_folder_exit_1(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert classify.main([str(tmp_path / "empty"), "--labels", "猫", "--out", str(tmp_path / "x.csv")]) == 1
    assert "画像がありません" in capsys.readouterr().err


def test_auto_without_the_hub_stops_instead_of_answering_with_another_model(
    folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """No --model, no CLIP_MODEL, no hub: exit 1 with one line naming --model embedded, no answers."""
    monkeypatch.delenv("CLIP_MODEL", raising=False)
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: False)
    out = tmp_path / "auto.csv"
    assert classify.main([str(folder), "--labels", "犬,猫", "--out", str(out), "--no-progress"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "--model embedded" in lines[-1] and lines[-1].startswith("エラー:")
    assert not out.exists() and "ok" not in captured.out


def test_a_model_that_fails_its_check_answers_nothing(
    folder: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    def wrong(model):
        raise ModelCheckError("モデル確認 NG: stub")

    monkeypatch.setattr(models, "check", wrong)
    out = tmp_path / "checked.csv"
    assert _run(folder, out, "--backend", "dataloader") == 1
    assert "モデル確認 NG" in capsys.readouterr().err and not out.exists()
    assert _run(folder, out, "--backend", "dataloader", "--no-check") == 2  # skipped, and said so
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(", not checked (--no-check)")
