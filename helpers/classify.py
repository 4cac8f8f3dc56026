"""``python -m helpers.classify``: zero-shot classification of a folder of images into a CSV.

Example::

    python -m helpers.classify photos/ --labels 犬,猫,象 --template "{}の写真" --out results.csv

One CSV row per image file, in sorted path order: ``path`` (relative to the folder, ``/``
separators), ``status`` (``ok``/``error``), ``label_1``, ``prob_1`` … ``label_k``, ``prob_k`` and
``error`` (the reason, for errors). Probabilities follow the model's own scoring rule
(:mod:`helpers.zeroshot`), as notebook 01 teaches: a softmax over the labels of the scaled cosine
similarities of L2-normalised features for CLIP models (each row sums to 1), and an independent
per-label sigmoid with the learned bias for SigLIP models (a row need not sum to 1). Rows are
written as batches finish, so an interrupted run keeps its work and ``--resume`` carries on.

The model is never chosen behind the user's back: with ``auto`` (the default) and no hub the
command stops and names ``--model embedded``; the model is checked once on a known picture before
any file is read (``--no-check`` skips that). The last stdout line is the summary::

    N files: K ok, E errors[, S skipped (not images)], T s, R images/s, model NAME (FP), runtime LABEL

with FP the model's fingerprint, LABEL the runtime and precision (``torch fp32``, ``onnx int8
(CPUExecutionProvider)``) and R = files ÷ seconds from the first batch request to the last row
written. Exit status: 0 when every file is ok, 2 when some files had errors (all rows still
written), 1 on usage or model errors.

``--engine ray`` runs the same job on Ray Data (:mod:`helpers.engines_ray`): embedded on this
machine, or on the cluster at ``--ray-address`` (else ``$RAY_ADDRESS``, read only with
``--engine ray``); same CSV, same exit statuses. There the workers write the rows (and embeddings)
as Parquet shards under ``OUT.parts/`` and the driver receives none; at the end the CSV (and the
embeddings) are merged from the shards in sorted order (:mod:`helpers.parts`) and ``OUT.parts/`` is
removed. ``--resume`` skips the paths found in the shards of a run that was stopped and in a
finished CSV. With ``--engine ray`` the images may also be a ``s3://``, ``gs://`` or ``file://``
URI (listed and read through ``pyarrow.fs``). ``--embeddings OUT.parquet`` also writes the image
embeddings (:mod:`helpers.embeddings`), searchable with ``python -m helpers.search``; with
``--engine ray`` a name not ending in ``.parquet`` is a directory of Parquet shards.

``--runtime torch|onnx`` and ``--precision auto|fp32|fp16|bf16|int8`` choose what runs the model
(:mod:`helpers.runtimes`): ``auto`` is fp16 autocast on CUDA and float32 on the CPU, as before;
``torch bf16`` needs a CPU with native bfloat16 (or a GPU); ``onnx`` exports both towers to ONNX
once (cached under ``build/onnx``) and runs them with ONNX Runtime: fp32 or int8 (dynamic
quantisation) on the CPU, fp16 on CUDA. A pair this machine cannot run is refused in one line that
lists the valid ones; ``--runtime onnx`` runs on the local engine with the DataLoader backend. The
model check runs through the chosen runtime; the sidecar records runtime and precision, and
``--resume`` refuses a CSV made with others.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from helpers import embeddings, engines, env, parts, runtimes, zeroshot
from helpers.data import IMAGE_EXTENSIONS, ImageListing, scan_images
from helpers.engines import Record
from helpers.models import ClipModel, add_loading_options

NONE_LABEL = "none"
"""``label_1`` of an image whose best raw cosine similarity is below ``--min-score``."""


class UsageError(Exception):
    """Bad arguments or inputs: reported in one line, exit status 1."""


# ---------------------------------------------------------------- inputs


Inputs = ImageListing
"""The files to classify and what was passed over (:class:`helpers.data.ImageListing`)."""


def find_inputs(root: Path, recursive: bool = False) -> Inputs:
    """Image files under ``root`` (sub-folders only when ``recursive``), sorted by relative path."""
    try:
        return scan_images(root, recursive)
    except NotADirectoryError as err:
        raise UsageError(str(err)) from None


def is_uri(text: str | Path) -> bool:
    """True for ``s3://…``, ``gs://…``, ``file://…`` and other URIs (not for local paths)."""
    return "://" in str(text)


def find_uri_inputs(uri: str, recursive: bool = False) -> tuple[list[str], list[str], int]:
    """(file URIs, their ``/`` paths relative to ``uri``, count of non-images) of a folder URI, sorted.

    Listed through ``pyarrow.fs`` (``s3://``, ``gs://``, ``file://``...); the URIs are
    percent-encoded (spaces, Japanese names). Only what the store lists as a file counts (a dangling
    symbolic link of a ``file://`` folder is not listed).
    """
    from urllib.parse import quote

    import pyarrow.fs

    try:
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(uri.rstrip("/"))
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(inner, recursive=recursive))
    except (OSError, ValueError) as err:
        raise UsageError(f"画像フォルダー {uri} を一覧できません ({type(err).__name__}: {err})") from None
    scheme = uri.split("://", 1)[0]
    listed, skipped = [], 0
    for info in found:
        if info.type != pyarrow.fs.FileType.File:
            continue
        if Path(info.path).suffix.lower() in IMAGE_EXTENSIONS:
            listed.append((info.path[len(inner) :].lstrip("/"), f"{scheme}://{quote(info.path)}"))
        else:
            skipped += 1
    listed.sort()
    return [u for _, u in listed], [n for n, _ in listed], skipped


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (0-based) → ``(I, N)``."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard は I/N の形で指定してください (0 始まり): {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: 0 <= I < N が必要です")
    return index, count


def shard(files: Sequence[Path], index: int, count: int) -> list[Path]:
    """The ``index``-th of ``count`` contiguous, disjoint slices of ``files`` that together cover it."""
    size, extra = divmod(len(files), count)
    start = index * size + min(index, extra)
    return list(files[start : start + size + (1 if index < extra else 0)])


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Labels from ``--labels a,b,c`` (comma or 、) and/or ``--labels-file`` (one per line)."""
    found: list[str] = []
    if labels:
        found += [part.strip() for part in labels.replace("、", ",").split(",")]
    if labels_file is not None:
        try:
            found += [line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines()]
        except OSError as err:
            raise UsageError(f"ラベルファイルを読めません: {labels_file} ({err.strerror})") from None
    found = [label for label in found if label and not label.startswith("#")]
    if not found:
        raise UsageError("ラベルがありません: --labels 犬,猫,象 または --labels-file で指定してください")
    duplicates = sorted({label for label in found if found.count(label) > 1})
    if duplicates:
        raise UsageError(f"ラベルが重複しています: {', '.join(duplicates)}")
    return found


def check_templates(templates: Sequence[str]) -> list[str]:
    """Each template must contain ``{}`` once."""
    for template in templates:
        if template.count("{}") != 1:
            raise UsageError(f"テンプレートには {{}} をちょうど 1 つ入れてください: {template!r}")
    return list(templates)


# ---------------------------------------------------------------- the CSV and its sidecar


def csv_header(top_k: int) -> list[str]:
    """``path, status, label_1, prob_1, …, label_k, prob_k, error``."""
    columns = ["path", "status"]
    for i in range(1, top_k + 1):
        columns += [f"label_{i}", f"prob_{i}"]
    return [*columns, "error"]


@dataclass(frozen=True)
class RunSettings:
    """What the answers depend on; ``--resume`` refuses a CSV made with other settings."""

    labels: list[str]
    templates: list[str]
    model: str
    model_fingerprint: str
    scoring: str
    """``softmax`` (probabilities over labels) or ``sigmoid`` (per label, SigLIP)."""
    top_k: int
    min_score: float | None = None
    decode: str = "at size"
    """``"at size"`` (JPEGs decoded reduced, the default) or ``"exact"`` (``--exact-decode``)."""
    runtime: str = "torch"
    """What ran the model: ``torch`` or ``onnx`` (``--runtime``)."""
    precision: str = "fp32"
    """The precision it ran in, ``auto`` resolved (``--precision``): fp32, fp16, bf16 or int8."""

    def comparable(self) -> dict[str, object]:
        """The fields that must match for a resume."""
        return asdict(self)


def sidecar_path(out: Path) -> Path:
    """``results.csv`` → ``results.csv.json``."""
    return out.with_name(out.name + ".json")


def rows_done(out: Path, settings: RunSettings) -> dict[str, dict[str, str]]:
    """Rows already in ``out`` (by path) when resuming; refuses different settings."""
    if not out.exists():
        return {}
    _check_sidecar(out, settings)
    with open(out, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != csv_header(settings.top_k):
            raise UsageError(f"--resume できません: {out} の列が今回の --top-k と合いません")
        # A row cut short by an interruption (no valid status) counts as not done.
        return {
            row["path"]: row for row in reader if row.get("path") and row.get("status") in {"ok", "error"}
        }


def _row(
    relative: str, record: Record, classifier: torch.Tensor, settings: RunSettings, model: ClipModel
) -> dict:
    row: dict[str, object] = {"path": relative, "status": record.status, "error": record.error}
    if record.status != "ok":
        return row
    if (
        settings.min_score is not None
        and float((record.embedding.float() @ classifier.T).max()) < settings.min_score
    ):
        row["label_1"] = NONE_LABEL
        return row
    probs = model.probabilities(record.embedding[None], classifier)[0]
    top = probs.topk(min(settings.top_k, len(settings.labels)))
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
        row[f"label_{rank}"] = settings.labels[i]
        row[f"prob_{rank}"] = f"{p:.4f}"
    return row


# ---------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.classify",
        description="画像フォルダーを日本語 CLIP でゼロショット分類し、CSV に書き出します。",
    )
    parser.add_argument(
        "images_dir", help="画像のフォルダー (--engine ray なら s3://, gs://, file:// の URI も可)"
    )
    parser.add_argument("--labels", help="カンマ区切りのラベル (例: 犬,猫,象)")
    parser.add_argument("--labels-file", type=Path, help="1 行に 1 ラベルのファイル (# で始まる行は無視)")
    parser.add_argument(
        "--template", action="append", help="ラベルを埋め込む文 (繰り返すとアンサンブル、既定: {})"
    )
    parser.add_argument(
        "--model",
        help="load_clip に渡すモデル名 (既定: $CLIP_MODEL、なければ auto。Hub に届かなければ止まります)",
    )
    add_loading_options(parser)
    parser.add_argument(
        "--exact-decode",
        action="store_true",
        help="JPEG を縮小デコードせず、モデル自身の前処理で元の大きさから (以前と同じ結果、遅い)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--runtime",
        choices=list(runtimes.RUNTIMES),
        default="torch",
        help="モデルを動かすもの (onnx: ONNX に書き出し ONNX Runtime で。--engine local と DataLoader だけ)",
    )
    parser.add_argument(
        "--precision",
        choices=list(runtimes.PRECISIONS),
        default="auto",
        help="auto: GPU は fp16、CPU は fp32。bf16 (bfloat16 の命令がある CPU か GPU)、int8 (onnx、CPU)",
    )
    parser.add_argument("--backend", choices=["auto", "dataloader", "dali"], default="auto")
    parser.add_argument(
        "--engine", choices=["local", "ray"], default="local", help="処理を走らせる場所 (ray: Ray Data)"
    )
    parser.add_argument(
        "--ray-address",
        help="--engine ray で参加する Ray クラスター (既定: $RAY_ADDRESS、なければこのマシンで起動)",
    )
    parser.add_argument(
        "--ray-stats",
        action="store_true",
        help="--engine ray: Ray Data の段ごとの時間 (Dataset.stats()) を stderr に",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader のワーカー数 (--engine ray では前処理タスク数)"
    )
    parser.add_argument(
        "--embeddings",
        help="画像の埋め込みも Parquet に書く (helpers.search で検索できる。--engine ray では"
        " .parquet で終わらない名前は Parquet シャードのフォルダー)",
    )
    parser.add_argument("--out", type=Path, default=Path("results.csv"))
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--recursive", action="store_true", help="サブフォルダーも含める")
    parser.add_argument("--shard", default="0/1", help="I/N: ソート順で N 等分した I 番目 (0 始まり) だけ")
    parser.add_argument("--resume", action="store_true", help="--out に書かれた行を飛ばして続きから")
    parser.add_argument("--min-score", type=float, help="最大コサイン類似度がこれ未満なら label_1 を none に")
    parser.add_argument("--no-progress", action="store_true", help="進捗バーを出さない")
    return parser


def run(args: argparse.Namespace) -> int:
    """Classify; return the exit status (0 ok, 2 some errors). Raises UsageError / ModelLoadError."""
    from tqdm.auto import tqdm

    from helpers.models import check, prepare

    if args.top_k < 1:
        raise UsageError("--top-k は 1 以上にしてください")
    if args.batch_size < 1:
        raise UsageError("--batch-size は 1 以上にしてください")
    if args.ray_address and args.engine != "ray":
        raise UsageError("--ray-address は --engine ray と一緒に指定してください")
    labels = read_labels(args.labels, args.labels_file)
    templates = check_templates(args.template or ["{}"])
    if is_uri(args.images_dir):
        if args.engine != "ray":
            raise UsageError(
                f"URI の入力 ({args.images_dir}) は --engine ray だけで読めます:"
                " ローカルのフォルダーを指定するか --engine ray を付けてください"
            )
        uris, uri_names, uri_skipped = find_uri_inputs(args.images_dir, args.recursive)
        inputs = ImageListing(Path("."), [Path(u) for u in uris], uri_skipped)
    else:
        inputs = find_inputs(Path(args.images_dir), args.recursive)
        uris, uri_names = [], []
    if not inputs.files:
        raise UsageError(
            f"{args.images_dir} に画像がありません (拡張子 jpg/jpeg/png/webp/bmp/gif/tif/tiff"
            f"{'、サブフォルダーは --recursive で' if not args.recursive else ''})"
        )
    shard_index, shard_count = parse_shard(args.shard)
    files = shard(inputs.files, shard_index, shard_count)

    choice = choose_runtime(args)
    if choice.runtime == "onnx" and args.backend == "auto":
        backend = "dataloader"
        print("バックエンド: dataloader (--runtime onnx は DataLoader で動きます)", file=sys.stderr)
    else:
        backend = engines.resolve_backend(args.backend)
        print(engines.backend_notice(args.backend), file=sys.stderr)
    model, note = prepare(args.model, run_check=False, trust_remote_code=args.trust_remote_code)
    if args.engine != "ray":  # Ray's workers load the model themselves, in the engine's own precision
        model = runtimes.use(model, choice, log=lambda line: print(line, file=sys.stderr))
    if not args.no_check and model.kind != "random":
        note = check(model)  # through the chosen runtime: a model that lost its answers stops here
    print(f"{note} [{choice.label}]", file=sys.stderr)
    settings = RunSettings(
        labels,
        templates,
        model.name,
        model.fingerprint,
        model.scoring.kind,
        args.top_k,
        args.min_score,
        "exact" if args.exact_decode else "at size",
        choice.runtime,
        choice.precision,
    )
    if args.engine == "ray":
        names = (
            shard(uri_names, shard_index, shard_count)
            if uris
            else [p.relative_to(inputs.root).as_posix() for p in files]
        )
        locations = shard(uris, shard_index, shard_count) if uris else [str(p) for p in files]
        return _run_on_ray(args, model, settings, locations, names, inputs.skipped, backend)
    done = rows_done(args.out, settings) if args.resume else {}
    runtime_label = choice.label
    if args.embeddings and done:  # rows whose embedding is not stored yet are done again
        have = _paths_with_embeddings(args.embeddings, model.fingerprint)
        done = {path: row for path, row in done.items() if path in have}
    relative = {p: p.relative_to(inputs.root).as_posix() for p in files}
    todo = [p for p in files if relative[p] not in done]
    classifier = model.label_features(labels, templates)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write_sidecar(args, model, settings)
    header = csv_header(args.top_k)
    counts = {"ok": sum(r["status"] == "ok" for r in done.values()), "error": 0}
    counts["error"] = len(done) - counts["ok"]
    mode = "a" if done else "w"
    vectors = (
        embeddings.EmbeddingsWriter(args.embeddings, model.name, model.fingerprint, carry_over=set(done))
        if args.embeddings
        else contextlib.nullcontext()
    )
    with open(args.out, mode, encoding="utf-8", newline="") as handle, vectors as vector_writer:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        with tqdm(total=len(todo), unit="枚", disable=args.no_progress or not todo, file=sys.stderr) as bar:
            fallbacks = _dali_fallbacks() if backend == "dali" else None
            options = {
                "backend": backend,
                "batch_size": args.batch_size,
                "num_workers": args.workers,
                "exact_decode": args.exact_decode,
                "fallbacks": fallbacks,
            }
            start = time.perf_counter()  # the first batch request: loading and check() are not counted
            if args.engine == "ray":
                from helpers import engines_ray

                batches = engines_ray.iter_embeddings(
                    model,
                    todo,
                    progress=False,
                    address=args.ray_address,
                    run_check=not args.no_check,
                    trust_remote_code=args.trust_remote_code,
                    **options,
                )
            else:  # the chosen runtime's model carries its precision: no second autocast around it
                batches = engines.iter_embeddings(model, todo, progress=False, amp=False, **options)
            for records in batches:
                for record in records:
                    writer.writerow(_row(relative[record.path], record, classifier, settings, model))
                    counts[record.status] += 1
                handle.flush()
                if vector_writer is not None:
                    vector_writer.write(records, [relative[record.path] for record in records])
                bar.update(len(records))
            seconds = time.perf_counter() - start  # the last row is written
    _sort_csv(args.out, header)
    return _report(counts, inputs.skipped, len(todo), seconds, model, args, fallbacks, runtime_label)


@dataclass(frozen=True)
class Labeller:
    """The label columns of the CSV for a batch of embeddings, computed where the embeddings are
    (a Ray worker): the same rule as the local engine's rows (top-k by the model's scoring rule;
    ``none`` below ``min_score``)."""

    labels: tuple[str, ...]
    classifier: np.ndarray
    """float32 [labels, D]: the label features."""
    scoring: zeroshot.Scoring
    top_k: int
    min_score: float | None = None

    @property
    def columns(self) -> list[str]:
        return [c for i in range(1, self.top_k + 1) for c in (f"label_{i}", f"prob_{i}")]

    def __call__(self, vectors: np.ndarray, ok: np.ndarray) -> dict[str, list[str]]:
        """``{label_1: [...], prob_1: [...], ...}``, one string per row ("" where there is none)."""
        n = len(ok)
        out = {c: [""] * n for c in self.columns}
        rows = np.flatnonzero(ok)
        if not len(rows):
            return out
        features = torch.from_numpy(np.ascontiguousarray(vectors[rows], dtype=np.float32))
        classifier = torch.from_numpy(self.classifier)
        best_cosine = (features @ classifier.T).max(dim=1).values
        top = zeroshot.probabilities(features, classifier, self.scoring).topk(
            min(self.top_k, len(self.labels))
        )
        for j, row in enumerate(rows.tolist()):
            if self.min_score is not None and float(best_cosine[j]) < self.min_score:
                out["label_1"][row] = NONE_LABEL
                continue
            for rank, (p, i) in enumerate(
                zip(top.values[j].tolist(), top.indices[j].tolist(), strict=True), 1
            ):
                out[f"label_{rank}"][row] = self.labels[i]
                out[f"prob_{rank}"][row] = f"{p:.4f}"
        return out


def choose_runtime(args: argparse.Namespace) -> runtimes.Choice:
    """``--runtime``/``--precision`` validated for this machine and the chosen engine and backend."""
    if args.runtime == "onnx" and args.engine == "ray":
        raise UsageError(
            "--runtime onnx は --engine local だけで動きます (--engine ray とは一緒に使えません)"
        )
    if args.runtime == "onnx" and args.backend == "dali":
        raise UsageError("--runtime onnx は DataLoader で動きます: --backend dali とは一緒に使えません")
    if args.engine == "ray" and args.precision != "auto":
        raise UsageError(
            "--engine ray では --precision auto だけです (Ray のワーカーはモデルを自分で読み込みます)"
        )
    try:
        return runtimes.choose(args.runtime, args.precision, env.device())
    except runtimes.RuntimeUnavailable as err:
        raise UsageError(str(err)) from None


def _run_on_ray(
    args: argparse.Namespace,
    model: ClipModel,
    settings: RunSettings,
    locations: list[str],
    names: list[str],
    skipped: int,
    backend: str,
) -> int:
    """``--engine ray``: the workers write shards to ``OUT.parts/``; the driver merges them at the end.

    The driver holds the file list and sets of paths (what is done), never a result row or an
    embedding while the job runs; the merge sorts bucket by bucket (:func:`helpers.parts.merge`).
    """
    from helpers import engines_ray

    shards = parts.parts_dir(args.out)
    old_csv, old_embeddings = False, False
    if args.resume:
        csv_done = set(rows_done(args.out, settings))
        if shards.is_dir() and not args.out.exists():
            _check_sidecar(args.out, settings)
        try:
            found = parts.scan(shards, model.fingerprint)
        except embeddings.ModelMismatchError as err:
            raise UsageError(f"--resume できません: {err}。別の --out に書いてください") from None
        if found.removed:
            print(
                f"途中で切れたシャード {len(found.removed)} 個を消しました (そのファイルはやり直します)",
                file=sys.stderr,
            )
        if args.embeddings:
            have = _paths_with_embeddings(args.embeddings, model.fingerprint)
            old_embeddings = bool(have)
            done = {p for p in csv_done if p in have} | found.with_embeddings
        else:
            done = csv_done | found.done
        old_csv = bool(csv_done)
    else:
        done = set()
        if shards.exists():
            shutil.rmtree(shards)
            print(
                f"前回の途中結果 {shards} を消して最初からやり直します (続きからなら --resume)",
                file=sys.stderr,
            )
    todo = [(loc, name) for loc, name in zip(locations, names, strict=True) if name not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write_sidecar(args, model, settings)
    labeller = Labeller(
        tuple(settings.labels),
        model.label_features(settings.labels, settings.templates).float().cpu().numpy(),
        model.scoring,
        settings.top_k,
        settings.min_score,
    )
    fallbacks = _dali_fallbacks() if backend == "dali" else None
    start = time.perf_counter()  # the first batch request: loading and check() are not counted
    ray_stats = engines_ray.RunStats()
    if todo:  # Ray Data's writer makes OUT.parts/
        engines_ray.write_parts(
            model,
            [loc for loc, _ in todo],
            [name for _, name in todo],
            shards,
            formatter=labeller,
            with_embeddings=bool(args.embeddings),
            backend=backend,
            batch_size=args.batch_size,
            num_workers=args.workers,
            address=args.ray_address,
            run_check=not args.no_check,
            trust_remote_code=args.trust_remote_code,
            exact_decode=args.exact_decode,
            stats=ray_stats,
        )
        if args.ray_stats:
            print(ray_stats.ray_stats, file=sys.stderr)
    listing = sorted(names)
    embeddings_to = (
        parts.EmbeddingsTarget(args.embeddings, model.name, model.fingerprint, old_embeddings)
        if args.embeddings
        else None
    )
    counts, decoders = parts.merge(args.out, csv_header(args.top_k), shards, listing, old_csv, embeddings_to)
    if fallbacks is not None:
        for decoder, times in decoders.items():
            engines_ray.count_decoder(fallbacks, decoder, times)
    seconds = time.perf_counter() - start  # the last row is written
    shutil.rmtree(shards, ignore_errors=True)
    return _report(counts, skipped, len(todo), seconds, model, args, fallbacks, "torch " + settings.precision)


def _check_sidecar(out: Path, settings: RunSettings) -> None:
    """Refuse to resume shards made with other settings (the sidecar of ``out`` records them)."""
    side = sidecar_path(out)
    if not side.exists():
        raise UsageError(
            f"{out} の設定ファイル {side.name} がないので再開できません (--resume を外すか別の --out に)"
        )
    saved = json.loads(side.read_text(encoding="utf-8"))
    # a sidecar from before --runtime/--precision existed: eager torch at the engine's own precision
    legacy = {"runtime": "torch", "precision": runtimes.choose("torch", "auto", env.device()).precision}
    for key, value in settings.comparable().items():
        if saved.get(key, legacy.get(key)) != value:
            raise UsageError(
                f"--resume できません: {key} が前回と違います (前回 {saved.get(key)!r}, 今回 {value!r})。"
                " 同じ設定で実行するか、別の --out に書いてください"
            )


def _write_sidecar(args: argparse.Namespace, model: ClipModel, settings: RunSettings) -> None:
    sidecar = {
        **asdict(settings),
        "scoring_rule": f"{model.scoring.describe()} ({model.scoring.source})",
        "checked": not args.no_check and model.kind != "random",
        "runtime_detail": getattr(model, "runtime", f"{settings.runtime} {settings.precision}"),
    }
    sidecar_path(args.out).write_text(
        json.dumps(sidecar, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )


def _report(counts, skipped, done_now, seconds, model, args, fallbacks, runtime_label: str) -> int:
    """Print the summary line (the last stdout line); return the exit status."""
    total = counts["ok"] + counts["error"]
    rate = done_now / seconds if seconds > 0 else 0.0
    skipped_note = f", {skipped} skipped (not images)" if skipped else ""
    summary = f"{total} files: {counts['ok']} ok, {counts['error']} errors{skipped_note}"
    unchecked = ", not checked (--no-check)" if args.no_check and model.kind != "random" else ""
    if fallbacks is not None and fallbacks.pil:
        print(f"DALI の代わりに PIL でデコードしたファイル: {fallbacks.describe()}", file=sys.stderr)
    dali_note = (
        f", {sum(fallbacks.by_design.values())} to PIL by header, {sum(fallbacks.after_error.values())}"
        " to PIL after DALI errors"
        if fallbacks is not None
        else ""
    )
    print(
        f"{summary}, {seconds:.1f} s, {rate:.1f} images/s,"
        f" model {model.name} ({model.fingerprint[:12]}), runtime {runtime_label}{unchecked}{dali_note}"
    )
    return 0 if counts["error"] == 0 else 2


def _dali_fallbacks():
    """A fresh :class:`helpers.dali.Fallbacks` counter."""
    from helpers import dali

    return dali.Fallbacks()


def _paths_with_embeddings(out: str, fingerprint: str) -> set[str]:
    """Paths ``--embeddings`` already holds (``--resume``); refuses another model's file."""
    try:
        return embeddings.paths_with_embeddings(out, fingerprint)
    except embeddings.ModelMismatchError as err:
        raise UsageError(f"--resume できません: {err}。別の --embeddings に書いてください") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"--embeddings のファイルを読めません: {out} ({err})") from None


def _sort_csv(out: Path, header: list[str]) -> None:
    """Rewrite ``out`` in sorted path order, one row per path (a resumed run appends), atomically."""
    with open(out, encoding="utf-8", newline="") as handle:
        valid = [row for row in csv.DictReader(handle) if row.get("status") in {"ok", "error"}]
    rows = sorted({row["path"]: row for row in valid}.values(), key=lambda row: row["path"])  # last row wins
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one clear line and exit status 1 on usage or model errors."""
    from helpers.engines_ray import RayEngineError
    from helpers.models import ModelCheckError, ModelLoadError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (
        UsageError,
        ModelLoadError,
        ModelCheckError,
        RayEngineError,
        runtimes.RuntimeUnavailable,
        runtimes.ExportError,
    ) as err:
        print(f"エラー: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
