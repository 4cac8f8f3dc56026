"""The result shards of a Ray run (``OUT.parts/``): what they hold, and one sorted output merged from them.

``classify --engine ray`` lets the workers write Parquet shards
(:func:`helpers.engines_ray.write_parts`); the driver never holds the rows. This module reads the
shards back with bounded memory::

    found = scan(parts, model.fingerprint)           # the paths already done (for --resume)
    for table in sorted_merge([old_rows, shard_tables(parts, columns)], schema, sorted_names, tmp):
        ...                                           # sorted by path, each path once

:func:`sorted_merge` is an external sort: rows go to bucket files by path range (the ranges cut
from the sorted file list the driver already has), then each bucket is sorted alone. Memory is one
bucket (``bucket_rows`` rows), whatever the number of files.
"""

from __future__ import annotations

import bisect
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from helpers import embeddings

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["PartsScan", "parts_dir", "scan", "shard_files", "shard_tables", "sorted_merge"]

RANK = "_source_rank"
"""A column :func:`sorted_merge` adds while sorting: rows of later sources win over earlier ones."""


def parts_dir(out: str | Path) -> Path:
    """Where the shards of ``out`` go: ``results.csv`` → ``results.csv.parts/``."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def shard_files(parts: Path) -> list[Path]:
    """The ``*.parquet`` shards in ``parts`` (none when it does not exist), in name order."""
    return sorted(parts.glob("*.parquet")) if parts.is_dir() else []


@dataclass
class PartsScan:
    """What the shards of a folder hold (:func:`scan`)."""

    done: set[str] = field(default_factory=set)
    """Paths with a row in some shard."""
    with_embeddings: set[str] = field(default_factory=set)
    """Paths with a row in a shard that has the ``embedding`` column."""
    removed: list[Path] = field(default_factory=list)
    """Shards that could not be read (cut short when a run was killed): deleted, their files redone."""


def scan(parts: Path, model_fingerprint: str) -> PartsScan:
    """Read the ``path`` column of every shard in ``parts``.

    A shard made by another model raises :class:`helpers.embeddings.ModelMismatchError`; one that
    cannot be read (a write cut short by a killed run: no Parquet footer) is deleted and listed in
    ``removed`` — its rows were never complete, and its files are simply done again.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = PartsScan()
    for shard in shard_files(parts):
        try:
            info = embeddings.read_info(shard)
            table = pq.read_table(shard, columns=["path"])
            has_embedding = "embedding" in pq.read_schema(shard).names
        except (OSError, pa.ArrowException, ValueError):
            shard.unlink()
            found.removed.append(shard)
            continue
        if info.model_fingerprint != model_fingerprint:
            raise embeddings.ModelMismatchError(
                f"{shard} は別のモデル ({info.model_name}, {info.model_fingerprint}) の結果です"
            )
        paths = table["path"].to_pylist()
        found.done.update(paths)
        if has_embedding:
            found.with_embeddings.update(paths)
    return found


def shard_tables(parts: Path, columns: Sequence[str], require: Sequence[str] = (), batch_rows: int = 8192):
    """The ``columns`` of every shard that has all of ``require``, as tables of ≤ ``batch_rows`` rows.

    A column a shard lacks comes back as nulls (a shard of a run without embeddings, say).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    for shard in shard_files(parts):
        handle = pq.ParquetFile(shard)
        names = handle.schema_arrow.names
        if not all(c in names for c in require):
            continue
        present = [c for c in columns if c in names]
        for batch in handle.iter_batches(batch_size=batch_rows, columns=present):
            yield pa.Table.from_batches([batch])


def _conform(table: pa.Table, schema: pa.Schema, rank: int) -> pa.Table:
    """``table`` with exactly ``schema``'s columns (missing ones null) and the source rank."""
    import pyarrow as pa

    arrays = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    arrays.append(pa.array(np.full(table.num_rows, rank, dtype=np.int32)))
    return pa.Table.from_arrays(arrays, schema=schema.append(pa.field(RANK, pa.int32())))


def sorted_merge(
    sources: Sequence[Iterable[pa.Table]],
    schema: pa.Schema,
    sorted_names: Sequence[str],
    workdir: Path,
    bucket_rows: int = 8192,
) -> Iterator[pa.Table]:
    """The rows of all ``sources``, sorted by ``path``, each path once, as one table per bucket.

    When a path comes from several sources, the row of the later source wins (within one source,
    the first). ``sorted_names``: the sorted paths expected (the listing), used only to cut the
    buckets (rows with other paths are kept too). ``workdir`` holds the bucket files while merging
    and is removed afterwards. Memory: about one bucket.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if bucket_rows < 1:
        raise ValueError("bucket_rows must be at least 1")
    cuts = list(sorted_names[bucket_rows::bucket_rows])
    workdir.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for rank, source in enumerate(sources):
            for table in source:
                if table.num_rows == 0:
                    continue
                table = _conform(table, schema, rank)
                buckets = np.array([bisect.bisect_right(cuts, p) for p in table["path"].to_pylist()])
                for bucket in np.unique(buckets):
                    part = table.filter(buckets == bucket)
                    if int(bucket) not in writers:
                        writers[int(bucket)] = pq.ParquetWriter(
                            workdir / f"bucket-{bucket:06d}.parquet", part.schema
                        )
                    writers[int(bucket)].write_table(part)
        for writer in writers.values():
            writer.close()
        for bucket in sorted(writers):
            path = workdir / f"bucket-{bucket:06d}.parquet"
            table = pq.read_table(path)
            path.unlink()
            # Stable sort: by path, then later sources first; keep the first row of each path.
            order = pc.sort_indices(table, sort_keys=[("path", "ascending"), (RANK, "descending")])
            table = table.take(order)
            paths = table["path"].to_numpy(zero_copy_only=False)
            first = np.ones(len(paths), dtype=bool)
            first[1:] = paths[1:] != paths[:-1]
            yield table.filter(first).drop_columns([RANK])
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(workdir, ignore_errors=True)
