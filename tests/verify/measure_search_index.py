"""Approximate (FAISS IVF) against exact search on a generated set of ≥ 100,000 vectors.

Not collected by pytest, never run by CI. From the repository root::

    .venv/bin/python tests/verify/measure_search_index.py [--n 100000] [--queries 200]

The set: ``--n`` L2-normalised 512-d vectors around 2,000 random centres (image embeddings cluster
by content; uniformly random vectors have no neighbours worth the name), written as an embeddings
Parquet file with :class:`helpers.embeddings.EmbeddingsWriter` (float16, as classify writes them).
Queries: ``--queries`` vectors drawn the same way. Timed: building the index once
(:func:`helpers.vector_index.build`), then per query batch ``helpers.search.search`` (exact: reads
the Parquet, FAISS flat inner product per chunk), exact search on the vectors already in memory
(one ``IndexFlatIP``), and the IVF index at several ``nprobe``. recall@10 = the share of the exact
top 10 that the approximate top 10 contains, averaged over the queries. Median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def clustered(n: int, dim: int, centres, rng, noise: float):
    import numpy as np

    vectors = centres[rng.integers(0, len(centres), n)] + noise * rng.standard_normal((n, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> int:
    import faiss
    import numpy as np
    import pyarrow as pa
    import torch

    from helpers import embeddings as emb
    from helpers import search, vector_index

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.08, help="noise per dimension around a centre")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, args.dim)) / np.sqrt(args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.parquet"
        begin = time.perf_counter()
        with emb.EmbeddingsWriter(path, "synthetic", "s" * 16) as writer:
            for start in range(0, args.n, 20_000):
                vectors = clustered(min(20_000, args.n - start), args.dim, centres, rng, args.noise)
                ok = np.ones(len(vectors), dtype=bool)
                writer.write_table(pa.table({
                    "path": [f"img/{start + i:07d}.jpg" for i in range(len(vectors))],
                    "status": ["ok"] * len(vectors),
                    "embedding": emb.embedding_array(vectors, ok),
                }))  # fmt: skip
        megabytes = path.stat().st_size / 1e6
        print(f"wrote {args.n:,} vectors ({megabytes:.0f} MB) in {time.perf_counter() - begin:.1f} s")
        queries = torch.from_numpy(clustered(args.queries, args.dim, centres, rng, args.noise))

        begin = time.perf_counter()
        built = vector_index.build(path)
        build_s = time.perf_counter() - begin
        print(f"built {built.meta['kind']} in {build_s:.1f} s (nprobe default {built.meta['nprobe']})")

        exact_hits = search.search(path, queries, top_k=10)
        exact_sets = [{h.path for h in hits} for hits in exact_hits]
        exact_file_s = median_seconds(lambda: search.search(path, queries, top_k=10), args.repeats)
        matrix = np.concatenate([v.numpy() for _, v in emb.iter_chunks(path)])
        flat = faiss.IndexFlatIP(args.dim)
        flat.add(matrix)
        exact_memory_s = median_seconds(lambda: flat.search(queries.numpy(), 10), args.repeats)
        index = vector_index.open_index(path, "s" * 16)
        rows = [
            ("exact, from the Parquet file (helpers.search.search)", exact_file_s, 1.0),
            ("exact, vectors in memory (faiss IndexFlatIP)", exact_memory_s, 1.0),
        ]
        for nprobe in sorted({1, 4, built.meta["nprobe"], 4 * built.meta["nprobe"]}):
            _, paths = index.search(queries, 10, nprobe)
            recall = float(np.mean([len(set(p) & e) / 10 for p, e in zip(paths, exact_sets, strict=True)]))
            seconds = median_seconds(lambda nprobe=nprobe: index.search(queries, 10, nprobe), args.repeats)
            rows.append((f"IVF {built.meta['kind']}, nprobe {nprobe}", seconds, recall))

    cpu = platform.processor() or platform.machine()
    print(f"\n{args.n:,} vectors × {args.dim}, {args.queries} queries, top 10; {os.cpu_count()} CPUs ({cpu}),"
          f" faiss {faiss.__version__}, median of {args.repeats}; index build {build_s:.1f} s\n")  # fmt: skip
    print("| search | recall@10 | ms per query (batch of queries) |")
    print("| --- | ---: | ---: |")
    for name, seconds, recall in rows:
        print(f"| {name} | {recall:.3f} | {1000 * seconds / args.queries:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
