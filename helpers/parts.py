"""The result shards of a Ray run (``OUT.parts/``): what they hold, and the sorted outputs merged from them.

``classify --engine ray`` lets the workers write Parquet shards
(:func:`helpers.engines_ray.write_parts`); the driver never holds the rows. This module reads the
shards back with bounded memory::

    found = scan(parts, model.fingerprint)           # the paths already done (for --resume)
    counts, decoders = merge(out, header, parts, sorted_names, old_csv,
                             EmbeddingsTarget("emb.parquet", model.name, model.fingerprint))

:func:`merge` writes the CSV (byte for byte as :class:`csv.DictWriter` would, :func:`csv_lines`)
and the embeddings, sorted by path, one row per path. Underneath is an external sort done
column-wise with pyarrow and numpy (:func:`sorted_merge`, :class:`_Buckets`): each chunk of rows
is sorted by path and cut into bucket files (Arrow IPC) by path range (the ranges cut from the
sorted file list the driver already has), then each bucket is read back and sorted alone. Memory is
a few buckets (:data:`BUCKET_ROWS` rows each), whatever the number of files.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
import queue
import shutil
import threading
import uuid
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from helpers import embeddings

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "EmbeddingsTarget",
    "PartsScan",
    "csv_lines",
    "csv_tables",
    "embedding_tables",
    "merge",
    "merge_csv",
    "parts_dir",
    "scan",
    "shard_files",
    "shard_tables",
    "sorted_merge",
]

RANK = "_source_rank"
"""A column :func:`sorted_merge` adds while sorting: rows of later sources win over earlier ones."""

BUCKET_ROWS = 16_384
"""Listed paths per bucket of :func:`sorted_merge` (its memory: a few buckets of rows)."""


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


def _conform(tables: Sequence[tuple[pa.Table, int]], schema: pa.Schema) -> pa.Table:
    """The ``(table, rank)`` pairs as one table of exactly ``schema``'s columns (missing ones null)
    and the source rank (:data:`RANK`)."""
    import pyarrow as pa

    table = pa.concat_tables([t for t, _ in tables], promote_options="permissive")
    arrays = [
        (table[f.name] if table.schema.field(f.name).type == f.type else table[f.name].cast(f.type))
        if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    ranks = np.repeat([r for _, r in tables], [t.num_rows for t, _ in tables]).astype(np.int32)
    arrays.append(pa.chunked_array([ranks]))
    return pa.Table.from_arrays(arrays, schema=schema.append(pa.field(RANK, pa.int32())))


def _take_list(column: pa.Array, indices: np.ndarray) -> pa.Array:
    """``column.take(indices)`` for a list column whose lists all have one length D (or are null, or
    empty): rows copied as a [rows, D] block with numpy. Arrow's own take of a list column makes an
    index per element (4 GB for 1,000,000 embeddings of 512 values); other list columns still use it."""
    import pyarrow as pa

    offsets = column.offsets.to_numpy()
    offsets = offsets - offsets[0]  # a slice's offsets start where its values start
    lengths = np.diff(offsets)
    width = int(lengths.max(initial=0))
    values = column.values.slice(column.offsets[0].as_py(), int(offsets[-1]))
    if width == 0 or not np.all((lengths == 0) | (lengths == width)) or values.null_count:
        return column.take(pa.array(indices))
    rows = values.to_numpy(zero_copy_only=False).reshape(-1, width)
    picked = lengths[indices] == width
    block = rows[offsets[:-1][indices][picked] // width]
    new_offsets = np.zeros(len(indices) + 1, dtype=np.int32)
    np.cumsum(np.where(picked, width, 0), out=new_offsets[1:])
    valid = column.is_valid().to_numpy(zero_copy_only=False)[indices]
    mask = None if valid.all() else pa.array(~valid)
    array = pa.ListArray.from_arrays(
        pa.array(new_offsets), pa.array(block.reshape(-1), type=values.type), mask=mask
    )
    return array.cast(column.type)


def _take(table: pa.Table, indices: np.ndarray) -> pa.Table:
    """``table.take(indices)``, list columns by :func:`_take_list`."""
    import pyarrow as pa

    columns = []
    for column in table.columns:
        if pa.types.is_list(column.type):
            columns.append(_take_list(column.combine_chunks(), indices))
        else:
            columns.append(column.take(pa.array(indices)))
    return pa.Table.from_arrays(columns, schema=table.schema)


class _Buckets:
    """The scatter half of :func:`sorted_merge`: rows added by source rank go to bucket files by path
    range, a chunk at a time; :meth:`sorted` then reads each bucket back and sorts it alone."""

    def __init__(
        self,
        schema: pa.Schema,
        sorted_names: Sequence[str],
        workdir: Path,
        bucket_rows: int | None = None,
        max_buckets: int = 1000,
    ) -> None:
        import pyarrow as pa

        bucket_rows = BUCKET_ROWS if bucket_rows is None else bucket_rows
        if bucket_rows < 1 or max_buckets < 1:
            raise ValueError("bucket_rows and max_buckets must be at least 1")
        self.schema = schema
        self.step = max(bucket_rows, -(-len(sorted_names) // max_buckets))
        self.cuts = list(sorted_names[self.step :: self.step])
        self.ranked = schema.append(pa.field(RANK, pa.int32()))
        self.workdir = workdir
        self.pending: list[tuple[pa.Table, int]] = []
        self.pending_rows = 0
        self.writers: dict[int, tuple[pa.NativeFile, pa.ipc.RecordBatchFileWriter]] = {}
        workdir.mkdir(parents=True, exist_ok=True)

    def add(self, table: pa.Table, rank: int) -> None:
        """Add the rows of ``table`` (``schema``'s columns it lacks are null) from source ``rank``."""
        if table.num_rows == 0:
            return
        self.pending.append((table.select([n for n in self.schema.names if n in table.column_names]), rank))
        self.pending_rows += table.num_rows
        if self.pending_rows >= self.step:
            self._flush()

    def _flush(self) -> None:
        """Write the pending rows to their buckets: sorted by path (a stable sort, so rows of one path
        keep their order), then cut where the bucket ranges start."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if not self.pending:
            return
        table = _conform(self.pending, self.schema)
        self.pending, self.pending_rows = [], 0
        table = _take(table, pc.sort_indices(table["path"]).to_numpy())
        paths, n = table["path"], table.num_rows
        bounds, low, last = [0], 0, paths[n - 1].as_py()
        for cut in self.cuts:  # bisect_left of each cut in the sorted paths (the cuts ascend)
            high = n
            if cut > last:
                low = n
            while low < high:
                middle = (low + high) // 2
                if paths[middle].as_py() < cut:
                    low = middle + 1
                else:
                    high = middle
            bounds.append(low)
        bounds.append(n)
        for bucket, (begin, end) in enumerate(itertools.pairwise(bounds)):
            if begin == end:
                continue
            if bucket not in self.writers:
                sink = pa.OSFile(str(self._path(bucket)), "wb")
                self.writers[bucket] = (sink, pa.ipc.new_file(sink, self.ranked))
            self.writers[bucket][1].write_table(table.slice(begin, end - begin))

    def _path(self, bucket: int) -> Path:
        return self.workdir / f"bucket-{bucket:06d}.arrow"

    def sorted(self) -> Iterator[pa.Table]:
        """Each bucket in path order, sorted by path, each path once (its row of the highest rank,
        the first added among those); the bucket files are removed as they are read."""
        import pyarrow as pa
        import pyarrow.compute as pc

        self._flush()
        for sink, writer in self.writers.values():
            writer.close()
            sink.close()
        for bucket in sorted(self.writers):
            path = self._path(bucket)
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
                order = pc.sort_indices(table, sort_keys=[("path", "ascending"), (RANK, "descending")])
                paths = table["path"].take(order)
                first = np.ones(len(paths), dtype=bool)
                if len(paths) > 1:
                    first[1:] = pc.not_equal(paths[1:], paths[:-1]).to_numpy(zero_copy_only=False)
                table = _take(table, order.to_numpy()[first]).drop_columns([RANK])
            path.unlink()
            yield table

    def close(self) -> None:
        """Close the bucket files and remove ``workdir``."""
        for sink, writer in self.writers.values():
            if not sink.closed:
                writer.close()
                sink.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def sorted_merge(
    sources: Sequence[Iterable[pa.Table]],
    schema: pa.Schema,
    sorted_names: Sequence[str],
    workdir: Path,
    bucket_rows: int | None = None,
    max_buckets: int = 1000,
) -> Iterator[pa.Table]:
    """The rows of all ``sources``, sorted by ``path``, each path once, as one table per bucket.

    When a path comes from several sources, the row of the later source wins (within one source,
    the first). ``sorted_names``: the sorted paths expected (the listing), used only to cut the
    buckets (rows with other paths are kept too): ``bucket_rows`` names each (default
    :data:`BUCKET_ROWS`), more when that would make over ``max_buckets`` buckets (the files open
    while sorting). The rows go to the bucket files (Arrow IPC, in ``workdir``, removed afterwards)
    a chunk at a time, then each bucket is read back and sorted alone, all column-wise in Arrow and
    numpy. Memory: a few buckets.
    """
    buckets = _Buckets(schema, sorted_names, workdir, bucket_rows, max_buckets)
    try:
        for rank, source in enumerate(sources):
            for table in source:
                buckets.add(table, rank)
        yield from buckets.sorted()
    finally:
        buckets.close()


# ---------------------------------------------------------------- the outputs: the CSV and the embeddings


def csv_tables(out: Path, header: Sequence[str], chunk_rows: int = 8192) -> Iterator[pa.Table]:
    """The complete rows (status ``ok``/``error``) of an existing CSV, as string tables of ≤ ``chunk_rows``"""
    import pyarrow as pa

    schema = pa.schema([pa.field(c, pa.string()) for c in header])
    with open(out, encoding="utf-8", newline="") as handle:
        chunk: list[dict[str, str]] = []
        for row in csv.DictReader(handle):
            if row.get("status") in {"ok", "error"}:
                chunk.append({c: row.get(c) or "" for c in header})
            if len(chunk) >= chunk_rows:
                yield pa.Table.from_pylist(chunk, schema=schema)
                chunk = []
        if chunk:
            yield pa.Table.from_pylist(chunk, schema=schema)


def csv_lines(table: pa.Table, header: Sequence[str]) -> pa.Array:
    """The CSV lines of ``table``'s ``header`` columns, byte for byte as :class:`csv.DictWriter` writes them.

    The default dialect: a field is quoted when it holds ``,``, ``"``, ``\\r`` or ``\\n`` (a ``"``
    inside doubled), a null is an empty field, each line ends in ``\\r\\n``. Computed column-wise in
    Arrow, not row by row.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    fields = []
    for name in header:
        column = pc.fill_null(table[name].cast(pa.string()), "") if name in table.column_names else None
        if column is None:
            column = pa.array([""] * table.num_rows, pa.string())
        quoted = pc.binary_join_element_wise('"', pc.replace_substring(column, '"', '""'), '"', "")
        fields.append(pc.if_else(pc.match_substring_regex(column, '[,"\r\n]'), quoted, column))
    lines = pc.binary_join_element_wise(pc.binary_join_element_wise(*fields, ","), "\r\n", "")
    return lines.combine_chunks() if isinstance(lines, pa.ChunkedArray) else lines


def _write_lines(handle, lines: pa.Array) -> None:
    """Write the characters of a string array (its value buffer) to a binary ``handle``."""
    if len(lines) == 0:
        return
    width = np.int64 if lines.type == "large_string" else np.int32
    offsets = np.frombuffer(lines.buffers()[1], dtype=width)[lines.offset : lines.offset + len(lines) + 1]
    handle.write(memoryview(lines.buffers()[2])[int(offsets[0]) : int(offsets[-1])])


def _write_csv(
    tmp: Path, header: Sequence[str], tables: Iterable[pa.Table]
) -> tuple[dict[str, int], Counter[str]]:
    """Write the header and the rows of ``tables`` to ``tmp``; returns the counts of :func:`merge`."""
    import pyarrow.compute as pc

    counts = {"ok": 0, "error": 0}
    decoders: Counter[str] = Counter()
    with open(tmp, "wb") as handle:
        line = io.StringIO()
        csv.writer(line).writerow(header)
        handle.write(line.getvalue().encode("utf-8"))
        for table in tables:
            for value in pc.value_counts(table["status"]).to_pylist():
                counts[value["values"]] += value["counts"]
            for value in pc.value_counts(table["decoder"]).to_pylist():
                if value["values"]:
                    decoders[value["values"]] += value["counts"]
            _write_lines(handle, csv_lines(table, header))
    return counts, decoders


def _write_embeddings(to: EmbeddingsTarget, tables: Iterable[pa.Table]) -> None:
    """Write the sorted ``tables`` to ``to.target``: one ``.parquet`` file, or a directory of shards
    (one per table; the shards it held before are removed after)."""
    if to.target.endswith(".parquet"):
        with embeddings.EmbeddingsWriter(to.target, to.model_name, to.model_fingerprint) as writer:
            for table in tables:
                writer.write_table(table)
        return
    filesystem, inner = embeddings.filesystem_of(to.target)
    filesystem.create_dir(inner, recursive=True)
    before = embeddings.files_of(to.target)[1] if to.old or _has_parquet(to.target) else []
    run = uuid.uuid4().hex[:8]
    for i, table in enumerate(tables):
        with embeddings.EmbeddingsWriter(
            f"{to.target.rstrip('/')}/part-{i:05d}-{run}.parquet", to.model_name, to.model_fingerprint
        ) as writer:
            writer.write_table(table)
    for path in before:
        filesystem.delete_file(path)


def _read_ahead(shards: Path, columns: Sequence[str], window: int = 4) -> Iterator[pa.Table]:
    """The ``columns`` each shard has, shard by shard in name order, read by two threads at most
    ``window`` shards ahead of the caller (a Ray shard is one block: a few MB)."""
    import pyarrow.parquet as pq

    def read(path: Path) -> pa.Table:
        handle = pq.ParquetFile(path, pre_buffer=True)
        names = handle.schema_arrow.names
        return handle.read(columns=[c for c in columns if c in names], use_threads=False)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="read-shards") as pool:
        ahead: deque[Future[pa.Table]] = deque()
        for shard in shard_files(shards):
            ahead.append(pool.submit(read, shard))
            if len(ahead) >= window:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def merge_csv(
    out: Path, header: Sequence[str], shards: Path, listing: Sequence[str], old_csv: bool
) -> tuple[dict[str, int], Counter[str]]:
    """:func:`merge` without embeddings."""
    return merge(out, header, shards, listing, old_csv)


@dataclass(frozen=True)
class EmbeddingsTarget:
    """Where :func:`merge` writes the embeddings (``--embeddings``) and of which model."""

    target: str
    """A ``.parquet`` file, else a directory of shards (local path or URI)."""
    model_name: str
    model_fingerprint: str
    old: bool = False
    """Keep the rows ``target`` already holds (``--resume``); the shards' rows win."""


def merge(
    out: Path,
    header: Sequence[str],
    shards: Path,
    listing: Sequence[str],
    old_csv: bool,
    embeddings_to: EmbeddingsTarget | None = None,
) -> tuple[dict[str, int], Counter[str]]:
    """Write the outputs of a Ray run from its shards: the CSV ``out`` and, with ``embeddings_to``,
    the embeddings, both sorted by path with one row per path.

    The rows of the old CSV (``old_csv``: its complete rows) and of the old embeddings
    (``embeddings_to.old``) come first; a shard's row of the same path replaces them. Every shard
    is read once for both outputs (two threads read ahead), and the embeddings are scattered,
    sorted and written in a thread of their own while the CSV is in the caller's (:class:`_Buckets`;
    Arrow, numpy and Parquet release the GIL for most of the work). The embeddings are in place
    before the CSV replaces ``out``; when either fails, ``out`` is left as it was. ``listing``: the
    sorted paths of the run. Returns the counts by status and the counts of the shards' ``decoder``
    values (empty ones left out; :func:`helpers.engines_ray.count_decoder` reads them).
    """
    import pyarrow as pa

    csv_schema = pa.schema([pa.field(c, pa.string()) for c in [*header, "decoder"]])
    rows = _Buckets(csv_schema, listing, shards / "_merge")
    vectors = thread = None
    feed: queue.Queue[list[pa.Table] | None] = queue.Queue(maxsize=4)  # shards read, for the embeddings
    abort = threading.Event()
    failures: list[BaseException] = []
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")

    def embed() -> None:  # the embeddings' own thread: scatter what the feed brings, sort, write
        fed = False
        try:
            for table in embedding_tables(embeddings_to.target) if embeddings_to.old else ():
                vectors.add(table, 0)
            while (tables := feed.get()) is not None:
                for table in tables:
                    vectors.add(table, 1)
            fed = True
            if not abort.is_set():
                _write_embeddings(embeddings_to, vectors.sorted())
        except BaseException as err:  # re-raised in the caller's thread
            failures.append(err)
            while not fed:  # let the reader finish
                fed = feed.get() is None

    try:
        if embeddings_to is not None:
            schema = embeddings.schema(embeddings_to.model_name, embeddings_to.model_fingerprint)
            vectors = _Buckets(schema, listing, shards / "_merge_embeddings")
            thread = threading.Thread(target=embed, name="merge-embeddings")
            thread.start()
        try:
            for table in csv_tables(out, header) if old_csv else ():
                rows.add(table, 0)
            columns = [*csv_schema.names, *(["embedding"] if vectors is not None else [])]
            batch: list[pa.Table] = []
            for table in _read_ahead(shards, columns):
                rows.add(table, 1)
                if vectors is not None and "embedding" in table.column_names and not failures:
                    batch.append(table)
                    if sum(t.num_rows for t in batch) >= 8192:  # few hand-overs between the threads
                        feed.put(batch)
                        batch = []
            if batch and not failures:
                feed.put(batch)
            counts = _write_csv(tmp, header, rows.sorted())
        except BaseException:
            abort.set()
            raise
        finally:
            if thread is not None:
                feed.put(None)
                thread.join()
        if failures:
            raise failures[0]
        os.replace(tmp, out)
    finally:
        rows.close()
        if vectors is not None:
            vectors.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return counts


def embedding_tables(target: str, chunk_rows: int = 32_768) -> Iterator[pa.Table]:
    """The rows of an existing embeddings file or directory, chunk by chunk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, files = embeddings.files_of(target)
    for inner in files:
        with filesystem.open_input_file(inner) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(
                batch_size=chunk_rows, columns=["path", "status", "embedding"]
            ):
                yield pa.Table.from_batches([batch])


def _has_parquet(target: str) -> bool:
    try:
        embeddings.files_of(target)
    except FileNotFoundError:
        return False
    return True
