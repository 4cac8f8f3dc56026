"""The Ray engine: batch inference over a list of image files on Ray Data, embedded or on a cluster.

Same contract as :func:`helpers.engines.iter_embeddings` (one :class:`~helpers.engines.Record` per
file, in input order, every index exactly once; a bad file gives an ``"error"`` record), with the
work spread over Ray::

    with engines_ray.session():                          # embedded Ray on this machine (or a cluster)
        for records in engines_ray.iter_embeddings(model, paths):
            ...

The pipeline (:func:`build_dataset`)::

    from_items([{index, path}])                       the file list, listed once by the driver
      → map_batches(read_and_preprocess)  CPU tasks   read the bytes, decode, preprocess (try/except)
      → map_batches(Encoder)              actor pool  the model, loaded once per actor by name
      → iter_batches() on the driver                  Records, in input order; fingerprints checked

or, for jobs of any size (:func:`write_parts`, what ``classify --engine ray`` runs), the workers
write the results themselves and the driver receives none::

      → map_batches(to_part_rows)         CPU tasks   rows + embeddings as Arrow; fingerprints checked
      → write_parquet(OUT.parts/)         CPU tasks   Parquet shards (merged by helpers.parts)

- Files are read **inside** the task, each in its own try/except, so one unreadable file becomes an
  error row and never fails a block (``ray.data.read_images`` would fail the whole job on one bad file).
  Local paths use :func:`helpers.data.open_image` (the same reasons as the local engine); URIs such
  as ``s3://bucket/a.jpg`` or ``file:///data/a.jpg`` are read through ``pyarrow.fs``.
- CPU tasks preprocess with the model's :class:`~helpers.models.PreprocessSpec`
  (:func:`~helpers.models.preprocess_with_spec`, light to ship; exactly the embedded model's own
  preprocessing). With ``backend="dali"`` there is no CPU stage: each actor decodes its batch with
  ``helpers.dali.iter_preprocessed`` (on its GPU when it has one).
- Actors load the model with :func:`~helpers.models.prepare` by name (and check it) and report its fingerprint
  with every batch; the driver refuses a batch from a different model. One GPU per actor when the
  cluster has GPUs. Ray restarts an actor that dies and retries its batch (``max_restarts``,
  ``max_task_retries``); exceptions inside a UDF are not retried, which is why bad files never raise.

:func:`start` / :func:`session` start Ray embedded (``address=None``, no ``RAY_ADDRESS``), quiet
(no dashboard, no worker logs on the driver, Ray Data's own progress bars off), or join a cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from helpers import REPO_ROOT, embeddings
from helpers.engines import InputOrder, Record, Staging, dali_engine_available, encode_batch, resolve_backend
from helpers.models import ClipModel, PreprocessSpec, prepare
from helpers.reading import Preprocess, SizedDecode, open_any, read_pixels

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

    from helpers.dali import Fallbacks

__all__ = [
    "Encoder",
    "FingerprintMismatchError",
    "RayEngineError",
    "RaySession",
    "ResourcePlan",
    "RowFormatter",
    "RunStats",
    "actor_memory",
    "build_dataset",
    "check_fingerprints",
    "count_decoder",
    "iter_embeddings",
    "parts_schema",
    "plan_resources",
    "read_and_preprocess",
    "read_image",
    "session",
    "shutdown",
    "start",
    "to_part_rows",
    "write_parts",
]

STARTUP_ATTEMPTS: int = 3
"""How often :func:`start` tries embedded Ray whose node misses Ray's fixed start-up wait (busy machine)."""

QUIET_LOGGERS: tuple[str, ...] = ("ray", "ray.data", "ray.train", "ray.tune")
"""Loggers set to ERROR by a quiet :func:`start`: INFO lines and notices would land on stderr."""


class RayEngineError(RuntimeError):
    """The Ray engine cannot run: Ray missing, a cluster that does not answer, a model mismatch."""


class FingerprintMismatchError(RayEngineError):
    """An actor runs a different model (weights or config) than the one the driver expects."""


# ---------------------------------------------------------------- starting and joining Ray


@dataclass
class RaySession:
    """A Ray connection made by :func:`start`."""

    address: str | None
    """The cluster joined, or None for Ray embedded in this process's machine."""
    started: bool
    """True when :func:`start` connected (so :meth:`close` disconnects); False when Ray was already up."""
    seconds: float
    """How long connecting took."""
    resources: dict[str, float] = field(default_factory=dict)
    """The cluster's total resources (``CPU``, ``GPU``, memory...)."""
    reused: bool = False
    """True when Ray was already up in this process and :func:`start` only reused it."""
    attempts: int = 1
    """How many starts embedded Ray took (more than 1 when its node missed Ray's start-up wait)."""

    @property
    def cpus(self) -> float:
        return float(self.resources.get("CPU", 0.0))

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0.0))

    def close(self) -> None:
        """Shut Ray down if this session started it (embedded Ray stops its processes)."""
        if self.started:
            shutdown()
            self.started = False

    def describe(self) -> str:
        """One line: where Ray runs and what it has."""
        if self.reused:
            where = "起動済みの Ray を使用"
        else:
            where = f"クラスター {self.address}" if self.address else "このマシンに組み込み (embedded)"
        tries = f"、{self.attempts} 回目の起動で" if self.attempts > 1 else ""
        return f"Ray: {where}, CPU {self.cpus:g}, GPU {self.gpus:g} (接続 {self.seconds:.1f} 秒{tries})"


def _quiet_ray() -> None:
    """Ray's Python loggers to ERROR and Ray Data's own progress bars and notices off."""
    from ray.data import DataContext  # importing Ray Data configures its loggers: quieten them after

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False


@contextlib.contextmanager
def _stderr_filtered(drop: Sequence[str]) -> Iterator[None]:
    """Capture what C++ code writes to file descriptor 2; re-emit the lines not containing ``drop``."""
    try:
        fd = sys.__stderr__.fileno() if sys.__stderr__ is not None else 2
        saved = os.dup(fd)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines()
                if line.strip() and not any(d in line for d in drop)
            ]
            if kept:
                print("\n".join(kept), file=sys.stderr)


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore the old values."""
    old = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why a ``host:port`` or ``ray://host:port`` address refuses a TCP connection, else None.

    Ray itself keeps retrying an address that does not answer for many minutes; this answers in
    ``timeout`` seconds. Addresses of other forms (``auto``...) are left to Ray.
    """
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


def start(
    address: str | None = None,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    quiet: bool = True,
) -> RaySession:
    """Connect to Ray: ``address`` (e.g. ``"ray://head:10001"`` or ``"head:6379"``), else
    ``$RAY_ADDRESS``, else start Ray embedded on this machine with ``num_cpus`` CPUs (default: all).

    Reuses a Ray that is already up (``started`` is then False). Embedded Ray runs without a
    dashboard, and its workers find ``helpers`` through ``PYTHONPATH``; on a cluster the ``helpers``
    package is shipped to the workers (``runtime_env`` ``py_modules``): the nodes need the
    course's requirements installed. Token authentication in Ray 2.60 (read in its source,
    ``ray/_private/authentication/authentication_token_setup.py``): a new local ``ray.init()`` (embedded
    Ray) turns it on unless ``RAY_AUTH_MODE`` is set, creating ``~/.ray/auth_token`` if missing;
    ``ray start --head`` turns it on only with ``RAY_AUTH_MODE=token``, or with ``RAY_AUTH_MODE``
    unset and a token already there (``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``); joining an
    explicit address never turns it on, so joining such a cluster needs ``RAY_AUTH_MODE=token``
    and its token.
    With ``quiet``, nothing is written to stderr: worker output stays in Ray's log files
    (``/tmp/ray/session_latest/logs``), Ray's loggers report errors only, and Ray Data's own
    progress bars are off (the engine shows its own). Embedded Ray whose node misses Ray's fixed
    30-second start-up wait (a busy machine) is started again, up to :data:`STARTUP_ATTEMPTS`
    times (``attempts`` and :meth:`RaySession.describe` say so), then :class:`RayEngineError`.
    """
    try:
        import ray
    except ImportError:
        raise RayEngineError(
            "Ray がインストールされていません: pip install 'ray[data]==2.60.0' で入れてください"
            " (requirements.txt にあります)"
        ) from None

    if ray.is_initialized():
        if quiet:
            _quiet_ray()
        return RaySession(None, False, 0.0, dict(ray.cluster_resources()), reused=True)
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "log_to_driver": not quiet,
        "logging_level": logging.ERROR if quiet else logging.INFO,
    }
    # For the processes Ray starts (read while ray.init runs; the driver's environment is restored):
    # no usage-stats call home; embedded workers import ``helpers`` from this checkout; when quiet,
    # no C++ notice on stderr (the core worker logs at ERROR that Ray Data's restartable actors
    # have constructor arguments in the object store: a notice, not an error).
    variables = {"RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0")}
    if quiet:
        variables["RAY_BACKEND_LOG_LEVEL"] = os.environ.get("RAY_BACKEND_LOG_LEVEL", "fatal")
    if address is None:
        paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
        if str(REPO_ROOT) not in paths:
            variables["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), *paths] if p)
        kwargs |= {"address": "local", "num_cpus": num_cpus, "num_gpus": num_gpus, "include_dashboard": False}
    else:  # a cluster: ship the helpers package to its workers
        why = _unreachable(address)
        if why is not None:
            raise RayEngineError(
                f"Ray クラスター {address} に接続できません ({why}): アドレスを確かめてください"
            )
        kwargs |= {"address": address, "runtime_env": {"py_modules": [str(REPO_ROOT / "helpers")]}}
    begin = time.perf_counter()
    drop = ["Set ray log level from environment variable"]
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        with _environment(variables), _stderr_filtered(drop) if quiet else contextlib.nullcontext():
            try:
                ray.init(**kwargs)
                break
            except (ConnectionError, TimeoutError) as err:
                raise RayEngineError(
                    f"Ray クラスター {address} に接続できません ({err})。アドレスを確かめてください。"
                    " クラスターがトークン認証を使っているなら (RAY_AUTH_MODE=token で、またはトークンのある"
                    "ヘッドノードで ray start したとき)、こちらにも RAY_AUTH_MODE=token と同じトークン"
                    " (~/.ray/auth_token または RAY_AUTH_TOKEN) が要ります"
                ) from None
            except Exception as err:  # Ray raises a bare Exception when its node misses its fixed 30 s start
                if address is not None or "timed out during startup" not in str(err):
                    raise
                ray.shutdown()  # what did start of that node
        if attempt == STARTUP_ATTEMPTS:
            raise RayEngineError(
                f"組み込みの Ray が {STARTUP_ATTEMPTS} 回とも時間内 (Ray の固定の 30 秒) に"
                "起動しませんでした: マシンが混んでいます。少し待ってからもう一度実行してください"
            )
    seconds = time.perf_counter() - begin
    if quiet:
        _quiet_ray()
    return RaySession(address, True, seconds, dict(ray.cluster_resources()), attempts=attempt)


def shutdown() -> None:
    """Disconnect from Ray; embedded Ray stops its processes (raylet, GCS, workers)."""
    try:
        import ray
    except ImportError:  # nothing to shut down
        return
    if ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def session(
    address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None, quiet: bool = True
) -> Iterator[RaySession]:
    """:func:`start` for the duration of a ``with`` block; shuts Ray down after it if it started it."""
    current = start(address, num_cpus, num_gpus, quiet)
    try:
        yield current
    finally:
        current.close()


# ---------------------------------------------------------------- reading and preprocessing (CPU tasks)


read_image = open_any
"""Open a local path or a URI as RGB (:func:`helpers.reading.open_any`, under the name notebook 07 uses)."""


def read_and_preprocess(
    batch: dict[str, np.ndarray], spec: PreprocessSpec, exact_decode: bool = False
) -> dict[str, np.ndarray]:
    """A Ray Data batch ``{index, path}`` → ``{index, ok, error, pixels}``, one row per file.

    Each file is read and preprocessed in its own try/except: a bad file gives ``ok=False``, its
    reason in ``error`` and zero pixels, and the rest of the batch goes on. ``pixels`` are uint8 at
    the model's input size from a reduced-size JPEG decode (the actor normalises them), or with
    ``exact_decode`` normalised float32 from the full picture.
    """
    n = len(batch["index"])
    preprocess: Preprocess = spec if exact_decode else SizedDecode(spec)
    pixels = np.zeros((n, 3, spec.size, spec.size), dtype=np.float32 if exact_decode else np.uint8)
    ok = np.zeros(n, dtype=bool)
    errors = [""] * n
    for row, path in enumerate(batch["path"]):
        prepared, errors[row] = read_pixels(str(path), preprocess)  # the engines' one read path
        if prepared is not None:
            pixels[row] = prepared.numpy()
            ok[row] = True
    out = {"index": batch["index"], "ok": ok, "error": np.array(errors, dtype=object), "pixels": pixels}
    return out | ({"name": batch["name"]} if "name" in batch else {})


# ---------------------------------------------------------------- the model (actors)


class Encoder:
    """The actor of the pool: loads the model by name once, then encodes batch after batch.

    Input rows carry ``pixels`` (from :func:`read_and_preprocess`) or, with ``dali=True``, only
    ``path`` (the actor decodes with ``helpers.dali``). Output rows: ``index``, ``ok``, ``error``,
    ``embedding`` (L2-normalised float32 [D]; zeros for errors), ``fingerprint`` and ``pid`` (which
    actor process did it). Subclass and override :meth:`__call__` to watch the pool (the notebook
    makes one fail once).
    """

    def __init__(
        self,
        model_name: str,
        amp: bool = True,
        dali: bool = False,
        dali_threads: int = 2,
        run_check: bool = True,
        trust_remote_code: bool = False,
    ) -> None:
        # Checked once here too: an actor on another node may load other weights than the driver.
        self.model: ClipModel = prepare(model_name, run_check=run_check, trust_remote_code=trust_remote_code)[
            0
        ]
        self.fingerprint = self.model.fingerprint
        self.amp = amp
        self.dali = dali
        self.dali_threads = dali_threads
        self.pid = os.getpid()
        self.staging = Staging()
        with torch.inference_mode():
            self.dim = int(self.model.encode_texts(["次元"]).shape[-1])

    def _dali_pixels(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Decode ``batch['path']`` with DALI in this actor: ``{index, ok, error, pixels}``."""
        from helpers import dali

        paths = [Path(str(p)) for p in batch["path"]]
        spec, n = self.model.preprocess_spec, len(paths)
        pixels = np.zeros((n, 3, spec.size, spec.size), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        errors = [""] * n
        device = "gpu" if self.model.device.type == "cuda" else "cpu"
        fallbacks = dali.Fallbacks()
        for indices, batch_pixels, bad in dali.iter_preprocessed(
            paths, spec, batch_size=n, device=device, num_threads=self.dali_threads, fallbacks=fallbacks
        ):
            if len(indices):
                pixels[list(indices)] = batch_pixels.float().cpu().numpy()
                ok[list(indices)] = True
            for i, reason in bad.items():
                errors[int(i)] = str(reason)
        decoder = ["dali" if ok[i] else "" for i in range(n)]
        for i, (kind, reason) in fallbacks.pil_files.items():
            decoder[i] = f"{kind}:{reason}"
        out = {
            "index": batch["index"],
            "ok": ok,
            "error": np.array(errors, dtype=object),
            "pixels": pixels,
            "decoder": np.array(decoder, dtype=object),
        }
        return out | ({"name": batch["name"]} if "name" in batch else {})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.dali:
            batch = self._dali_pixels(batch)
        ok = np.asarray(batch["ok"], dtype=bool)
        n = len(ok)
        embedding = np.zeros((n, self.dim), dtype=np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            embedding[ok] = encode_batch(self.model, pixels, self.amp, self.staging).numpy()
        out = {
            "index": np.asarray(batch["index"], dtype=np.int64),
            "ok": ok,
            "error": batch["error"],
            "decoder": batch.get("decoder", np.array([""] * n, dtype=object)),
            "embedding": embedding,
            "fingerprint": np.array([self.fingerprint] * n, dtype=object),
            "pid": np.full(n, self.pid, dtype=np.int64),
        }
        return out | ({"name": batch["name"]} if "name" in batch else {})


# ---------------------------------------------------------------- the plan


ACTOR_MEMORY_MIN: int = 512 * 1024**2
"""The least memory an actor reserves (bytes): its Python, torch and the model's activations."""


@dataclass(frozen=True)
class ResourcePlan:
    """How many CPU tasks and actors run at once, and what each one reserves from Ray."""

    num_tasks: int
    task_cpus: float
    num_actors: int
    actor_cpus: float
    actor_gpus: float
    actor_memory: int
    """Bytes of memory each actor reserves (Ray schedules it only where that much is free)."""


def actor_memory(model: ClipModel) -> int:
    """Memory an actor holding ``model`` reserves: three times its weights in float32, at least
    :data:`ACTOR_MEMORY_MIN`."""
    return max(ACTOR_MEMORY_MIN, 3 * 4 * model.n_params)


def plan_resources(
    cpus: float,
    gpus: float,
    num_workers: int | None = None,
    num_actors: int | None = None,
    memory: int = ACTOR_MEMORY_MIN,
) -> ResourcePlan:
    """The resource plan for a cluster with ``cpus`` CPUs and ``gpus`` GPUs.

    With GPUs: one actor per GPU (1 GPU + 1 CPU each), the other CPUs run preprocessing tasks.
    Without: one actor (it computes on the CPU) and one task per other CPU. When the tasks and
    actors asked for need more CPUs than there are, each reserves an equal share so that all of
    them fit at once (Ray's CPU counts are reservations for scheduling, not cores).
    """
    total = max(1.0, float(cpus))
    gpu_actors = int(gpus) >= 1
    actors = num_actors or (int(gpus) if gpu_actors else 1)
    if gpu_actors and actors > int(gpus):  # an actor without its GPU would wait for ever
        raise ValueError(f"{actors} 個のアクターに GPU が 1 枚ずつ要りますが、GPU は {int(gpus)} 枚です")
    tasks = num_workers or max(1, int(total) - actors)
    # rounded down, so that all of them fit (three times 0.667 would be more than 2 CPUs)
    share = 1.0 if tasks + actors <= total else math.floor(1000 * total / (tasks + actors)) / 1000
    return ResourcePlan(tasks, share, actors, share, 1.0 if gpu_actors else 0.0, memory)


def build_dataset(
    model_name: str,
    paths: Sequence[str],
    spec: PreprocessSpec,
    plan: ResourcePlan,
    batch_size: int = 64,
    amp: bool = True,
    dali: bool = False,
    encoder_cls: type[Encoder] = Encoder,
    run_check: bool = True,
    trust_remote_code: bool = False,
    exact_decode: bool = False,
    names: Sequence[str] | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: file list → CPU tasks (read + preprocess) → actor pool (model).

    ``names`` (one per path, e.g. the path relative to the folder) travel with the rows as a
    ``name`` column. Ray Data starts its actors with ``max_restarts=-1`` and ``max_task_retries=-1``:
    an actor whose process dies is restarted (its ``__init__`` runs again) and the batch it held is
    retried.
    """
    import ray.data
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    items = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
    if names is not None:
        if len(names) != len(items):
            raise ValueError(f"{len(names)} names for {len(items)} paths")
        items = [item | {"name": str(name)} for item, name in zip(items, names, strict=True)]
    blocks = max(1, math.ceil(len(items) / batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    if not dali:
        ds = ds.map_batches(
            read_and_preprocess,
            fn_kwargs={"spec": spec, "exact_decode": exact_decode},
            batch_size=batch_size,
            batch_format="numpy",
            compute=TaskPoolStrategy(size=plan.num_tasks),
            num_cpus=plan.task_cpus,
        )
    return ds.map_batches(
        encoder_cls,
        fn_constructor_kwargs={
            "model_name": model_name,
            "amp": amp,
            "dali": dali,
            "run_check": run_check,
            "trust_remote_code": trust_remote_code,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.actor_cpus,
        num_gpus=plan.actor_gpus or None,
        memory=plan.actor_memory,
    )


# ---------------------------------------------------------------- the driver


@dataclass
class RunStats:
    """What a run did; pass one to :func:`iter_embeddings` and read it during or after the run."""

    rows: int = 0
    ok: int = 0
    errors: int = 0
    duplicates: int = 0
    """Rows that came back a second time (a retried batch) and were dropped."""
    seconds: float = 0.0
    startup_seconds: float = 0.0
    """Connecting to Ray (0 when it was already up)."""
    pids: Counter = field(default_factory=Counter)
    """Rows per actor process id."""
    plan: ResourcePlan | None = None
    ray_stats: str = ""
    """Ray Data's own account of a :func:`write_parts` run (``Dataset.stats()``: time and rows per stage)."""

    @property
    def images_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def check_fingerprints(fingerprints: Sequence[str], model: ClipModel) -> None:
    """Raise :class:`FingerprintMismatchError` unless every actor ran ``model`` (same fingerprint)."""
    wrong = {str(f) for f in fingerprints} - {model.fingerprint}
    if wrong:
        raise FingerprintMismatchError(_mismatch(model.name, model.fingerprint, sorted(wrong)[0]))


def _mismatch(name: str, expected: str, found: str) -> str:
    return (
        f"アクターが読み込んだモデル {name} (fingerprint {found}) が、ドライバーのモデル"
        f" ({expected}) と違います: すべてのノードで同じ重み (同じ版) を使ってください"
    )


def count_decoder(fallbacks: Fallbacks, decoder: str, times: int = 1) -> None:
    """Count ``times`` rows whose ``decoder`` column is ``decoder`` (``"dali"``, ``"by_design:REASON"``,
    ``"after_error:REASON"``)."""
    if decoder == "dali":
        fallbacks.dali += times
    elif ":" in decoder:
        kind, reason = decoder.split(":", 1)
        (fallbacks.by_design if kind == "by_design" else fallbacks.after_error)[reason] += times


@contextlib.contextmanager
def _planned_dataset(
    model: ClipModel,
    files: list[str],
    backend: str,
    batch_size: int,
    amp: bool,
    address: str | None,
    num_cpus: int | None,
    num_workers: int | None,
    num_actors: int | None,
    stats: RunStats,
    encoder_cls: type[Encoder],
    **options: Any,
) -> Iterator[tuple[ray.data.Dataset, ResourcePlan]]:
    """Start (or join) Ray, plan the resources and build :func:`build_dataset`'s pipeline of ``files``;
    the session is closed on the way out. ``options`` go to :func:`build_dataset`. What
    :func:`iter_embeddings` and :func:`write_parts` share."""
    dali = resolve_backend(backend) == "dali"
    if dali and not dali_engine_available():
        raise RayEngineError(
            "DALI バックエンドを使えません (helpers.dali がない): --backend dataloader を使ってください"
        )
    ray_session = start(address=address, num_cpus=num_cpus)
    stats.startup_seconds = ray_session.seconds
    try:
        plan = plan_resources(
            ray_session.cpus, ray_session.gpus, num_workers, num_actors, actor_memory(model)
        )
        stats.plan = plan
        dataset = build_dataset(
            model.name, files, model.preprocess_spec, plan, batch_size, amp, dali, encoder_cls, **options
        )
        yield dataset, plan
    finally:
        ray_session.close()


def iter_embeddings(
    model: ClipModel,
    paths: Sequence[str | Path],
    backend: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    amp: bool = True,
    progress: bool = True,
    *,
    num_actors: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    stats: RunStats | None = None,
    encoder_cls: type[Encoder] = Encoder,
    run_check: bool = True,
    trust_remote_code: bool = False,
    exact_decode: bool = False,
    fallbacks: Fallbacks | None = None,
) -> Iterator[list[Record]]:
    """Embed every file of ``paths`` on Ray: lists of Records in input order, each index once.

    ``model`` is the driver's copy: its ``name`` is what the actors load and its ``fingerprint``
    what they must match (else :class:`FingerprintMismatchError`). ``backend``: ``"dali"`` decodes
    inside the actors, ``"auto"`` picks it when DALI and a GPU are here, else CPU tasks.
    ``num_workers`` CPU tasks and ``num_actors`` actors run at once (default: :func:`plan_resources`).
    Ray is started with :func:`start` (``address``, ``num_cpus``) unless it is up already, and shut
    down at the end if this call started it. ``progress`` shows a bar of rows done. Every actor runs
    :func:`helpers.models.check` once after loading unless ``run_check`` is False; ``trust_remote_code``
    is passed to its :func:`helpers.models.load_clip`. The CPU tasks send uint8 pixels from a reduced-size
    JPEG decode unless ``exact_decode`` (see :func:`read_and_preprocess`). With the DALI backend,
    ``fallbacks`` (a :class:`helpers.dali.Fallbacks`) sums what the actors decoded with PIL, and why.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    files = [str(p) for p in paths]
    stats = stats if stats is not None else RunStats()
    if not files:
        return
    with _planned_dataset(
        model,
        files,
        backend,
        batch_size,
        amp,
        address,
        num_cpus,
        num_workers,
        num_actors,
        stats,
        encoder_cls,
        run_check=run_check,
        trust_remote_code=trust_remote_code,
        exact_decode=exact_decode,
    ) as (dataset, _plan):
        begin = time.perf_counter()
        order = InputOrder(len(files), on_duplicate="count")
        with tqdm(total=len(files), unit="枚", desc="Ray", disable=not progress) as bar:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                check_fingerprints(batch["fingerprint"], model)
                for index, ok, error, embedding, pid, decoder in zip(
                    batch["index"],
                    batch["ok"],
                    batch["error"],
                    batch["embedding"],
                    batch["pid"],
                    batch["decoder"],
                    strict=True,
                ):
                    index, path, seen = int(index), Path(files[int(index)]), order.duplicates
                    if ok:
                        order.add(index, Record(index, path, "ok", torch.from_numpy(np.array(embedding))))
                    else:
                        order.add(index, Record(index, path, "error", None, str(error) or "読めませんでした"))
                    if order.duplicates == seen:  # counted once, the first time it arrives
                        stats.pids[int(pid)] += 1
                        if fallbacks is not None:
                            count_decoder(fallbacks, str(decoder))
                stats.duplicates = order.duplicates
                ready = order.ready()
                if ready:
                    stats.rows += len(ready)
                    stats.ok += sum(r.status == "ok" for r in ready)
                    stats.errors += sum(r.status == "error" for r in ready)
                    stats.seconds = time.perf_counter() - begin
                    bar.update(len(ready))
                    yield ready
        if order.next_index != len(files):
            raise RayEngineError(f"Ray から {len(files) - order.next_index} 件の結果が返りませんでした")


# ---------------------------------------------------------------- workers write, the driver counts


PART_COLUMNS: tuple[str, ...] = ("path", "status", "error", "decoder", "pid")
"""The columns every shard of :func:`write_parts` has (then the formatter's, then ``embedding``)."""


class RowFormatter(Protocol):
    """Turns a batch of embeddings into string columns (e.g. classify's labels and probabilities)."""

    columns: Sequence[str]

    def __call__(self, vectors: np.ndarray, ok: np.ndarray) -> dict[str, list[str]]: ...


def parts_schema(
    model_name: str, model_fingerprint: str, columns: Sequence[str] = (), with_embeddings: bool = False
) -> pa.Schema:
    """The Arrow schema of :func:`write_parts`' shards, with the model metadata of an embeddings file."""
    import pyarrow as pa

    fields = [pa.field(c, pa.int64() if c == "pid" else pa.string()) for c in (*PART_COLUMNS, *columns)]
    if with_embeddings:
        fields.append(embeddings.schema(model_name, model_fingerprint).field("embedding"))
    metadata = {embeddings.MODEL_NAME_KEY: model_name, embeddings.MODEL_FINGERPRINT_KEY: model_fingerprint}
    return pa.schema(fields, metadata=metadata)


def to_part_rows(
    batch: dict[str, np.ndarray],
    model_name: str,
    model_fingerprint: str,
    formatter: RowFormatter | None,
    schema: pa.Schema,
) -> pa.Table:
    """An encoded batch (:class:`Encoder`'s output with ``name``) → the rows of a shard, on a worker.

    Raises :class:`FingerprintMismatchError` when the actor ran another model than the driver's.
    """
    import pyarrow as pa

    wrong = {str(f) for f in batch["fingerprint"]} - {model_fingerprint}
    if wrong:
        raise FingerprintMismatchError(_mismatch(model_name, model_fingerprint, sorted(wrong)[0]))
    ok = np.asarray(batch["ok"], dtype=bool)
    vectors = np.asarray(batch["embedding"], dtype=np.float32).reshape(len(ok), -1)
    columns: dict[str, Any] = {
        "path": [str(n) for n in batch["name"]],
        "status": ["ok" if good else "error" for good in ok],
        "error": [
            "" if good else (str(e) or "読めませんでした") for good, e in zip(ok, batch["error"], strict=True)
        ],
        "decoder": [str(d) for d in batch["decoder"]],
        "pid": np.asarray(batch["pid"], dtype=np.int64),
    }
    if formatter is not None:
        columns |= formatter(vectors, ok)
    if "embedding" in schema.names:
        columns["embedding"] = embeddings.embedding_array(vectors, ok)
    return pa.table({name: columns[name] for name in schema.names}, schema=schema)


def write_parts(
    model: ClipModel,
    paths: Sequence[str | Path],
    names: Sequence[str],
    out_dir: str | Path,
    *,
    formatter: RowFormatter | None = None,
    with_embeddings: bool = False,
    backend: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    num_actors: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    stats: RunStats | None = None,
    encoder_cls: type[Encoder] = Encoder,
    run_check: bool = True,
    trust_remote_code: bool = False,
    exact_decode: bool = False,
    amp: bool = True,
) -> RunStats:
    """Embed every file of ``paths`` on Ray and let the workers write the results as Parquet shards.

    The pipeline of :func:`build_dataset`, then :func:`to_part_rows` (one row per file: ``names``
    as ``path``, status, error, the ``formatter``'s columns and, with ``with_embeddings``, the
    embedding) and Ray Data's ``write_parquet`` into ``out_dir`` (local folder or URI; files named
    by Ray, a new write appends). The driver receives no rows and no embeddings: ``stats`` holds
    only the time (read the shards for counts, :mod:`helpers.parts`). Other arguments as
    :func:`iter_embeddings`.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    stats = stats if stats is not None else RunStats()
    files = [str(p) for p in paths]
    if not files:
        return stats
    with _planned_dataset(
        model,
        files,
        backend,
        batch_size,
        amp,
        address,
        num_cpus,
        num_workers,
        num_actors,
        stats,
        encoder_cls,
        run_check=run_check,
        trust_remote_code=trust_remote_code,
        exact_decode=exact_decode,
        names=names,
    ) as (dataset, plan):
        schema = parts_schema(
            model.name, model.fingerprint, formatter.columns if formatter else (), with_embeddings
        )
        dataset = dataset.map_batches(
            to_part_rows,
            fn_kwargs={
                "model_name": model.name,
                "model_fingerprint": model.fingerprint,
                "formatter": formatter,
                "schema": schema,
            },
            batch_size=None,
            batch_format="numpy",
            num_cpus=plan.task_cpus,
        )
        begin = time.perf_counter()
        try:
            dataset.write_parquet(str(out_dir), schema=schema, **embeddings.parquet_options(schema.names))
        except Exception as err:  # Ray wraps what a worker raised: say the engine's own error
            cause = _engine_cause(err)
            if cause is not None:
                raise cause from None
            raise
        stats.seconds = time.perf_counter() - begin
        stats.ray_stats = dataset.stats()
        return stats


def _engine_cause(err: BaseException) -> RayEngineError | None:
    """The engine's own error that a worker raised, found in the chain Ray wraps it in."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if type(current) in (RayEngineError, FingerprintMismatchError):  # not Ray's wrapping subclasses
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None
