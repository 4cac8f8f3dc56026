"""The Ray engine: same answers as the local engine, bad files as rows, a dying actor survived, no leftovers.

Runs Ray embedded on this machine (2 CPUs in CI) with the embedded model, on the same folder as
``tests/test_classify.py`` (its fixture is reused). One Ray session serves the in-process tests;
the command-line test starts its own, in a subprocess, and checks that nothing of it remains.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray[data]==2.60.0')")

import test_classify
from test_classify import LABELS, _check_rows, _rows

from helpers import REPO_ROOT, classify, engines, engines_ray, parts, search
from helpers import embeddings as emb
from helpers.models import load_clip

folder = test_classify.folder
"""The folder ``tests/test_classify.py`` builds (good, odd-but-valid and bad files), as a fixture here too."""

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")  # Ray's own defaults

RAY_DAEMONS = ("raylet", "gcs_server")


MARK = "COURSE_RAY_TEST_MARK"
"""An environment variable a test sets before Ray starts: Ray's daemons inherit it, so the test finds
its own daemons and not those another Ray on the same machine (another session, another job) started."""


def ray_daemons(mark: str | None = None) -> set[int]:
    """Process ids of Ray's node daemons running on this machine (from /proc); with ``mark``, only
    those whose environment holds ``COURSE_RAY_TEST_MARK=mark``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() not in RAY_DAEMONS:
                    continue
                if mark is None or f"{MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    found.add(int(entry.name))
            except OSError:  # the process ended while we looked
                continue
    return found


def wait_gone(pids: set[int], timeout: float = 20.0) -> set[int]:
    """The ones of ``pids`` still alive after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = pids & ray_daemons()
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _classify(folder: Path, out: Path, *extra: str) -> int:
    return classify.main(
        [str(folder), "--labels", LABELS, "--model", "embedded", "--out", str(out), "--batch-size", "4",
         "--no-progress", *extra]
    )  # fmt: skip


def _answers(rows: list[dict[str, str]]) -> list[tuple]:
    """Everything but the probabilities, which may differ in the last digit between engines."""
    return [tuple(v for k, v in row.items() if not k.startswith("prob_")) for row in rows]


def _assert_same_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    assert _answers(a) == _answers(b)
    for x, y in zip(a, b, strict=True):
        for key in (k for k in x if k.startswith("prob_") and x[k]):
            assert abs(float(x[key]) - float(y[key])) <= 2e-4, (x["path"], key, x[key], y[key])


@pytest.fixture(scope="module")
def local_csv(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local engine's answers (and embeddings) for the folder: what Ray must reproduce."""
    out = tmp_path_factory.mktemp("local") / "local.csv"
    assert _classify(folder, out, "--backend", "dataloader", "--workers", "0", "--embeddings",
                     str(out.with_suffix(".parquet"))) == 2  # fmt: skip
    return out


# ---------------------------------------------------------------- the command, end to end


def test_command_on_ray_gives_the_same_answers_and_leaves_nothing(
    folder: Path, local_csv: Path, tmp_path: Path
) -> None:
    """``python -m helpers.classify --engine ray`` in a fresh process: embedded Ray started and
    stopped by the command, same CSV and embeddings as the local engine, quiet stderr."""
    mark = uuid.uuid4().hex
    out = tmp_path / "ray.csv"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"], env[MARK] = str(REPO_ROOT), mark
    result = subprocess.run(
        [sys.executable, "-m", "helpers.classify", str(folder), "--labels", LABELS, "--model", "embedded",
         "--out", str(out), "--batch-size", "4", "--engine", "ray", "--backend", "dataloader",
         "--embeddings", str(tmp_path / "ray.parquet"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "バックエンド: dataloader" and lines[1].startswith("モデル確認 OK") and len(lines) == 2
    assert result.stdout.strip().splitlines()[-1].startswith("16 files: 11 ok, 5 errors, 1 skipped")
    rows = _rows(out)
    _check_rows(rows)
    _assert_same_rows(rows, _rows(local_csv))
    ray_emb, local_emb = (
        emb.read_embeddings(tmp_path / "ray.parquet"),
        emb.read_embeddings(local_csv.with_suffix(".parquet")),
    )
    assert ray_emb.paths == local_emb.paths == [row["path"] for row in rows]
    assert ray_emb.status == local_emb.status and ray_emb.info == local_emb.info
    assert torch.allclose(ray_emb.vectors, local_emb.vectors, atol=2e-3)
    assert not (tmp_path / "ray.csv.parts").exists()  # the shards were merged, then removed
    assert wait_gone(ray_daemons(mark)) == set(), "Ray processes left behind"


def test_ray_address_alone_never_switches_engine(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # nothing listens there

    def refuse(*args, **kwargs):
        raise AssertionError("the Ray engine ran without --engine ray")

    monkeypatch.setattr(engines_ray, "iter_embeddings", refuse)
    assert _classify(folder, tmp_path / "l.csv", "--backend", "dataloader", "--workers", "0") == 2
    code = _classify(folder, tmp_path / "x.csv", "--ray-address", "127.0.0.1:1")
    assert code == 1 and "--engine ray" in capsys.readouterr().err


def test_a_cluster_that_does_not_answer_is_reported_at_once(folder: Path, tmp_path: Path, capsys) -> None:
    begin = time.monotonic()
    code = _classify(folder, tmp_path / "x.csv", "--engine", "ray", "--ray-address", "127.0.0.1:1")
    assert code == 1 and "127.0.0.1:1 に接続できません" in capsys.readouterr().err
    assert time.monotonic() - begin < 60  # Ray alone would retry for many minutes


# ---------------------------------------------------------------- in-process, one Ray session


@pytest.fixture(scope="module")
def ray_session():
    """Embedded Ray with 2 CPUs for this module; afterwards no raylet/gcs_server of it may remain."""
    mark = uuid.uuid4().hex
    os.environ[MARK] = mark  # inherited by the daemons Ray starts now
    try:
        current = engines_ray.start(num_cpus=2)
    finally:
        del os.environ[MARK]
    assert current.started and current.cpus == 2
    assert ray_daemons(mark), "the marked Ray daemons are not found"  # the mark reaches them
    yield current
    current.close()
    assert wait_gone(ray_daemons(mark)) == set(), "Ray processes left behind"


def _refuse_results_on_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every way a result could reach the driver fail: the old driver-side path
    (``iter_embeddings``) and Ray Data's iterators and collectors."""
    import ray.data

    def refuse(*args, **kwargs):
        raise AssertionError("a result reached the driver")

    monkeypatch.setattr(engines_ray, "iter_embeddings", refuse)
    for name in ("iter_batches", "iter_rows", "iter_torch_batches", "take", "take_all", "take_batch",
                 "to_pandas", "to_arrow_refs", "to_numpy_refs"):  # fmt: skip
        monkeypatch.setattr(ray.data.Dataset, name, refuse)


def test_shards_resume_uris_and_no_result_on_the_driver(
    folder: Path, local_csv: Path, tmp_path: Path, ray_session, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--engine ray`` with every driver-side result path refused: the images from a ``file://``
    URI (listed and read through pyarrow.fs, as s3:// and gs:// would be), ``--shard``, the
    embeddings as a directory of shards (searchable); then --resume from what a killed run leaves
    in OUT.parts/ (complete shards kept, a shard cut short dropped and redone) gives the same CSV and
    embeddings as the uninterrupted run."""
    _refuse_results_on_the_driver(monkeypatch)
    out, embeddings_dir, uri = tmp_path / "resumed.csv", tmp_path / "emb", folder.absolute().as_uri()
    assert _classify(uri, out, "--engine", "ray", "--shard", "1/2", "--embeddings", str(embeddings_dir)) == 2  # type: ignore[arg-type]
    # pyarrow.fs lists no dangling symbolic link (object stores have none): 15 files, halves of 8 and 7
    expected = [row for row in _rows(local_csv) if row["path"] != "dangling.jpg"][8:]
    ok = sum(row["status"] == "ok" for row in expected)
    summary = f"7 files: {ok} ok, {7 - ok} errors, 1 skipped"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(summary)
    first = _rows(out)
    _assert_same_rows(first, expected)
    local_emb = emb.read_embeddings(local_csv.with_suffix(".parquet"))
    ray_emb = emb.read_embeddings(embeddings_dir)
    assert ray_emb.paths == [row["path"] for row in first]
    assert (ray_emb.info.model_name, ray_emb.info.model_fingerprint, ray_emb.info.rows) == (
        local_emb.info.model_name, local_emb.info.model_fingerprint, 7)  # fmt: skip
    assert search.search(embeddings_dir, ray_emb.vectors[0], 1)[0][0].path == ray_emb.ok_paths[0]
    assert not parts.parts_dir(out).exists()
    # What a killed run leaves: the sidecar, complete shards, one shard cut short, no CSV.
    out.unlink()
    shards = parts.parts_dir(out)
    model, labels = load_clip("embedded"), LABELS.split(",")
    labeller = classify.Labeller(
        tuple(labels), model.label_features(labels, ["{}"]).numpy(), model.scoring, 3
    )
    done = classify.find_uri_inputs(uri)
    engines_ray.write_parts(model, done[0][8:11], done[1][8:11], shards, formatter=labeller,
                            with_embeddings=True, batch_size=2)  # fmt: skip
    assert len(parts.shard_files(shards)) == 2
    (shards / "cut-short.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    code = _classify(
        uri, out, "--engine", "ray", "--shard", "1/2", "--resume", "--embeddings", str(embeddings_dir)
    )  # type: ignore[arg-type]
    assert code == 2 and "途中で切れたシャード 1 個" in capsys.readouterr().err
    assert _rows(out) == first and not shards.exists()
    assert emb.read_embeddings(embeddings_dir).paths == ray_emb.paths
    code = _classify(uri, tmp_path / "x.csv")  # type: ignore[arg-type]
    assert code == 1 and "--engine ray だけ" in capsys.readouterr().err


def test_part_rows_refuse_another_model_on_the_worker() -> None:
    schema = engines_ray.parts_schema("embedded", "a" * 16)
    text = {
        key: np.array([value], dtype=object)
        for key, value in [("name", "x.jpg"), ("error", ""), ("decoder", "")]
    }
    batch = text | {"ok": np.array([True]), "pid": np.array([1]), "embedding": np.zeros((1, 4), np.float32),
                    "fingerprint": np.array(["b" * 16], dtype=object)}  # fmt: skip
    with pytest.raises(engines_ray.FingerprintMismatchError, match="b" * 16):
        engines_ray.to_part_rows(batch, "embedded", "a" * 16, None, schema)
    batch["fingerprint"] = np.array(["a" * 16], dtype=object)
    assert engines_ray.to_part_rows(batch, "embedded", "a" * 16, None, schema).to_pylist() == [
        {"path": "x.jpg", "status": "ok", "error": "", "decoder": "", "pid": 1}
    ]


def test_an_actor_that_dies_once_is_restarted_and_every_file_comes_once(
    folder: Path, local_csv: Path, tmp_path: Path, ray_session
) -> None:
    """The actor's process exits (os._exit) on the batch holding file 8, the first time only: Ray
    restarts the actor and retries that batch; every file is in the workers' shards once, with the
    local engine's statuses and embeddings."""
    marker = tmp_path / "crashed-once"

    def crash_once_encoder():  # a class made in a function travels to the workers by value
        class CrashOnce(engines_ray.Encoder):
            def __call__(self, batch):
                if 8 in batch["index"] and not marker.exists():
                    marker.touch()
                    os._exit(1)
                return super().__call__(batch)

        return CrashOnce

    model = load_clip("embedded")
    paths = classify.find_inputs(folder).files
    names = [p.relative_to(folder).as_posix() for p in paths]
    shards = tmp_path / "out.csv.parts"
    engines_ray.write_parts(
        model, paths, names, shards, with_embeddings=True, batch_size=4, encoder_cls=crash_once_encoder()
    )
    assert marker.exists(), "the actor never crashed"
    table = pa.concat_tables([pq.read_table(f) for f in parts.shard_files(shards)]).sort_by("path")
    assert table["path"].to_pylist() == names  # every file once
    assert len(set(table["pid"].to_pylist())) >= 2, "no restarted actor"
    fingerprint = pq.read_schema(parts.shard_files(shards)[0]).metadata[b"model_fingerprint"]
    assert fingerprint == model.fingerprint.encode()
    local = emb.read_embeddings(local_csv.with_suffix(".parquet"))
    assert table["status"].to_pylist() == local.status
    ok = table.filter(pc.equal(table["status"], "ok"))
    vectors = torch.tensor(ok["embedding"].to_pylist(), dtype=torch.float32)
    assert torch.allclose(vectors, local.vectors, atol=2e-3)


def test_dali_inside_the_actor_matches_the_local_dali_backend(
    folder: Path, tmp_path: Path, ray_session, capsys
) -> None:
    """``--engine ray --backend dali``: no CPU tasks, DALI decodes inside the actor (CPU pipelines
    here, GPU ones where the actor has a GPU), with the same rows as the local DALI backend, and
    the same count of files the actors handed to PIL (no silent fallback on Ray either)."""
    local, ray_out = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert _classify(folder, local, "--backend", "dali", "--workers", "0") == 2
    local_summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert _classify(folder, ray_out, "--backend", "dali", "--engine", "ray") == 2
    ray_summary = capsys.readouterr().out.strip().splitlines()[-1]
    _check_rows(_rows(ray_out))
    _assert_same_rows(_rows(ray_out), _rows(local))

    def fallbacks(summary: str) -> tuple[int, int]:
        found = re.search(r"(\d+) to PIL by header, (\d+) to PIL after DALI errors$", summary)
        assert found, summary
        return int(found[1]), int(found[2])

    assert fallbacks(local_summary)[0] > 0  # the odd files of the folder: CMYK, 16-bit, EXIF...
    assert fallbacks(ray_summary) == fallbacks(local_summary)


# ---------------------------------------------------------------- pieces, without Ray


def test_the_driver_refuses_actors_with_another_model() -> None:
    model = load_clip("embedded")
    engines_ray.check_fingerprints([model.fingerprint] * 3, model)
    with pytest.raises(engines_ray.FingerprintMismatchError, match="0123456789abcdef"):
        engines_ray.check_fingerprints([model.fingerprint, "0123456789abcdef"], model)


def test_read_and_preprocess_gives_the_local_reasons_also_through_pyarrow(folder: Path) -> None:
    """The CPU task and the actor, called directly: local paths and file:// URIs (read through
    pyarrow.fs, as s3:// would be) give the local engine's statuses, reasons and embeddings."""
    model = load_clip("embedded")
    paths = classify.find_inputs(folder).files
    local = [r for b in engines.iter_embeddings(model, paths, num_workers=0, progress=False) for r in b]
    encoder = engines_ray.Encoder("embedded")
    for names in ([str(p) for p in paths], [p.absolute().as_uri() for p in paths]):
        batch = {"index": np.arange(len(names)), "path": np.array(names, dtype=object)}
        out = encoder(engines_ray.read_and_preprocess(batch, model.preprocess_spec))
        assert out["index"].tolist() == list(range(len(paths)))
        assert set(out["fingerprint"]) == {model.fingerprint}
        for i, expected in enumerate(local):
            assert bool(out["ok"][i]) == (expected.status == "ok"), names[i]
            assert out["error"][i] == expected.error, names[i]
            if expected.status == "ok":
                assert torch.allclose(torch.from_numpy(out["embedding"][i]), expected.embedding, atol=1e-5)


@pytest.mark.parametrize(
    ("cpus", "gpus", "workers", "actors", "expected"),
    [
        (2, 0, None, None, (1, 1.0, 1, 1.0, 0.0)),
        (16, 1, None, None, (15, 1.0, 1, 1.0, 1.0)),
        (2, 0, 2, 2, (2, 0.5, 2, 0.5, 0.0)),
        (8, 4, None, None, (4, 1.0, 4, 1.0, 1.0)),
        (2, 0, 1, 2, (1, 0.666, 2, 0.666, 0.0)),  # rounded down: three shares fit in 2 CPUs
    ],
)
def test_plan_resources(cpus, gpus, workers, actors, expected) -> None:
    plan = engines_ray.plan_resources(cpus, gpus, workers, actors)
    assert (plan.num_tasks, plan.task_cpus, plan.num_actors, plan.actor_cpus, plan.actor_gpus) == expected
    assert plan.num_tasks * plan.task_cpus + plan.num_actors * plan.actor_cpus <= cpus


def test_plan_refuses_more_gpu_actors_than_gpus() -> None:
    with pytest.raises(ValueError, match="GPU"):
        engines_ray.plan_resources(16, 2, num_actors=4)


def test_each_actor_checks_its_model_once_unless_told_not_to(monkeypatch) -> None:
    """An actor on another node may load other weights than the driver: it runs check() itself."""
    from helpers import models

    calls: list[str] = []

    def fails(model):
        calls.append(model.name)
        raise models.ModelCheckError("モデル確認 NG: stub")

    monkeypatch.setattr(models, "check", fails)
    with pytest.raises(models.ModelCheckError):
        engines_ray.Encoder("embedded")
    assert calls == ["embedded"]
    encoder = engines_ray.Encoder("embedded", run_check=False)
    assert calls == ["embedded"] and encoder.fingerprint == load_clip("embedded").fingerprint
