"""Embeddings in Parquet (the DESIGN contract) and ``python -m helpers.search`` over them."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import classify, search
from helpers import embeddings as emb
from helpers.fixtures import shapes
from helpers.models import load_clip

DRAWN = ["赤い丸", "青い三角", "緑の四角", "黄色い星", "紫の丸", "赤い星"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Drawn shapes (one per label, one in a sub-folder) and a file that is not an image."""
    root = tmp_path_factory.mktemp("drawn")
    for i, label in enumerate(DRAWN[:-1]):
        shapes.draw_shape(label, i, size=96).save(root / f"{i}_{label}.png")
    (root / "sub").mkdir()
    shapes.draw_shape(DRAWN[-1], 9, size=96).save(root / "sub" / f"9_{DRAWN[-1]}.jpg")
    (root / "broken.jpg").write_bytes(b"not a jpeg")
    return root


def _classify(photos: Path, tmp: Path, *extra: str) -> tuple[int, Path]:
    out = tmp / "results.csv"
    code = classify.main(
        [str(photos), "--labels", ",".join(shapes.LABELS), "--model", "embedded", "--out", str(out),
         "--batch-size", "2", "--workers", "0", "--backend", "dataloader", "--recursive", "--no-progress",
         *extra]
    )  # fmt: skip
    return code, out


@pytest.fixture(scope="module")
def parquet(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("emb")
    code, _ = _classify(photos, tmp, "--embeddings", str(tmp / "emb.parquet"))
    assert code == 2  # the broken file
    return tmp / "emb.parquet"


def test_parquet_follows_the_contract(parquet: Path) -> None:
    table = pq.read_table(parquet)
    assert table.column_names == ["path", "status", "embedding"]
    assert table.schema.field("embedding").type == pa.list_(pa.field("element", pa.float16()))
    model = load_clip("embedded")
    metadata = pq.read_schema(parquet).metadata
    assert metadata[b"model_name"] == b"embedded"
    assert metadata[b"model_fingerprint"] == model.fingerprint.encode()
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    assert f"sub/9_{DRAWN[-1]}.jpg" in [r["path"] for r in rows]
    by_path = {r["path"]: r for r in rows}
    assert by_path["broken.jpg"]["status"] == "error" and by_path["broken.jpg"]["embedding"] is None
    good = [r for r in rows if r["status"] == "ok"]
    assert len(good) == len(DRAWN)
    norms = torch.tensor([r["embedding"] for r in good]).norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)
    info = emb.read_info(parquet)
    assert (info.model_name, info.model_fingerprint, info.rows) == ("embedded", model.fingerprint, len(rows))


def test_text_search_finds_each_drawn_label(parquet: Path) -> None:
    model = load_clip("embedded")
    queries = torch.stack([search.text_query(model, label) for label in DRAWN])
    results = search.search(parquet, queries, top_k=3)
    for label, hits in zip(DRAWN, results, strict=True):
        assert hits[0].path.endswith(f"_{label}.png") or hits[0].path.endswith(f"_{label}.jpg"), (label, hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_chunks_and_uris_give_the_same_hits(parquet: Path) -> None:
    query = search.text_query(load_clip("embedded"), "青い三角")
    whole = search.search(parquet, query, top_k=4, use_faiss=False)[0]
    for hits in (
        search.search(parquet, query, top_k=4, chunk_rows=2, use_faiss=False)[0],
        search.search(parquet.absolute().as_uri(), query, top_k=4, use_faiss=False)[0],
    ):
        assert [h.path for h in hits] == [h.path for h in whole]
        assert [h.score for h in hits] == pytest.approx([h.score for h in whole], abs=1e-6)


def test_faiss_when_installed_gives_the_same_hits(parquet: Path) -> None:
    pytest.importorskip("faiss", reason="FAISS is optional")
    query = search.text_query(load_clip("embedded"), "青い三角")
    exact = search.search(parquet, query, top_k=4, use_faiss=False)[0]
    faiss_hits = search.search(parquet, query, top_k=4, chunk_rows=3, use_faiss=True)[0]
    assert [h.path for h in faiss_hits] == [h.path for h in exact]


def test_command_text_and_image(parquet: Path, photos: Path, capsys) -> None:
    assert search.main([str(parquet), "緑の四角", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("2_緑の四角.png")
    score, path = lines[0].split(maxsplit=1)
    assert -1.0 <= float(score) <= 1.0 and path == "2_緑の四角.png"
    assert search.main([str(parquet), "--image", str(photos / "1_青い三角.png"), "--top-k", "1"]) == 0
    score, path = capsys.readouterr().out.split()
    assert path == "1_青い三角.png" and float(score) > 0.99


def test_refuses_embeddings_of_another_model(parquet: Path, tmp_path: Path, capsys) -> None:
    table = pq.read_table(parquet)
    metadata = dict(table.schema.metadata) | {b"model_fingerprint": b"0123456789abcdef"}
    other = tmp_path / "other.parquet"
    pq.write_table(table.replace_schema_metadata(metadata), other)
    assert search.main([str(other), "赤い丸"]) == 1
    err = capsys.readouterr().err
    assert "別のモデル" in err and "0123456789abcdef" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.parquet", "猫"], "見つかりません"),
        (["{parquet}"], "どちらか一方"),
        (["{parquet}", "猫", "--image", "x.jpg"], "どちらか一方"),
        (["{parquet}", "--image", "no-such.jpg"], "クエリ画像を読めません"),
    ],
)
def test_usage_errors_exit_1(parquet: Path, capsys, argv: list[str], message: str) -> None:
    assert search.main([a.format(parquet=parquet) for a in argv]) == 1
    assert message in capsys.readouterr().err


def test_resume_keeps_the_embeddings_written_before(
    photos: Path, parquet: Path, tmp_path: Path, interrupt_engine
) -> None:
    """An interrupted run leaves its CSV rows but no half-written Parquet; --resume redoes the rows
    whose embeddings were lost and carries over the ones already in the file."""
    out = tmp_path / "emb.parquet"
    restore = interrupt_engine(2)
    with pytest.raises(KeyboardInterrupt):
        _classify(photos, tmp_path, "--embeddings", str(out))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    restore()
    assert _classify(photos, tmp_path, "--embeddings", str(out), "--resume")[0] == 2
    _assert_same_embeddings(out, parquet)
    before = pq.read_table(out).to_pylist()
    assert _classify(photos, tmp_path, "--embeddings", str(out), "--resume")[0] == 2  # nothing left to do
    assert pq.read_table(out).to_pylist() == before


def _assert_same_embeddings(a: Path, b: Path) -> None:
    x, y = emb.read_embeddings(a), emb.read_embeddings(b)
    assert (x.info, x.paths, x.status, x.ok_paths) == (y.info, y.paths, y.status, y.ok_paths)
    assert torch.allclose(x.vectors, y.vectors, atol=2e-3)
