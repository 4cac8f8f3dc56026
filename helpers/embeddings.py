"""Image embeddings in a Parquet file, ready to search: the format every engine writes.

Columns (one row per input file):

- ``path``: the file's path relative to the image folder, ``/`` separators;
- ``status``: ``"ok"`` or ``"error"``;
- ``embedding``: the L2-normalised image embedding as a list of float16 (null for errors).

File metadata: ``model_name`` (what :func:`helpers.models.load_clip` loads) and
``model_fingerprint`` (:attr:`helpers.models.ClipModel.fingerprint`, a hash of config + weights),
so a reader can refuse to compare embeddings made by another model. Paths may be local or any
URI pyarrow understands (``s3://bucket/emb.parquet``), and every reader also takes a **directory of
Parquet shards** (what ``classify --engine ray --embeddings DIR`` writes): its ``*.parquet`` files,
in name order, all from one model::

    with EmbeddingsWriter("emb.parquet", model.name, model.fingerprint, root=folder) as writer:
        for records in engines.iter_embeddings(model, paths):
            writer.write(records)
    info = read_info("emb.parquet")                    # model_name, model_fingerprint, rows
    for paths, vectors in iter_chunks("emb.parquet"):  # ok rows only, float32 [n, D]
        ...
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import pyarrow as pa

    from helpers.engines import Record

__all__ = [
    "EmbeddingsInfo",
    "EmbeddingsWriter",
    "ModelMismatchError",
    "embedding_array",
    "files_of",
    "filesystem_of",
    "iter_chunks",
    "paths_with_embeddings",
    "read_embeddings",
    "read_info",
    "schema",
    "write_embeddings",
]

MODEL_NAME_KEY = "model_name"
MODEL_FINGERPRINT_KEY = "model_fingerprint"


class ModelMismatchError(ValueError):
    """Embeddings made by one model compared with, or added to, those of another."""


def schema(model_name: str, model_fingerprint: str) -> pa.Schema:
    """The Arrow schema of an embeddings file, with its model metadata."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("path", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.field("element", pa.float16()))),
        ],
        metadata={MODEL_NAME_KEY: model_name, MODEL_FINGERPRINT_KEY: model_fingerprint},
    )


def parquet_options(names: Sequence[str]) -> dict[str, object]:
    """Parquet writer options for a table with the columns ``names``, an ``embedding`` among them.

    The embedding column is written plain: no dictionary, no compression, no statistics (random
    float16 values hardly compress; with pyarrow's defaults a 100-row shard takes about 3.5 times as
    long to write and 5 times as long to read). The other columns keep the defaults (dictionary, snappy).
    """
    others = [name for name in names if name != "embedding"]
    return {
        "use_dictionary": others,
        "write_statistics": others,
        "compression": {name: "none" if name == "embedding" else "snappy" for name in names},
    }


def filesystem_of(where: str | Path):
    """(pyarrow filesystem, path inside it) for a local path or a URI."""
    import pyarrow.fs

    text = str(where)
    if "://" in text:
        return pyarrow.fs.FileSystem.from_uri(text)
    return pyarrow.fs.LocalFileSystem(), str(Path(text).resolve())


def files_of(where: str | Path) -> tuple[object, list[str]]:
    """(pyarrow filesystem, Parquet files): ``where`` itself, or the ``*.parquet`` files of a directory.

    Raises ``FileNotFoundError`` when ``where`` does not exist or is a directory without Parquet files.
    """
    import pyarrow.fs

    filesystem, inner = filesystem_of(where)
    kind = filesystem.get_file_info(inner).type
    if kind == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(str(where))
    if kind != pyarrow.fs.FileType.Directory:
        return filesystem, [inner]
    found = filesystem.get_file_info(pyarrow.fs.FileSelector(inner, recursive=False))
    files = sorted(
        f.path for f in found if f.type == pyarrow.fs.FileType.File and f.path.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(f"{where} (Parquet ファイルのないフォルダー)")
    return filesystem, files


def embedding_array(vectors: np.ndarray, ok: np.ndarray) -> pa.Array:
    """The ``embedding`` column for ``vectors`` [n, D]: float16 lists, null where ``ok`` is False."""
    import pyarrow as pa

    ok = np.asarray(ok, dtype=bool)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    offsets = np.zeros(len(ok) + 1, dtype=np.int32)
    np.cumsum(np.where(ok, dim, 0), out=offsets[1:])
    values = np.ascontiguousarray(vectors[ok], dtype=np.float16).reshape(-1)
    mask = pa.array(~ok, type=pa.bool_())
    array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=pa.float16()), mask=mask)
    return array.cast(pa.list_(pa.field("element", pa.float16())))


def _table(rows: Sequence[tuple[str, str, np.ndarray | None]], target: pa.Schema) -> pa.Table:
    """A table of ``(path, status, embedding or None)`` rows."""
    import pyarrow as pa

    ok = np.array([e is not None for _, _, e in rows], dtype=bool)
    dim = next((len(e) for _, _, e in rows if e is not None), 0)
    vectors = np.zeros((len(rows), dim), dtype=np.float16)
    for i, (_, _, e) in enumerate(rows):
        if e is not None:
            vectors[i] = e
    embedding = embedding_array(vectors, ok)
    return pa.Table.from_arrays(
        [pa.array([p for p, _, _ in rows], pa.string()), pa.array([s for _, s, _ in rows], pa.string()),
         embedding.cast(target.field("embedding").type)],
        schema=target,
    )  # fmt: skip


class EmbeddingsWriter:
    """Write Records to a Parquet embeddings file batch by batch (use it as a context manager).

    Rows go to a temporary file next to ``out`` as they come; :meth:`close` moves it into place,
    so an interrupted run never leaves a half-written ``out``. ``path`` is each record's path
    relative to ``root`` (``/`` separators) or as given when ``root`` is None, unless
    :meth:`write` gets the paths. ``carry_over``: paths whose rows an existing ``out`` already
    holds and this run does not redo (``--resume``): they are kept, and the file comes out
    sorted by path. An existing ``out`` made by another model raises :class:`ModelMismatchError`.
    """

    def __init__(
        self,
        out: str | Path,
        model_name: str,
        model_fingerprint: str,
        root: str | Path | None = None,
        carry_over: Collection[str] = (),
    ) -> None:
        import pyarrow.parquet as pq

        self.out = str(out)
        self.root = Path(root) if root is not None else None
        self.schema = schema(model_name, model_fingerprint)
        self.carry_over = set(carry_over)
        self.rows = 0
        if self.carry_over:
            info = read_info(self.out)
            if info.model_fingerprint != model_fingerprint:
                raise ModelMismatchError(
                    f"{self.out} の埋め込みは別のモデル ({info.model_name}, {info.model_fingerprint}) で"
                    f"作られています (今回 {model_name}, {model_fingerprint})"
                )
        self._fs, inner = filesystem_of(self.out)
        self._final = inner
        self._tmp = f"{inner}.{uuid.uuid4().hex[:8]}.tmp"
        if "://" not in self.out:
            Path(inner).parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            self._tmp, self.schema, filesystem=self._fs, **parquet_options(self.schema.names)
        )

    def _relative(self, path: Path) -> str:
        if self.root is not None:
            try:
                return Path(path).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return Path(path).as_posix()

    def write(self, records: Iterable[Record], paths: Sequence[str] | None = None) -> None:
        """Append rows for ``records`` (``paths``: their relative paths, else from ``root``)."""
        records = list(records)
        if not records:
            return
        names = list(paths) if paths is not None else [self._relative(r.path) for r in records]
        rows = []
        for name, record in zip(names, records, strict=True):
            ok = record.status == "ok" and record.embedding is not None
            vector = record.embedding.detach().float().cpu().numpy() if ok else None
            rows.append((name, "ok" if ok else "error", vector))
        self._writer.write_table(_table(rows, self.schema))
        self.rows += len(rows)

    def write_table(self, table: pa.Table) -> None:
        """Append the rows of a ``path, status, embedding`` table (e.g. merged from shards)."""
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))
        self.rows += table.num_rows

    def close(self) -> str:
        """Finish the file and move it to ``out`` (merging carried-over rows); returns ``out``."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if self._writer is None:
            return self.out
        self._writer.close()
        self._writer = None
        if self.carry_over:
            new = pq.read_table(self._tmp, filesystem=self._fs)
            old = pq.read_table(self._final, filesystem=self._fs).cast(self.schema)
            keep = pc.and_(
                pc.is_in(old["path"], pa.array(sorted(self.carry_over))),
                pc.invert(pc.is_in(old["path"], new["path"])),
            )
            merged = pa.concat_tables([old.filter(keep), new.cast(self.schema)]).sort_by("path")
            pq.write_table(
                merged.replace_schema_metadata(self.schema.metadata),
                self._tmp,
                filesystem=self._fs,
                **parquet_options(self.schema.names),
            )
            self.rows = merged.num_rows
        self._fs.move(self._tmp, self._final)
        return self.out

    def abort(self) -> None:
        """Drop what was written; ``out`` stays as it was."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        with contextlib.suppress(OSError):  # FileNotFoundError among them
            self._fs.delete_file(self._tmp)

    def __enter__(self) -> EmbeddingsWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_embeddings(
    out: str | Path,
    records: Iterable[Record],
    model_name: str,
    model_fingerprint: str,
    root: str | Path | None = None,
) -> str:
    """Write all ``records`` to ``out`` in one go (see :class:`EmbeddingsWriter`); returns ``out``."""
    with EmbeddingsWriter(out, model_name, model_fingerprint, root) as writer:
        writer.write(records)
    return str(out)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class EmbeddingsInfo:
    """What an embeddings file says about itself."""

    model_name: str
    model_fingerprint: str
    rows: int


def _info_of(filesystem, inner: str, shown: str | Path) -> EmbeddingsInfo:
    import pyarrow.parquet as pq

    with filesystem.open_input_file(inner) as handle:
        parquet = pq.ParquetFile(handle)
        metadata = parquet.schema_arrow.metadata or {}
        rows = parquet.metadata.num_rows
    try:
        name = metadata[MODEL_NAME_KEY.encode()].decode()
        fingerprint = metadata[MODEL_FINGERPRINT_KEY.encode()].decode()
    except KeyError:
        raise ValueError(
            f"{shown} は埋め込みファイルではありません (model_name/model_fingerprint がない)"
        ) from None
    return EmbeddingsInfo(name, fingerprint, rows)


def read_info(path: str | Path) -> EmbeddingsInfo:
    """The model metadata and row count of an embeddings file or directory (reads footers only).

    Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for a Parquet file without
    the model metadata, and :class:`ModelMismatchError` for a directory whose shards come from
    different models.
    """
    filesystem, files = files_of(path)
    infos = [_info_of(filesystem, inner, inner if len(files) > 1 else path) for inner in files]
    fingerprints = {info.model_fingerprint for info in infos}
    if len(fingerprints) > 1:
        raise ModelMismatchError(f"{path} のシャードが別々のモデルで作られています: {sorted(fingerprints)}")
    return EmbeddingsInfo(infos[0].model_name, infos[0].model_fingerprint, sum(i.rows for i in infos))


def iter_chunks(path: str | Path, chunk_rows: int = 65_536) -> Iterator[tuple[list[str], torch.Tensor]]:
    """The ``ok`` rows of an embeddings file or directory, chunk by chunk: ``(paths, float32 [n, D])``.

    Memory stays at one chunk whatever the size.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    filesystem, files = files_of(path)
    for inner in files:
        with filesystem.open_input_file(inner) as handle:
            parquet = pq.ParquetFile(handle)
            for batch in parquet.iter_batches(batch_size=chunk_rows, columns=["path", "status", "embedding"]):
                good = batch.filter(pc.and_(pc.equal(batch["status"], "ok"), pc.is_valid(batch["embedding"])))
                if good.num_rows == 0:
                    continue
                flat = good["embedding"].flatten().to_numpy(zero_copy_only=False).astype(np.float32)
                yield good["path"].to_pylist(), torch.from_numpy(flat.reshape(good.num_rows, -1))


@dataclass(frozen=True)
class Embeddings:
    """A whole embeddings file in memory (:func:`read_embeddings`)."""

    info: EmbeddingsInfo
    paths: list[str]
    """Every row's path."""
    status: list[str]
    vectors: torch.Tensor
    """float32 [number of ok rows, D], in row order."""
    ok_paths: list[str]
    """The paths of the ``vectors`` rows."""


def read_embeddings(path: str | Path) -> Embeddings:
    """Read a whole embeddings file or directory (small ones; :func:`iter_chunks` streams big ones)."""
    table = _column_table(path, ["path", "status"])
    chunks = list(iter_chunks(path))
    ok_paths = [p for names, _ in chunks for p in names]
    vectors = torch.cat([v for _, v in chunks]) if chunks else torch.zeros(0, 0)
    return Embeddings(
        read_info(path), table["path"].to_pylist(), table["status"].to_pylist(), vectors, ok_paths
    )


def paths_with_embeddings(path: str | Path, model_fingerprint: str) -> set[str]:
    """Paths that an existing embeddings file holds rows for (empty when there is no file).

    Raises :class:`ModelMismatchError` when the file was made by another model, and ``OSError`` /
    ``ValueError`` when it is not a readable embeddings file (e.g. cut short by an interruption).
    """
    filesystem, inner = filesystem_of(path)
    if filesystem.get_file_info(inner).type.name == "NotFound":
        return set()
    info = read_info(path)
    if info.model_fingerprint != model_fingerprint:
        raise ModelMismatchError(
            f"{path} の埋め込みは別のモデル ({info.model_name}, {info.model_fingerprint}) で作られています"
        )
    return set(_column_table(path, ["path"])["path"].to_pylist())


def _column_table(path: str | Path, columns: list[str]) -> pa.Table:
    """``columns`` of every row of an embeddings file or directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    filesystem, files = files_of(path)
    return pa.concat_tables([pq.read_table(f, filesystem=filesystem, columns=columns) for f in files])
