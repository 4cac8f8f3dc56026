"""``python -m helpers.search``: find images by Japanese text (or by an image) in an embeddings file.

Examples::

    python -m helpers.search embeddings.parquet "海辺を走る犬" --top-k 10     # text → images
    python -m helpers.search embeddings.parquet --image query.jpg              # image → images

The embeddings are what ``python -m helpers.classify ... --embeddings embeddings.parquet`` writes
(:mod:`helpers.embeddings`): one Parquet file, or a directory of Parquet shards (``--engine ray``).
The command loads the model its metadata names (``--model`` overrides) and refuses, with exit
status 1, embeddings made by another model (fingerprints differ): cosine similarities across two
models mean nothing.

``--index`` chooses how: ``exact`` is the query's cosine similarity with every image, read in
chunks so memory stays small whatever the size (FAISS's exact inner-product index when the
``faiss`` package is installed, else torch); ``ivf`` uses the approximate FAISS index saved beside
the embeddings (:mod:`helpers.vector_index`; built the first time, refused when stale or made for
another model; ``--build-index`` rebuilds it); ``auto`` (the default) is exact below
:data:`APPROX_MIN_ROWS` rows and ``ivf`` from there on. One line per hit: the score, then the
image's path. Exit status: 0, or 1 on usage, file, index or model errors.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from helpers import embeddings as emb
from helpers import vector_index
from helpers.models import add_loading_options

__all__ = [
    "APPROX_MIN_ROWS",
    "Hit",
    "SearchError",
    "approximate_search",
    "faiss_available",
    "image_query",
    "main",
    "search",
    "text_query",
]

APPROX_MIN_ROWS: int = 100_000
"""From this many rows on, ``--index auto`` uses the approximate index (below, exact is fast enough)."""


class SearchError(Exception):
    """Bad arguments, an unreadable file or a model mismatch: one line, exit status 1."""


@dataclass(frozen=True)
class Hit:
    """One search result."""

    path: str
    """As stored in the embeddings file (relative to the image folder)."""
    score: float
    """Cosine similarity with the query (-1 to 1)."""


def faiss_available() -> bool:
    """True when the optional ``faiss`` package is installed."""
    return importlib.util.find_spec("faiss") is not None


def text_query(model, text: str) -> torch.Tensor:
    """The L2-normalised float32 text embedding [D] of ``text``."""
    return F.normalize(model.encode_texts([text]).float().cpu(), dim=-1)[0]


def image_query(model, path: str | Path) -> torch.Tensor:
    """The L2-normalised float32 image embedding [D] of the image at ``path``."""
    from helpers.data import open_image

    return F.normalize(model.encode_images([open_image(path)]).float().cpu(), dim=-1)[0]


def _chunk_top(vectors: torch.Tensor, queries: torch.Tensor, k: int, use_faiss: bool):
    """(scores [Q, k'], row indices [Q, k']) of the best rows of one chunk, exactly."""
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors.contiguous().numpy())
        scores, rows = index.search(queries.contiguous().numpy(), min(k, vectors.shape[0]))
        return torch.from_numpy(scores), torch.from_numpy(rows).long()
    return (queries @ vectors.T).topk(min(k, vectors.shape[0]), dim=-1)


def search(
    path: str | Path,
    queries: torch.Tensor,
    top_k: int = 10,
    chunk_rows: int = 65_536,
    use_faiss: bool | None = None,
) -> list[list[Hit]]:
    """The ``top_k`` images of the embeddings file ``path`` closest to each query, best first.

    ``queries``: L2-normalised float32 [D] or [Q, D] (:func:`text_query`, :func:`image_query`).
    Exact cosine similarity over every ``ok`` row, ``chunk_rows`` rows at a time; FAISS
    (``IndexFlatIP``, also exact) when ``use_faiss`` is True, or None and FAISS is installed.
    """
    if top_k < 1:
        raise ValueError("top_k must be at least 1")
    queries = F.normalize(queries.float().reshape(-1, queries.shape[-1]), dim=-1)
    use_faiss = faiss_available() if use_faiss is None else use_faiss
    best_scores = torch.empty(queries.shape[0], 0)
    best_paths: list[list[str]] = [[] for _ in range(queries.shape[0])]
    for paths, vectors in emb.iter_chunks(path, chunk_rows):
        if vectors.shape[1] != queries.shape[1]:
            raise SearchError(
                f"埋め込みの次元 {vectors.shape[1]} とクエリの次元 {queries.shape[1]} が違います"
            )
        scores, rows = _chunk_top(F.normalize(vectors, dim=-1), queries, top_k, use_faiss)
        merged = torch.cat([best_scores, scores], dim=1)
        order = merged.argsort(dim=1, descending=True, stable=True)[:, :top_k]
        for q in range(queries.shape[0]):
            candidates = best_paths[q] + [paths[int(r)] for r in rows[q]]
            best_paths[q] = [candidates[int(i)] for i in order[q]]
        best_scores = merged.gather(1, order)
    return [
        [Hit(p, float(s)) for p, s in zip(best_paths[q], best_scores[q].tolist(), strict=True)]
        for q in range(queries.shape[0])
    ]


def approximate_search(
    path: str | Path,
    queries: torch.Tensor,
    model_fingerprint: str,
    top_k: int = 10,
    nprobe: int | None = None,
    rebuild: bool = False,
) -> list[list[Hit]]:
    """The approximate ``top_k`` of each query from the IVF index beside ``path`` (built if missing or
    ``rebuild``). Raises :class:`SearchError` when faiss is missing or the index is stale or foreign."""
    try:
        index = None if rebuild else vector_index.open_index(path, model_fingerprint)
        if index is None:
            index = vector_index.build(path)
            print(
                f"近似索引を作りました: {vector_index.index_paths(path)[0]} ({index.meta['kind']},"
                f" {index.rows} ベクトル, {index.meta['build_seconds']} 秒)",
                file=sys.stderr,
            )
        scores, paths = index.search(queries, top_k, nprobe)
    except vector_index.VectorIndexError as err:
        raise SearchError(str(err)) from None
    return [
        [Hit(p, float(s)) for p, s in zip(row_paths, row_scores.tolist(), strict=False)]
        for row_paths, row_scores in zip(paths, scores, strict=True)
    ]


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.search",
        description="埋め込みファイル (Parquet) から、日本語の文または画像に近い画像を探します。",
    )
    parser.add_argument(
        "embeddings",
        help="python -m helpers.classify --embeddings で作った Parquet ファイル (またはシャードのフォルダー)",
    )
    parser.add_argument("query", nargs="?", help="探したいものを表す文 (例: 海辺を走る犬)")
    parser.add_argument("--image", type=Path, help="文の代わりに、この画像に近い画像を探す")
    parser.add_argument("--top-k", type=int, default=10, help="表示する件数 (既定 10)")
    parser.add_argument("--model", help="モデル名 (既定: 埋め込みファイルに記録されたモデル)")
    parser.add_argument("--chunk-rows", type=int, default=65_536, help="一度に読む行数")
    parser.add_argument(
        "--index",
        choices=["auto", "exact", "ivf"],
        default="auto",
        help=f"exact: 全件と比べる / ivf: FAISS の近似索引 (隣に保存) / auto: {APPROX_MIN_ROWS:,} 行から ivf",
    )
    parser.add_argument("--build-index", action="store_true", help="近似索引を作り直す (--index ivf で使う)")
    parser.add_argument("--nprobe", type=int, help="近似索引で調べるリストの数 (多いほど正確で遅い)")
    add_loading_options(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    """Search and print ``score  path`` lines; raises SearchError (and ModelLoadError) on problems."""
    from helpers.data import ImageReadError
    from helpers.models import prepare

    if (args.query is None) == (args.image is None):
        raise SearchError("文 (QUERY) か --image のどちらか一方を指定してください")
    if args.top_k < 1 or args.chunk_rows < 1:
        raise SearchError("--top-k と --chunk-rows は 1 以上にしてください")
    try:
        info = emb.read_info(args.embeddings)
    except FileNotFoundError:
        raise SearchError(f"埋め込みファイルが見つかりません: {args.embeddings}") from None
    except emb.ModelMismatchError as err:
        raise SearchError(str(err)) from None
    except (OSError, ValueError) as err:
        raise SearchError(f"埋め込みファイルを読めません: {args.embeddings} ({err})") from None
    model, note = prepare(
        args.model or info.model_name, run_check=not args.no_check, trust_remote_code=args.trust_remote_code
    )
    print(note, file=sys.stderr)
    if model.fingerprint != info.model_fingerprint:
        raise SearchError(
            f"{args.embeddings} の埋め込みは別のモデルで作られています: ファイルは {info.model_name}"
            f" (fingerprint {info.model_fingerprint})、読み込んだのは {model.name} ({model.fingerprint})。"
            " 違うモデルの埋め込みどうしは比べられません。同じモデルで埋め込みを作り直してください"
        )
    if args.image is not None:
        try:
            query = image_query(model, args.image)
        except ImageReadError as err:
            raise SearchError(f"クエリ画像を読めません: {args.image} ({err.reason})") from None
    else:
        query = text_query(model, args.query)
    kind = args.index
    if args.build_index and kind == "exact":
        raise SearchError("--build-index は --index ivf (または auto) と一緒に使ってください")
    if kind == "auto":
        kind = "ivf" if args.build_index or info.rows >= APPROX_MIN_ROWS else "exact"
        if kind == "ivf" and not vector_index.faiss_available() and not args.build_index:
            print(
                f"{info.rows} 行ありますが faiss がないので正確な検索をします ({vector_index.FAISS_MISSING})",
                file=sys.stderr,
            )
            kind = "exact"
    if kind == "ivf":
        hits = approximate_search(
            args.embeddings, query, model.fingerprint, args.top_k, args.nprobe, rebuild=args.build_index
        )[0]
    else:
        hits = search(args.embeddings, query, args.top_k, args.chunk_rows)[0]
    for hit in hits:
        print(f"{hit.score:.4f}  {hit.path}")
    if not hits:
        print("(検索できる画像がありません: status が ok の行がない)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line on stderr and exit status 1 on errors."""
    from helpers.models import ModelCheckError, ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (SearchError, ModelLoadError, ModelCheckError) as err:
        print(f"エラー: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
