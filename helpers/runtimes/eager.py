"""Eager PyTorch in bfloat16 autocast, and whether this CPU runs bfloat16 natively.

A CPU without native bfloat16 instructions (AVX512-BF16, AMX) emulates it and runs autocast
slower than float32; :func:`native_bf16` detects the instructions rather than assuming them.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from helpers.models import ClipModel
from helpers.runtimes.wrapped import WrappedClip

__all__ = ["AutocastClip", "native_bf16"]

BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags of the instructions that run bfloat16 natively on x86 CPUs."""


@functools.lru_cache(maxsize=1)
def native_bf16() -> tuple[bool, str]:
    """(does this CPU run bfloat16 natively, how that was found) from ``/proc/cpuinfo``'s flags,
    else oneDNN's own answer (``torch.ops.mkldnn._is_mkldnn_bf16_supported``)."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
        found = [f for f in BF16_FLAGS if f in flags]
        if flags:
            return bool(found), (
                f"CPU の命令 {'/'.join(found)}" if found else "CPU に avx512_bf16/amx_bf16 なし"
            )
    except OSError:
        pass
    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False, "bfloat16 対応を確かめられません"
    return supported, f"oneDNN: bfloat16 {'対応' if supported else '非対応'}"


class AutocastClip(WrappedClip):
    """``model`` with both towers under ``torch.autocast(dtype)``; features come back float32."""

    def __init__(self, model: ClipModel, dtype: torch.dtype, label: str) -> None:
        super().__init__(model, label, model.device, model.dtype)
        self.autocast = dtype

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.base._image_features(pixel_values).float()

    def _text_features(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast):
            return self.base._text_features(inputs).float()
