"""ONNX Runtime sessions that run on the provider asked for, and a :class:`ClipModel` that uses them.

ONNX Runtime falls back from a GPU execution provider to the CPU one without raising (a missing
CUDA library, a TensorRT that does not load). :func:`session` checks ``session.get_providers()``
after creating the session and refuses, in one line, when the provider asked for is not first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.models import ClipModel
from helpers.runtimes.wrapped import WrappedClip

__all__ = ["PROVIDERS", "OnnxClip", "RuntimeUnavailable", "import_onnxruntime", "session"]

PROVIDERS: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
"""Short names → ONNX Runtime's execution providers."""


class RuntimeUnavailable(RuntimeError):
    """A runtime, provider or precision cannot be used here; the message is one line saying why."""


def import_onnxruntime() -> Any:
    """``onnxruntime``, or :class:`RuntimeUnavailable` naming the package to install."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnavailable(
            "onnxruntime がありません: `pip install onnxruntime` (GPU では onnxruntime-gpu) を入れてください"
        ) from None
    return onnxruntime


def session(
    path: str | Path, provider: str = "cpu", threads: int | None = None, cache: str | Path | None = None
) -> Any:
    """An ``InferenceSession`` for ``path`` on ``provider`` (``"cpu"``, ``"cuda"``, ``"tensorrt"``).

    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core). ``cache``: the
    TensorRT engine cache folder (TensorRT builds fp16 engines there once). Raises
    :class:`RuntimeUnavailable` when the provider is not built into this onnxruntime or does not
    come first in the created session.
    """
    ort = import_onnxruntime()
    wanted = PROVIDERS[provider]
    if wanted not in ort.get_available_providers():
        raise RuntimeUnavailable(
            f"この onnxruntime {ort.__version__} には {wanted} がありません"
            f" (あるのは {', '.join(ort.get_available_providers())})"
        )
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings would land on a notebook's stderr
    if threads is not None:
        options.intra_op_num_threads = threads
    chain: list[Any] = [wanted]
    if provider == "tensorrt":
        folder = Path(cache or Path(path).parent / "trt-cache")
        folder.mkdir(parents=True, exist_ok=True)
        trt = {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(folder)}
        chain = [(wanted, trt), "CUDAExecutionProvider"]
    if provider != "cpu":
        chain.append("CPUExecutionProvider")  # for the few nodes a GPU provider does not take
    made = ort.InferenceSession(str(path), options, providers=chain)
    first = made.get_providers()[0]
    if first != wanted:
        raise RuntimeUnavailable(
            f"{wanted} を使えませんでした (ONNX Runtime は {first} に黙って切り替えました):"
            " GPU のドライバーと CUDA/cuDNN (TensorRT) のライブラリを確かめてください"
        )
    return made


class OnnxClip(WrappedClip):
    """``model`` with both towers run by ONNX Runtime sessions; everything else is ``model``'s
    (:class:`WrappedClip`). Features come back float32 on the CPU (ONNX Runtime copies to and from
    the GPU provider itself).
    """

    def __init__(self, model: ClipModel, image_session: Any, text_session: Any, label: str) -> None:
        super().__init__(model, label, torch.device("cpu"), torch.float32)
        self.image_session = image_session
        self.text_session = text_session
        self._text_inputs = [i.name for i in text_session.get_inputs()]

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        feeds = {"pixel_values": np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())}
        return torch.from_numpy(self.image_session.run(["features"], feeds)[0])

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {k: inputs[k].detach().cpu().numpy() for k in self._text_inputs}
        return torch.from_numpy(self.text_session.run(["features"], feeds)[0])

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> ClipModel:
        raise RuntimeUnavailable(
            "ONNX Runtime のモデルは .to() で動かせません: プロバイダーを選び直してください"
        )
