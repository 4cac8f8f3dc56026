"""The approximate FAISS index of ``helpers.vector_index``: close to exact, saved once, refused when stale
or foreign; embeddings as a directory of shards; one clear line without faiss.

Small generated sets (a few thousand clustered vectors) keep this quick; recall and query times on
≥ 100,000 vectors are measured by ``tests/verify/measure_search_index.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import embeddings as emb
from helpers import search, vector_index

pytest.importorskip("faiss", reason="faiss-cpu is in requirements.txt: the index tests run in CI")

FINGERPRINT = "f" * 16


def clustered(n: int, dim: int = 64, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """L2-normalised vectors around ``clusters`` random centres (as image embeddings cluster)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    vectors = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write(path: Path, vectors: np.ndarray, start: int = 0, fingerprint: str = FINGERPRINT) -> None:
    ok = (start + np.arange(len(vectors))) % 97 != 0  # some error rows, as a real run has
    table = pa.table(
        {
            "path": [f"img/{start + i:06d}.jpg" for i in range(len(vectors))],
            "status": ["ok" if good else "error" for good in ok],
            "embedding": emb.embedding_array(vectors, ok),
        }
    )
    with emb.EmbeddingsWriter(path, "synthetic", fingerprint) as writer:
        writer.write_table(table)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    root = tmp_path_factory.mktemp("index")
    vectors = clustered(4000)
    write(root / "emb.parquet", vectors)
    return root / "emb.parquet", vectors


def test_the_index_finds_nearly_what_exact_search_finds(data) -> None:
    path, vectors = data
    built = vector_index.build(path, nlist=40, nprobe=8)
    assert built.rows == sum(1 for i in range(len(vectors)) if i % 97)
    queries = torch.from_numpy(clustered(50, seed=1))
    exact = search.search(path, queries, top_k=10)
    index = vector_index.open_index(path, FINGERPRINT)
    assert index is not None and index.meta["kind"] == "IVF40,SQfp16"
    scores, paths = index.search(queries, 10)
    recall = np.mean([len(set(p) & {h.path for h in e}) / 10 for p, e in zip(paths, exact, strict=True)])
    assert recall >= 0.9, recall
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    top = search.approximate_search(path, queries[:1], FINGERPRINT, top_k=3)[0]
    assert [h.path for h in top] == paths[0][:3]


def test_a_stale_or_foreign_index_is_refused(data, tmp_path: Path) -> None:
    path, vectors = data
    copy = tmp_path / "emb.parquet"
    shutil.copy(path, copy)
    vector_index.build(copy, nlist=20)
    with pytest.raises(vector_index.IndexMismatchError, match="別のモデル"):
        vector_index.open_index(copy, "0" * 16)
    write(copy, vectors[:3000])  # the embeddings change after the index was built
    with pytest.raises(vector_index.StaleIndexError, match="--build-index"):
        vector_index.open_index(copy, FINGERPRINT)
    with pytest.raises(search.SearchError, match="--build-index"):
        search.approximate_search(copy, torch.from_numpy(vectors[:1]), FINGERPRINT)
    rebuilt = search.approximate_search(copy, torch.from_numpy(vectors[5:6]), FINGERPRINT, rebuild=True)
    assert rebuilt[0][0].path == "img/000005.jpg"
    assert vector_index.open_index(tmp_path / "none.parquet", FINGERPRINT) is None


def test_a_directory_of_shards_searches_like_one_file(data, tmp_path: Path) -> None:
    path, vectors = data
    shards = tmp_path / "emb"
    shards.mkdir()
    for i, start in enumerate(range(0, len(vectors), 1500)):
        write(shards / f"part-{i:05d}.parquet", vectors[start : start + 1500], start=start)
    assert emb.read_info(shards).rows == len(vectors)
    queries = torch.from_numpy(clustered(5, seed=2))
    assert search.search(shards, queries, 10) == search.search(path, queries, 10)
    built = vector_index.build(shards, nlist=20)
    assert vector_index.index_paths(shards)[0] == tmp_path / "emb.ivf.faiss"
    assert built.rows == vector_index.open_index(shards, FINGERPRINT).rows
    write(shards / "part-00009.parquet", vectors[:10], start=9000, fingerprint="0" * 16)
    with pytest.raises(emb.ModelMismatchError):
        emb.read_info(shards)


def test_without_faiss_one_clear_line_and_exact_search_still_works(data, monkeypatch) -> None:
    path, vectors = data
    monkeypatch.setattr(vector_index, "faiss_available", lambda: False)
    with pytest.raises(search.SearchError, match="pip install faiss-cpu") as caught:
        search.approximate_search(path, torch.from_numpy(vectors[:1]), FINGERPRINT, rebuild=True)
    assert "\n" not in str(caught.value)
    assert (
        search.search(path, torch.from_numpy(vectors[1:2]), 1, use_faiss=False)[0][0].path == "img/000001.jpg"
    )
