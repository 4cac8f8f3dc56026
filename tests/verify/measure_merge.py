"""How fast the Ray engine's final merge writes the sorted CSV and the embeddings file (synthetic shards).

Not collected by pytest, never run by CI. From the repository root::

    .venv/bin/python tests/verify/measure_merge.py --rows 1000000 [--old]

1. It writes the shards as ``classify --engine ray`` workers do (:func:`helpers.engines_ray.write_parts`):
   :func:`helpers.engines_ray.to_part_rows` with classify's :class:`helpers.classify.Labeller` (top-3
   of 3 labels) and 512-d float16 embeddings, 1 row in 50 an error, each shard one Parquet file of
   64-128 rows as Ray Data's ``write_parquet`` makes them after a batch-64 actor pool (measured:
   64-126 rows per file for 5,000 rows), written with :func:`helpers.embeddings.parquet_options`
   as ``write_parts`` has Ray Data write them. Rows are
   interleaved across the shards: shard k holds rows of consecutive ids, whose paths
   (``dirNN/imgID.jpg``, ``NN`` = id mod 97) are spread over the whole sorted listing; the shard file
   names do not follow the rows either.
2. It then times only the merge in a fresh process: :func:`helpers.parts.merge_embeddings` into one
   ``.parquet`` file and the CSV, by :func:`helpers.parts.merge` as ``classify --engine ray`` calls it
   (the listing is built before the clock starts: the driver holds it already). That process
   reports its peak RSS (``getrusage``: the interpreter, torch, which ``helpers.embeddings``
   imports, and the listing included; the model is not loaded there).
3. It checks the outputs (row counts, sorted unique paths, float16, model metadata).

``--old`` times the merge this replaced (the row-by-row bucket sort, kept in tests/test_parts_merge.py).
The last stdout line is ``N rows in T s (R rows/s), peak RSS M MB``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DIM = 512
LABELS = ("犬", "猫", "象")


def name_of(i: int) -> str:
    """The relative path of synthetic file ``i``."""
    return f"dir{i % 97:02d}/img{i:08d}.jpg"


def write_shards(parts: Path, rows: int, seed: int = 0) -> int:
    """Write ``rows`` result rows as Ray-sized shards into ``parts``; returns the number of shards."""
    import numpy as np
    import pyarrow.parquet as pq

    from helpers import classify, embeddings, engines_ray
    from helpers.models import load_clip

    model = load_clip("embedded")  # its name, fingerprint and scoring rule only; no image is encoded
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((4096, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    classifier = rng.standard_normal((len(LABELS), DIM)).astype(np.float32)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    labeller = classify.Labeller(LABELS, classifier, model.scoring, 3)
    schema = engines_ray.parts_schema(model.name, model.fingerprint, labeller.columns, with_embeddings=True)
    sizes = []
    while sum(sizes) < rows:
        sizes.append(min(int(rng.integers(64, 129)), rows - sum(sizes)))
    names = rng.permutation(len(sizes))  # Ray's file names do not follow the rows
    options = embeddings.parquet_options(schema.names)  # as write_parts passes them to Ray Data
    parts.mkdir(parents=True)
    bounds = np.cumsum([0, *sizes])
    block = 16_384  # to_part_rows on many shards' rows at once (the same rows, made faster), then cut
    for first in range(0, len(sizes), block // 64):
        last = min(first + block // 64, len(sizes))
        ids = np.arange(bounds[first], bounds[last])
        ok = ids % 50 != 7
        n = len(ids)
        batch = {
            "ok": ok,
            "error": np.array(["" if good else "壊れているか読めない画像です" for good in ok], dtype=object),
            "decoder": np.array([""] * n, dtype=object),
            "embedding": vectors[ids % len(vectors)],
            "fingerprint": np.array([model.fingerprint] * n, dtype=object),
            "pid": np.full(n, 1000, dtype=np.int64),
            "name": np.array([name_of(i) for i in ids], dtype=object),
        }
        table = engines_ray.to_part_rows(batch, model.name, model.fingerprint, labeller, schema)
        for k in range(first, last):
            shard = table.slice(bounds[k] - bounds[first], sizes[k])
            pq.write_table(shard, parts / f"{names[k]:06x}_{k:06d}.parquet", **options)
    return len(sizes)


def merge(workdir: Path, rows: int, old: bool, model: list[str], header: list[str]) -> dict:
    """The timed part, run in a fresh process: merge the shards into ``out.csv`` and ``out.parquet``."""
    from helpers import parts

    name, fingerprint = model
    listing = sorted(name_of(i) for i in range(rows))
    out, target = workdir / "out.csv", str(workdir / "out.parquet")
    shards = parts.parts_dir(out)
    begin, cpu = time.perf_counter(), time.process_time()
    if old:
        sys.path.insert(0, str(REPO / "tests"))
        from test_parts_merge import old_merge_csv, old_merge_embeddings

        old_merge_embeddings(target, name, fingerprint, shards, listing, False)
        counts, _ = old_merge_csv(out, header, shards, listing, False)
    else:  # as classify --engine ray calls it
        to = parts.EmbeddingsTarget(target, name, fingerprint)
        counts, _ = parts.merge(out, header, shards, listing, False, to)
    seconds, cpu = time.perf_counter() - begin, time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"seconds": seconds, "cpu": cpu, "peak_mb": peak_mb, "counts": counts}


def check(workdir: Path, rows: int) -> None:
    """The outputs hold every row once, sorted, with float16 embeddings and the model metadata."""
    import csv

    import pyarrow.parquet as pq

    from helpers import embeddings
    from helpers.models import load_clip

    model = load_clip("embedded")
    listing = sorted(name_of(i) for i in range(rows))
    with open(workdir / "out.csv", encoding="utf-8", newline="") as handle:
        paths = [row["path"] for row in csv.DictReader(handle)]
    assert paths == listing, "CSV paths are not the sorted listing"
    handle = pq.ParquetFile(workdir / "out.parquet")
    assert handle.metadata.num_rows == rows, handle.metadata.num_rows
    assert str(handle.schema_arrow.field("embedding").type.value_type) == "halffloat"
    info = embeddings.read_info(workdir / "out.parquet")
    assert (info.model_name, info.model_fingerprint) == (model.name, model.fingerprint), info
    written = [p for batch in handle.iter_batches(columns=["path"]) for p in batch["path"].to_pylist()]
    assert written == listing, "embeddings paths are not the sorted listing"


def load() -> str:
    """The load averages (1, 5, 15 min) now."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--old", action="store_true", help="time the row-by-row merge this replaced")
    parser.add_argument("--merge-only", type=Path, help=argparse.SUPPRESS)  # the fresh process
    parser.add_argument("--model", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--header", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge_only:
        result = merge(args.merge_only, args.rows, args.old, args.model, json.loads(args.header))
        print(json.dumps(result))
        return 0

    from helpers import classify
    from helpers.models import load_clip

    model = load_clip("embedded")

    with tempfile.TemporaryDirectory(dir=REPO / "build" if (REPO / "build").is_dir() else None) as tmp:
        workdir = Path(tmp)
        begin = time.perf_counter()
        count = write_shards(workdir / "out.csv.parts", args.rows)
        print(f"wrote {args.rows:,} rows as {count:,} shards in {time.perf_counter() - begin:.1f} s")
        header = json.dumps(classify.csv_header(3))
        command = [sys.executable, __file__, "--rows", str(args.rows), "--merge-only", str(workdir),
                   "--model", model.name, model.fingerprint, "--header", header]  # fmt: skip
        load_before = load()
        done = subprocess.run(
            [*command, *(["--old"] if args.old else [])], check=True, capture_output=True, text=True
        )
        load_after = load()
        result = json.loads(done.stdout.strip().splitlines()[-1])
        counts = result["counts"]
        assert counts["ok"] + counts["error"] == args.rows, counts
        check(workdir, args.rows)
    seconds, peak = result["seconds"], result["peak_mb"]
    cpu = platform.processor() or platform.machine()
    kind = "old, row by row" if args.old else "new"
    print(f"merge ({kind}): CSV + one .parquet embeddings file; {os.cpu_count()} CPUs ({cpu});"
          f" load average before {load_before}, after {load_after};"
          f" the merge used {result['cpu']:.1f} s of CPU (all its threads)")  # fmt: skip
    print(f"{args.rows} rows in {seconds:.1f} s ({args.rows / seconds:,.0f} rows/s), peak RSS {peak:,.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
