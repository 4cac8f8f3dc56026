"""An approximate nearest-neighbour index (FAISS IVF) over an embeddings file or directory, built once.

Exact search reads every vector for every query; past a few hundred thousand images an inverted-file
index answers from a few of its lists instead::

    built = build("emb.parquet")                        # writes emb.parquet.ivf.faiss + .ivf.json
    index = open_index("emb.parquet", model.fingerprint)  # refuses a stale or a foreign index
    scores, paths = index.search(queries, k=10)          # cosine similarities, best first

The index (``IVF{nlist},SQfp16``: vectors kept as float16, inner product = cosine on normalised
vectors) lives beside the Parquet, with a JSON sidecar naming the model (``model_name``,
``model_fingerprint``) and the embeddings it was built from (each file's name, size and row count).
:func:`open_index` raises :class:`StaleIndexError` when the embeddings changed since, and
:class:`IndexMismatchError` when the index belongs to another model. FAISS (``faiss-cpu``) is
needed here only; exact search (:mod:`helpers.search`) works without it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers import embeddings as emb

__all__ = [
    "BuiltIndex",
    "IndexMismatchError",
    "StaleIndexError",
    "VectorIndexError",
    "build",
    "faiss_available",
    "index_paths",
    "open_index",
]

FAISS_MISSING = (
    "近似索引 (IVF) には faiss が要ります: pip install faiss-cpu==1.15.1"
    " (正確な検索 --index exact は faiss なしで動きます)"
)


class VectorIndexError(RuntimeError):
    """The approximate index cannot be used: faiss missing, a stale or a foreign index."""


class StaleIndexError(VectorIndexError):
    """The embeddings changed since the index was built."""


class IndexMismatchError(VectorIndexError):
    """The index was built from another model's embeddings."""


def faiss_available() -> bool:
    """True when the ``faiss`` package (``faiss-cpu``) is installed."""
    return importlib.util.find_spec("faiss") is not None


def _faiss():
    if not faiss_available():
        raise VectorIndexError(FAISS_MISSING)
    import faiss

    return faiss


def index_paths(embeddings_path: str | Path) -> tuple[Path, Path]:
    """(index file, sidecar JSON) beside an embeddings file or directory (local paths only)."""
    text = str(embeddings_path)
    if "://" in text:
        raise VectorIndexError(f"近似索引はローカルの埋め込みにだけ作れます: {text}")
    base = Path(text.rstrip("/"))
    return base.with_name(base.name + ".ivf.faiss"), base.with_name(base.name + ".ivf.json")


def _signature(embeddings_path: str | Path) -> list[list]:
    """What the index was built from: each Parquet file's name, size in bytes and row count."""
    import pyarrow.parquet as pq

    filesystem, files = emb.files_of(embeddings_path)
    signature = []
    for inner in files:
        size = filesystem.get_file_info(inner).size
        with filesystem.open_input_file(inner) as handle:
            rows = pq.ParquetFile(handle).metadata.num_rows
        signature.append([Path(inner).name, int(size), int(rows)])
    return signature


def _ok_paths(embeddings_path: str | Path) -> list[str]:
    """The paths of the vectors, in :func:`helpers.embeddings.iter_chunks` order (ids of the index)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    filesystem, files = emb.files_of(embeddings_path)
    found: list[str] = []
    for inner in files:
        with filesystem.open_input_file(inner) as handle:
            table = pq.ParquetFile(handle).read(columns=["path", "status", "embedding"])
        good = pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["embedding"]))
        found += table.filter(good)["path"].to_pylist()
    return found


@dataclass
class BuiltIndex:
    """An IVF index opened beside its embeddings (:func:`build`, :func:`open_index`)."""

    index: object
    """The ``faiss.Index``."""
    paths: list[str]
    """The path of each vector id."""
    meta: dict
    """The sidecar: model, source signature, ``nlist``, ``rows``, build seconds."""

    @property
    def rows(self) -> int:
        return int(self.index.ntotal)

    def search(
        self, queries: torch.Tensor, k: int = 10, nprobe: int | None = None
    ) -> tuple[torch.Tensor, list[list[str]]]:
        """(cosine scores [Q, k'], paths [Q][k']) of the approximate ``k`` best, best first.

        ``nprobe``: lists visited per query (default the sidecar's; more = better recall, slower).
        """
        queries = F.normalize(queries.float().reshape(-1, queries.shape[-1]), dim=-1)
        if queries.shape[1] != self.index.d:
            raise ValueError(f"埋め込みの次元 {self.index.d} とクエリの次元 {queries.shape[1]} が違います")
        import faiss

        faiss.extract_index_ivf(self.index).nprobe = int(nprobe or self.meta["nprobe"])
        scores, ids = self.index.search(queries.contiguous().numpy(), min(k, self.rows))
        paths = [[self.paths[int(i)] for i in row if i >= 0] for row in ids]
        return torch.from_numpy(scores), paths


def build(
    embeddings_path: str | Path,
    nlist: int | None = None,
    nprobe: int | None = None,
    train_rows: int | None = None,
    seed: int = 0,
) -> BuiltIndex:
    """Build the IVF index of an embeddings file or directory and save it beside (overwriting).

    ``nlist`` (default ≈ 2·√n lists) k-means centroids trained on ``train_rows`` vectors (default
    40 per list) taken at even steps; then every vector is added chunk by chunk, so memory stays at
    the sample plus the index (float16 vectors). ``nprobe`` (default ``max(8, nlist // 20)``) is
    saved as the default for searches.
    """
    faiss = _faiss()
    info = emb.read_info(embeddings_path)
    index_file, sidecar = index_paths(embeddings_path)
    begin = time.perf_counter()
    n = info.rows
    nlist = nlist or max(1, round(2 * math.sqrt(n)))
    nprobe = nprobe or max(8, nlist // 20)
    wanted = train_rows or min(n, 40 * nlist)
    step = max(1, n // max(1, wanted))
    sample, seen, dim = [], 0, 0
    for _, vectors in emb.iter_chunks(embeddings_path):
        dim = vectors.shape[1]
        chosen = np.arange((-seen) % step, len(vectors), step)
        sample.append(F.normalize(vectors[chosen], dim=-1).numpy())
        seen += len(vectors)
    if not seen:
        raise VectorIndexError(f"{embeddings_path} に索引に入れる ok の埋め込みがありません")
    nlist = min(nlist, seen)
    index = faiss.index_factory(dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
    faiss.extract_index_ivf(index).cp.seed = seed
    index.train(np.ascontiguousarray(np.concatenate(sample), dtype=np.float32))
    del sample
    for _, vectors in emb.iter_chunks(embeddings_path):
        index.add(np.ascontiguousarray(F.normalize(vectors, dim=-1).numpy()))
    paths = _ok_paths(embeddings_path)
    if len(paths) != index.ntotal:
        raise VectorIndexError(
            f"{embeddings_path} が作成中に変わりました ({len(paths)} 行 / {index.ntotal} ベクトル)"
        )
    meta = {
        "kind": f"IVF{nlist},SQfp16",
        "model_name": info.model_name,
        "model_fingerprint": info.model_fingerprint,
        "source": _signature(embeddings_path),
        "rows": int(index.ntotal),
        "nlist": nlist,
        "nprobe": min(nprobe, nlist),
        "build_seconds": round(time.perf_counter() - begin, 2),
    }
    faiss.write_index(index, str(index_file))
    sidecar.write_text(json.dumps(meta, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return BuiltIndex(index, paths, meta)


def open_index(embeddings_path: str | Path, model_fingerprint: str) -> BuiltIndex | None:
    """The saved index of ``embeddings_path`` (None when none was built).

    Raises :class:`IndexMismatchError` when it was built for another model than
    ``model_fingerprint`` or the embeddings', :class:`StaleIndexError` when the embeddings changed
    since it was built, and :class:`VectorIndexError` without faiss.
    """
    index_file, sidecar = index_paths(embeddings_path)
    if not index_file.exists() and not sidecar.exists():
        return None
    faiss = _faiss()
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StaleIndexError(
            f"索引の設定 {sidecar} を読めません ({err}): --build-index で作り直してください"
        ) from None
    info = emb.read_info(embeddings_path)
    for fingerprint in (info.model_fingerprint, model_fingerprint):
        if meta.get("model_fingerprint") != fingerprint:
            raise IndexMismatchError(
                f"索引 {index_file} は別のモデル ({meta.get('model_name')}, {meta.get('model_fingerprint')})"
                f" のものです (今回 {fingerprint}): --build-index で作り直してください"
            )
    if meta.get("source") != _signature(embeddings_path):
        raise StaleIndexError(
            f"索引 {index_file} を作ったあとで埋め込み {embeddings_path} が変わっています:"
            " --build-index で作り直してください"
        )
    index = faiss.read_index(str(index_file))
    paths = _ok_paths(embeddings_path)
    if len(paths) != index.ntotal:
        raise StaleIndexError(
            f"索引 {index_file} のベクトル数が埋め込みと合いません: --build-index で作り直してください"
        )
    return BuiltIndex(index, paths, meta)
