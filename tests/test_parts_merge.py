"""The Ray engine's final merge (helpers.parts) against the row-by-row merge it replaced (cheap, no Ray).

The old algorithm is kept here, and only here, as the reference: a bucketed external sort through
Python's ``bisect`` and ``csv.DictWriter``, row by row. The new merge must write the same CSV bytes
and the same embeddings (values, order, float16, model metadata) from the same shards, including
error rows, odd paths (commas, quotes, line breaks, unicode), paths written twice (a retried batch)
and the rows of an earlier CSV or embeddings file (``--resume``).
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import embeddings, engines_ray, parts

MODEL, FINGERPRINT = "embedded", "0123456789abcdef"
HEADER = ["path", "status", "label_1", "prob_1", "label_2", "prob_2", "error"]
DIM = 8

# ---------------------------------------------------------------- the old merge (the reference)


def old_conform(table: pa.Table, schema: pa.Schema, rank: int) -> pa.Table:
    """helpers.parts._conform before."""
    arrays = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in schema
    ]
    arrays.append(pa.array(np.full(table.num_rows, rank, dtype=np.int32)))
    return pa.Table.from_arrays(arrays, schema=schema.append(pa.field(parts.RANK, pa.int32())))


def old_sorted_merge(
    sources: Sequence[Iterable[pa.Table]],
    schema: pa.Schema,
    sorted_names: Sequence[str],
    workdir: Path,
    bucket_rows: int = 8192,
) -> Iterator[pa.Table]:
    """helpers.parts.sorted_merge before the merge was rewritten."""
    cuts = list(sorted_names[bucket_rows::bucket_rows])
    workdir.mkdir(parents=True, exist_ok=True)
    writers: dict[int, pq.ParquetWriter] = {}
    try:
        for rank, source in enumerate(sources):
            for table in source:
                if table.num_rows == 0:
                    continue
                table = old_conform(table, schema, rank)
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
            order = pc.sort_indices(table, sort_keys=[("path", "ascending"), (parts.RANK, "descending")])
            table = table.take(order)
            paths = table["path"].to_numpy(zero_copy_only=False)
            first = np.ones(len(paths), dtype=bool)
            first[1:] = paths[1:] != paths[:-1]
            yield table.filter(first).drop_columns([parts.RANK])
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(workdir, ignore_errors=True)


def old_merge_csv(
    out: Path, header: list[str], shards: Path, listing: list[str], old_csv: bool
) -> tuple[dict[str, int], Counter[str]]:
    """classify._merge_csv before: (counts by status, counts of the decoder values)."""
    schema = pa.schema([pa.field(c, pa.string()) for c in [*header, "decoder"]])
    sources = [parts.csv_tables(out, header)] if old_csv else []  # reading the old CSV did not change
    sources.append(parts.shard_tables(shards, schema.names))
    counts = {"ok": 0, "error": 0}
    decoders: Counter[str] = Counter()
    tmp = out.with_name(f"{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            merged = old_sorted_merge(sources, schema, listing, shards / "_merge")
            for batch in (b for table in merged for b in table.to_batches(max_chunksize=2048)):
                for row in batch.to_pylist():
                    counts[row["status"]] += 1
                    if row["decoder"]:
                        decoders[row["decoder"]] += 1
                    writer.writerow({k: v or "" for k, v in row.items()})
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return counts, decoders


def old_merge_embeddings(
    target: str, model_name: str, fingerprint: str, shards: Path, listing: list[str], old: bool
) -> None:
    """classify._merge_embeddings before, for a ``.parquet`` target."""
    schema = embeddings.schema(model_name, fingerprint)
    sources = [parts.embedding_tables(target)] if old else []
    sources.append(parts.shard_tables(shards, ["path", "status", "embedding"], require=["embedding"]))
    with embeddings.EmbeddingsWriter(target, model_name, fingerprint) as writer:
        for table in old_sorted_merge(sources, schema, listing, shards / "_merge_embeddings"):
            writer.write_table(table)


# ---------------------------------------------------------------- synthetic shards

ODD = ["a,b.jpg", 'say "cheese".jpg', "line\nbreak.jpg", "cr\rlf\r\n.jpg", " lead space.jpg",
       "写真/猫 🐱.jpg", "tab\there.jpg", "é/ß/ø.png", 'end quote".jpg', ",", '"', "ｶﾀｶﾅ/ｶﾞ.jpg"]  # fmt: skip


def listing_of(n: int) -> list[str]:
    """``n`` relative paths, odd ones among them, in sorted order (what the driver holds)."""
    names = {f"d{i % 13:02d}/img{i:05d}.jpg" for i in range(n)} | {f"odd/{i}/{o}" for i, o in enumerate(ODD)}
    return sorted(names)


def write_shards(shards: Path, names: list[str], seed: int, embeddings_too: bool = True) -> None:
    """``names`` (in a shuffled order, some twice) as shards of 1–40 rows, with errors and decoders."""
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(names)))
    order += list(rng.choice(len(names), size=len(names) // 20))  # retried batches write rows again
    columns = ["label_1", "prob_1", "label_2", "prob_2"]
    schema = engines_ray.parts_schema(MODEL, FINGERPRINT, columns, with_embeddings=embeddings_too)
    shards.mkdir(parents=True, exist_ok=True)
    start, k = 0, 0
    while start < len(order):
        ids = order[start : start + int(rng.integers(1, 41))]
        ok = np.array([i % 17 != 3 for i in ids])
        vectors = rng.standard_normal((len(ids), DIM)).astype(np.float32)
        table = {
            "path": [names[i] for i in ids],
            "status": ["ok" if good else "error" for good in ok],
            "error": ["" if good else f'壊れた画像, "{i}"\n行' for good, i in zip(ok, ids, strict=True)],
            "decoder": [["", "dali", "by_design:CMYK", "after_error:nvjpeg, bad"][i % 4] for i in ids],
            "pid": np.full(len(ids), 7, dtype=np.int64),
            "label_1": ["犬" if good else "" for good in ok],
            "prob_1": [f"{(i % 100) / 100:.4f}" if good else "" for good, i in zip(ok, ids, strict=True)],
            "label_2": ['猫, "三毛"' if good else "" for good in ok],
            "prob_2": ["0.0100" if good else "" for good in ok],
        }
        if embeddings_too:
            table["embedding"] = embeddings.embedding_array(vectors, ok)
        pq.write_table(
            pa.table(table, schema=schema), shards / f"{seed}-{rng.integers(1 << 30):08x}-{k}.parquet"
        )
        start += len(ids)
        k += 1


def old_csv(out: Path, names: list[str]) -> None:
    """A finished CSV of an earlier run: some listed paths, a path no longer listed, an unfinished row."""
    with open(out, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HEADER)
        writer.writeheader()
        for i, name in enumerate(names[::3]):
            writer.writerow({"path": name, "status": "ok" if i % 5 else "error", "label_1": "象",
                             "prob_1": "0.5000", "error": "" if i % 5 else 'old, "bad"'})  # fmt: skip
        writer.writerow({"path": "gone/removed,since.jpg", "status": "ok", "label_1": "象"})
        handle.write("d00/img99999.jpg,o")  # a row cut short


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, list[str]]:
    """A killed run's shards (two writes, the second without embeddings for some paths)."""
    names = listing_of(3000)
    out = tmp_path / "new" / "results.csv"
    shards = parts.parts_dir(out)
    write_shards(shards, names[: 2 * len(names) // 3], seed=1)
    write_shards(shards, names[len(names) // 2 :], seed=2)
    write_shards(shards, names[::7], seed=3, embeddings_too=False)
    return out, names


def copy_run(out: Path, to: Path) -> Path:
    """The same shards (and CSV, embeddings) for the reference merge, under ``to``."""
    shutil.copytree(out.parent, to)
    return to / out.name


@pytest.mark.parametrize("resumed", [False, True])
def test_csv_bytes_and_counts_equal_the_old_merge(run, tmp_path: Path, monkeypatch, resumed: bool) -> None:
    out, names = run
    if resumed:
        old_csv(out, names)
    reference = copy_run(out, tmp_path / "old")
    monkeypatch.setattr(parts, "BUCKET_ROWS", 500)  # several buckets, as at scale
    new_counts, new_decoders = parts.merge_csv(out, HEADER, parts.parts_dir(out), names, resumed)
    old_counts, old_decoders = old_merge_csv(reference, HEADER, parts.parts_dir(reference), names, resumed)
    assert out.read_bytes() == reference.read_bytes()
    assert new_counts == old_counts and new_decoders == old_decoders
    assert new_counts["error"] > 0 and new_decoders["dali"] > 0
    text = out.read_text(encoding="utf-8")
    assert '"odd/1/say ""cheese"".jpg"' in text and "写真/猫 🐱.jpg" in text
    assert ("gone/removed,since.jpg" in text) == resumed and "d00/img99999.jpg" not in text


@pytest.mark.parametrize("resumed", [False, True])
def test_embeddings_equal_the_old_merge(run, tmp_path: Path, monkeypatch, resumed: bool) -> None:
    out, names = run
    target = out.with_name("emb.parquet")
    if resumed:  # an earlier run's embeddings file: half of it is redone by the shards
        earlier = tmp_path / "earlier.parquet"
        write_shards(earlier.with_suffix(".parts"), names[::2], seed=4)
        old_merge_embeddings(str(target), MODEL, FINGERPRINT, earlier.with_suffix(".parts"), names, False)
    reference = copy_run(out, tmp_path / "old")
    monkeypatch.setattr(parts, "BUCKET_ROWS", 500)
    to = parts.EmbeddingsTarget(str(target), MODEL, FINGERPRINT, resumed)
    counts, _ = parts.merge(out, HEADER, parts.parts_dir(out), names, False, to)
    old_target = reference.with_name("emb.parquet")
    old_merge_embeddings(str(old_target), MODEL, FINGERPRINT, parts.parts_dir(reference), names, resumed)
    old_counts, _ = old_merge_csv(reference, HEADER, parts.parts_dir(reference), names, False)
    assert out.read_bytes() == reference.read_bytes() and counts == old_counts
    new, old = pq.read_table(target), pq.read_table(old_target)
    assert new.schema == old.schema and new.schema.field("embedding").type.value_type == pa.float16()
    assert new.schema.metadata == old.schema.metadata
    info = embeddings.read_info(target)
    assert (info.model_name, info.model_fingerprint, info.rows) == (MODEL, FINGERPRINT, old.num_rows)
    assert new.equals(old)  # values, nulls and order
    paths = new["path"].to_pylist()
    assert (
        paths == sorted(set(paths))
        and new["embedding"].null_count == pc.sum(pc.equal(new["status"], "error")).as_py()
    )


def test_sorted_merge_is_the_old_one_at_any_bucket_size(tmp_path: Path) -> None:
    names = listing_of(700)
    write_shards(tmp_path / "s", names, seed=5)
    schema = engines_ray.parts_schema(MODEL, FINGERPRINT, ["label_1"], with_embeddings=True)
    schema = pa.schema([f for f in schema if f.name != "pid"])
    unlisted = pa.table({"path": ["zz/not listed.jpg", "0 first.jpg"], "status": ["ok", "error"]})

    def sources():
        return [[unlisted], parts.shard_tables(tmp_path / "s", schema.names, batch_rows=13)]

    old = pa.concat_tables(old_sorted_merge(sources(), schema, names, tmp_path / "o", bucket_rows=50))
    for bucket_rows, max_buckets in [(1, 1000), (7, 1000), (50, 3), (100_000, 256)]:
        merged = list(parts.sorted_merge(sources(), schema, names, tmp_path / "n", bucket_rows, max_buckets))
        assert pa.concat_tables(merged).equals(old)
        assert len(merged) <= max_buckets + 1 and not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    "value", ["", "plain", "a,b", 'q"q', '"', "x\ny", "x\ry", " x ", "\t", "猫🐱", "a\u2028b", '",\r\n']
)
def test_csv_lines_quote_as_the_csv_module(value: str, tmp_path: Path) -> None:
    table = pa.table({"a": [value, None], "b": ["1", value]})
    with open(tmp_path / "x.csv", "w", encoding="utf-8", newline="") as handle:
        csv.writer(handle).writerows([[value, "1"], ["", value]])
    lines = parts.csv_lines(table, ["a", "b"])
    assert "".join(lines.to_pylist()).encode("utf-8") == (tmp_path / "x.csv").read_bytes()


def test_take_list_copies_rows_as_arrow_take_does() -> None:
    vectors = np.arange(40, dtype=np.float16).reshape(10, 4)
    ok = np.array([True, False, True, True, False, True, True, True, False, True])
    column = embeddings.embedding_array(vectors, ok).slice(2, 7)  # a slice: offsets start past 0
    indices = np.array([6, 0, 3, 3, 2, 5])
    assert parts._take_list(column, indices).equals(column.take(pa.array(indices)))
    ragged = pa.array([[1.0], None, [2.0, 3.0]], type=pa.list_(pa.float16()))  # not one length
    assert parts._take_list(ragged, np.array([2, 0])).equals(ragged.take(pa.array([2, 0])))


def test_a_failing_embeddings_write_leaves_the_csv_as_it_was(run, monkeypatch) -> None:
    out, names = run
    old_csv(out, names)
    before = out.read_bytes()

    def fail(to, tables):
        next(iter(tables))
        raise OSError("disk full")

    monkeypatch.setattr(parts, "_write_embeddings", fail)
    to = parts.EmbeddingsTarget(str(out.with_name("emb.parquet")), MODEL, FINGERPRINT)
    with pytest.raises(OSError, match="disk full"):
        parts.merge(out, HEADER, parts.parts_dir(out), names, True, to)
    assert out.read_bytes() == before and sorted(p.name for p in out.parent.iterdir()) == [
        out.name,
        parts.parts_dir(out).name,
    ]
    assert not (parts.parts_dir(out) / "_merge").exists()  # the bucket files are gone, the shards stay
    assert parts.shard_files(parts.parts_dir(out))
