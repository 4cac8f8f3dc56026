"""How fast the old driver path and the new worker-side path absorb results (no model, synthetic rows).

Not collected by pytest, never run by CI. From the repository root::

    .venv/bin/python tests/verify/measure_absorb_rate.py [--rows 100000] [--cpus 2]

A Ray Data map emits precomputed rows at full speed: what the encoder actor emits (index, ok,
error, decoder, fingerprint, pid, name and a 512-d L2-normalised float32 embedding), 1 in 50 an
error. Then, in embedded Ray with ``--cpus`` CPUs:

- **old** (what ``classify --engine ray`` did before): the driver iterates the batches
  (``iter_batches``), restores input order (``engines.InputOrder``), makes ``Record`` s, formats
  each CSV row (``classify._row``: top-3 of 3 labels by the model's scoring rule), writes it, and
  writes the embeddings (``embeddings.EmbeddingsWriter``);
- **new, workers**: ``engines_ray.to_part_rows`` (labels by ``classify.Labeller``) and Ray Data's
  ``write_parquet`` run in the workers; the driver only waits;
- **new, merge**: at the end the driver merges the shards into the sorted CSV and embeddings file
  (``helpers.parts.merge``), once; ``tests/verify/measure_merge.py`` times that step alone at scale.

Rates are rows/s over the whole stage (Ray started beforehand; the source map included). On a
cluster the worker stage grows with the CPUs; the old path stays one Python process.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DIM = 512


def emit(batch, fingerprint: str, table):
    """The encoder's output for a batch of ids, from a precomputed table of embeddings."""
    import numpy as np
    import ray

    table = ray.get(table) if isinstance(table, ray.ObjectRef) else table
    ids = np.asarray(batch["id"], dtype=np.int64)
    n = len(ids)
    ok = ids % 50 != 0
    return {
        "index": ids,
        "ok": ok,
        "error": np.array(["" if good else "壊れているか読めない画像です" for good in ok], dtype=object),
        "decoder": np.array([""] * n, dtype=object),
        "embedding": table[ids % len(table)],
        "fingerprint": np.array([fingerprint] * n, dtype=object),
        "pid": np.full(n, os.getpid(), dtype=np.int64),
        "name": np.array([f"dir{i % 97:02d}/img{i:08d}.jpg" for i in ids], dtype=object),
    }


def main() -> int:
    import numpy as np
    import ray
    import ray.data
    import torch

    from helpers import classify, embeddings, engines, engines_ray, parts
    from helpers.models import load_clip

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()

    model = load_clip("embedded")  # its scoring rule only; no image is encoded
    labels = ["犬", "猫", "象"]
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((4096, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    classifier = rng.standard_normal((len(labels), DIM)).astype(np.float32)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    settings = classify.RunSettings(labels, ["{}"], model.name, model.fingerprint, model.scoring.kind, 3)
    labeller = classify.Labeller(tuple(labels), classifier, model.scoring, 3)
    header = classify.csv_header(3)

    session = engines_ray.start(num_cpus=args.cpus)
    table_ref = ray.put(vectors)
    results = []
    try:

        def source():
            blocks = max(1, args.rows // args.batch)
            return ray.data.range(args.rows, override_num_blocks=blocks).map_batches(
                emit, fn_kwargs={"fingerprint": model.fingerprint, "table": table_ref},
                batch_size=args.batch, batch_format="numpy",
            )  # fmt: skip

        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            # ---- old: everything through the driver
            begin = time.perf_counter()
            order = engines.InputOrder(args.rows, on_duplicate="count")
            torch_classifier = torch.from_numpy(classifier)
            with (
                open(tmp / "old.csv", "w", encoding="utf-8", newline="") as handle,
                embeddings.EmbeddingsWriter(tmp / "old.parquet", model.name, model.fingerprint) as writer,
            ):
                rows = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
                rows.writeheader()
                for batch in source().iter_batches(batch_size=None, batch_format="numpy"):
                    engines_ray.check_fingerprints(batch["fingerprint"], model)
                    names = {}
                    for index, ok, error, embedding, name in zip(
                        batch["index"],
                        batch["ok"],
                        batch["error"],
                        batch["embedding"],
                        batch["name"],
                        strict=True,
                    ):
                        index = int(index)
                        names[index] = str(name)
                        status = "ok" if ok else "error"
                        vector = torch.from_numpy(np.array(embedding)) if ok else None
                        order.add(index, engines.Record(index, Path(str(name)), status, vector, str(error)))
                    ready = order.ready()
                    for record in ready:
                        rows.writerow(
                            classify._row(str(record.path), record, torch_classifier, settings, model)
                        )
                    writer.write(ready, [str(r.path) for r in ready])
            old_s = time.perf_counter() - begin
            results.append(("old: driver receives, reorders, labels and writes every row", old_s))

            # ---- new: workers write shards
            shards = tmp / "new.csv.parts"
            schema = engines_ray.parts_schema(
                model.name, model.fingerprint, labeller.columns, with_embeddings=True
            )
            options = embeddings.parquet_options(schema.names)  # as engines_ray.write_parts
            begin = time.perf_counter()
            source().map_batches(
                engines_ray.to_part_rows,
                fn_kwargs={"model_name": model.name, "model_fingerprint": model.fingerprint,
                           "formatter": labeller, "schema": schema},
                batch_size=None, batch_format="numpy",
            ).write_parquet(str(shards), schema=schema, **options)  # fmt: skip
            new_s = time.perf_counter() - begin
            results.append(("new, workers: labels + Parquet shards written by Ray Data", new_s))

            # ---- new: the driver's one streaming merge at the end
            names = sorted(f"dir{i % 97:02d}/img{i:08d}.jpg" for i in range(args.rows))
            begin = time.perf_counter()
            to = parts.EmbeddingsTarget(str(tmp / "new.parquet"), model.name, model.fingerprint)
            counts, _ = parts.merge(tmp / "new.csv", header, shards, names, False, to)
            merge_s = time.perf_counter() - begin
            results.append(
                ("new, merge: sorted CSV + embeddings file from the shards (driver, once)", merge_s)
            )
            assert counts["ok"] + counts["error"] == args.rows, counts
            shutil.rmtree(shards, ignore_errors=True)
    finally:
        session.close()

    cpu = platform.processor() or platform.machine()
    print(f"\n{args.rows:,} synthetic rows ({DIM}-d float32 embeddings, batch {args.batch}); embedded Ray,"
          f" {args.cpus} CPUs of {os.cpu_count()} ({cpu}); one run each\n")  # fmt: skip
    print("| path | seconds | rows/s |")
    print("| --- | ---: | ---: |")
    for name, seconds in results:
        print(f"| {name} | {seconds:.1f} | {args.rows / seconds:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
