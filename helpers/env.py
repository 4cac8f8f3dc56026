"""Where are we running? Colab or not, GPU, DALI, hub reachability, quick/full workload size."""

from __future__ import annotations

import functools
import importlib.util
import os
import platform
import socket
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HUB_HOST = "huggingface.co"


def in_colab() -> bool:
    """True inside Google Colab (its ``google.colab`` module is importable)."""
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # ``google`` exists but has no ``colab``
        return False


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def device() -> str:
    """The device the course uses: ``"cuda"`` when a GPU is there, else ``"cpu"``."""
    return "cuda" if cuda_available() else "cpu"


def gpu_name() -> str | None:
    """The GPU's marketing name (e.g. ``"Tesla T4"``), or None without CUDA."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def dali_version() -> str | None:
    """The installed NVIDIA DALI version, or None when it does not import (:func:`dali_problem` says why)."""
    try:
        import nvidia.dali as dali
    except Exception:  # not installed, or installed but broken: dali_problem() tells them apart
        return None
    return str(dali.__version__)


def _dali_requirement() -> str:
    """DALI with the pin requirements.txt gives it (what the set-up cells of 03 and 04 install)."""
    try:
        text = (Path(__file__).resolve().parents[1] / "requirements.txt").read_text(encoding="utf-8")
    except OSError:
        return "nvidia-dali-cuda120"
    pins = [line.split("#", 1)[0].replace(" ", "") for line in text.splitlines()]
    return next((pin for pin in pins if pin.startswith("nvidia-dali-cuda120")), "nvidia-dali-cuda120")


def dali_problem() -> str | None:
    """Why DALI cannot be used here, in one line (None when it imports): not installed, or installed
    but broken (with its import error: a missing CUDA library, a mismatched wheel...)."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as err:
        try:
            installed = importlib.util.find_spec("nvidia.dali") is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            return (
                "DALI が入っていません (03・04 のセットアップセルが入れます。"
                f"手で入れるなら pip install {_dali_requirement()})"
            )
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return f"DALI は入っていますが壊れています ({type(err).__name__}: {detail[:160]})"
    return None


def _dali_probe_pipeline(device_id: int | None) -> Any:
    """A pipeline that decodes one 16×16 JPEG with the ``mixed`` decoder (:func:`dali_gpu_problem`'s try)."""
    import io

    import numpy as np
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format="JPEG")
    encoded = np.frombuffer(buffer.getvalue(), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    def probe():
        jpeg = fn.external_source(source=lambda: [encoded], dtype=types.UINT8)
        return fn.decoders.image(jpeg, device="mixed", output_type=types.RGB)

    return probe()


@functools.lru_cache(maxsize=1)
def dali_gpu_problem() -> str | None:
    """Why DALI's GPU (``mixed``) pipelines cannot run here, in one line; None when they can.

    Tries it: one 16×16 JPEG through the ``mixed`` decoder on the current CUDA device, so a driver,
    CUDA or wheel mismatch shows up here (and the course falls back to the CPU, saying why) instead of
    as a raw DALI error in the middle of a notebook. Cached per process (cleared by ``cache_clear``).
    """
    if dali_version() is None:
        return dali_problem()
    if not cuda_available():
        return "GPU がありません (DALI は CPU のパイプラインだけ動きます)"
    import torch

    pipe = None
    try:
        pipe = _dali_probe_pipeline(torch.cuda.current_device())
        pipe.build()
        (images,) = pipe.run()
        shape = tuple(images.as_cpu().as_array().shape)
    except Exception as err:  # a driver, CUDA or nvJPEG failure: report it, never crash the caller
        detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return (
            f"DALI の mixed デコーダーで JPEG 1 枚をデコードできません ({type(err).__name__}: {detail[:160]})"
        )
    finally:
        del pipe
    if shape != (1, 16, 16, 3):
        return f"DALI の mixed デコーダーが 16×16 の JPEG 1 枚から {shape} を返しました"
    return None


def dali_gpu_ok() -> bool:
    """True when DALI's GPU (``mixed``) pipelines run here: a one-image ``mixed`` decode worked
    (:func:`dali_gpu_problem` says why not)."""
    return dali_gpu_problem() is None


def hub_offline_flag() -> bool:
    """True when the user switched the Hugging Face hub off (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


@functools.lru_cache(maxsize=4)
def hub_reachable(timeout: float = 3.0, host: str = HUB_HOST) -> bool:
    """True when the Hugging Face hub answers a TCP connection within ``timeout`` seconds.

    Never hangs longer than the timeout (DNS included, as far as the resolver allows);
    cached per process, so asking twice costs nothing.
    """
    if hub_offline_flag():
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "")
    if endpoint:
        host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        infos = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
        for family, kind, proto, _, address in infos[:2]:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                if sock.connect_ex(address) == 0:
                    return True
        return False
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def quick_mode() -> bool:
    """True when notebooks should use the small workload.

    ``TUTORIAL_QUICK=1``/``0`` decides when set; otherwise quick whenever there is no GPU
    or the ``CI`` variable is set.
    """
    flag = os.environ.get("TUTORIAL_QUICK", "").strip().lower()
    if flag in {"1", "true", "yes", "on"}:
        return True
    if flag in {"0", "false", "no", "off"}:
        return False
    return bool(os.environ.get("CI")) or not cuda_available()


def workload_size(full: int = 1000, quick: int = 16) -> int:
    """The number of images a benchmark uses: ``full`` on a GPU, ``quick`` otherwise."""
    return quick if quick_mode() else full


@dataclass(frozen=True)
class EnvReport:
    """A snapshot of what this runtime has."""

    python: str
    torch: str
    transformers: str | None
    colab: bool
    device: str
    gpu: str | None
    cpu_count: int
    dali: str | None
    dali_gpu: bool
    hub: bool
    quick: bool

    def rows(self) -> list[tuple[str, str]]:
        """The report as (item, value) rows, in Japanese."""

        def yes(flag: bool) -> str:
            return "はい" if flag else "いいえ"

        return [
            ("Python", self.python),
            ("PyTorch", self.torch),
            ("transformers", self.transformers or "なし"),
            ("Colab 上か", yes(self.colab)),
            ("デバイス", self.device),
            ("GPU", self.gpu or "なし"),
            ("CPU コア数", str(self.cpu_count)),
            ("DALI", self.dali or (dali_problem() or "なし")),
            ("DALI の GPU パイプライン", yes(self.dali_gpu)),
            ("Hugging Face Hub に接続", yes(self.hub)),
            ("ワークロード", "quick (小)" if self.quick else "full (本番)"),
        ]


def collect(hub_timeout: float = 3.0) -> EnvReport:
    """Gather an :class:`EnvReport` (asks the hub at most ``hub_timeout`` seconds)."""
    import torch

    try:
        import transformers

        tf_version: str | None = transformers.__version__
    except ImportError:
        tf_version = None
    return EnvReport(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=tf_version,
        colab=in_colab(),
        device=device(),
        gpu=gpu_name(),
        cpu_count=os.cpu_count() or 1,
        dali=dali_version(),
        dali_gpu=dali_gpu_ok(),
        hub=hub_reachable(hub_timeout),
        quick=quick_mode(),
    )


def report(hub_timeout: float = 3.0, file=None) -> EnvReport:
    """Print the environment as a small two-column table and return it."""
    info = collect(hub_timeout)
    rows = info.rows()
    width = max(display_width(k) for k, _ in rows) + 2
    out = file or sys.stdout
    for key, value in rows:
        print(key + " " * (width - display_width(key)) + value, file=out)
    return info


def display_width(text: str) -> int:
    """Columns ``text`` takes in a terminal: East Asian wide characters count twice."""
    return sum(2 if unicodedata.east_asian_width(ch) in {"W", "F"} else 1 for ch in text)
