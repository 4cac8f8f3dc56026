"""Other precisions of an exported fp32 ONNX file: INT8 (dynamic, static QDQ) and fp16.

- :func:`int8_dynamic`: ONNX Runtime's ``quantize_dynamic``: weights stored as signed INT8 (one
  scale per tensor), activations quantised on the fly per batch. No calibration data.
- :func:`int8_static`: ``quantize_static`` in the QDQ format: weights per output channel, the
  activations' ranges fixed beforehand by running calibration images through the fp32 model
  (MinMax). MinMax keeps every intermediate output of every calibration run; ONNX Runtime's
  ``CalibStridedMinMax`` calibrates a window of runs at a time and merges the ranges, which bounds
  the memory (:data:`CALIBRATION_CHUNK` batches of :data:`CALIBRATION_BATCH` images at a time).
  Not ``CalibMaxIntermediateOutputs``: in onnxruntime 1.31.1 it drops the outputs it has kept
  every that many runs without folding them into the ranges (the ranges then come from the last
  few runs only, and a run count that is a multiple of it fails with "No data is collected"). Only the
  matrix products and convolutions are quantised (:data:`STATIC_OPS`): a ViT's LayerNorm,
  Softmax and residual additions stay float, where per-tensor INT8 would lose most.
- :func:`fp16`: every float weight and operator in float16, inputs and outputs still float32
  (``keep_io_types``), for ONNX Runtime's CUDA provider.

The quantiser's own shape inference trips over the type annotations PyTorch's exporter leaves on
intermediate values, so each function works from a copy without them (:func:`plain_copy`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from helpers.runtimes.export import quiet_export

__all__ = [
    "CALIBRATION_BATCH",
    "CALIBRATION_CHUNK",
    "STATIC_OPS",
    "PixelBatches",
    "fp16",
    "int8_dynamic",
    "int8_static",
    "plain_copy",
    "stride_for",
]

STATIC_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
"""What :func:`int8_static` quantises (the rest of the graph stays float32)."""
CALIBRATION_BATCH = 4
"""Images per calibration run."""
CALIBRATION_CHUNK = 4
"""The most calibration runs whose intermediate outputs are held at once (:func:`stride_for`)."""


def plain_copy(src: Path, folder: Path) -> Path:
    """``src`` saved into ``folder`` without its ``value_info`` annotations (weights as external data)."""
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    out = folder / src.name
    onnx.save(model, str(out), save_as_external_data=True, location=src.name + ".data")
    return out


def int8_dynamic(src: Path, dst: Path) -> Path:
    """``quantize_dynamic`` of ``src`` into ``dst``: INT8 weights, activations quantised per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, quiet_export():
        quantize_dynamic(plain_copy(src, Path(tmp)), dst, weight_type=QuantType.QInt8)
    return dst


class PixelBatches:
    """ONNX Runtime's calibration reader over float32 pixel batches: ``get_next`` one batch at a
    time, and ``__len__``/``set_range`` for ``CalibStridedMinMax`` (a window of the batches per pass)."""

    def __init__(self, batches: Iterable[np.ndarray], name: str = "pixel_values") -> None:
        self.batches = list(batches)
        self.name = name
        self.set_range(0, len(self.batches))

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.window = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.window, None)
        return None if batch is None else {self.name: batch}


def stride_for(batches: int, chunk: int = CALIBRATION_CHUNK) -> int:
    """The largest window of at most ``chunk`` batches that divides ``batches`` (ONNX Runtime needs that)."""
    return max(d for d in range(1, min(chunk, batches) + 1) if batches % d == 0)


def int8_static(
    src: Path, dst: Path, calibration: Iterable[np.ndarray], chunk: int = CALIBRATION_CHUNK
) -> Path:
    """``quantize_static`` (QDQ, per-channel weights) of the image tower ``src`` into ``dst``, the
    activations' ranges from ``calibration`` (float32 pixel batches), ``chunk`` batches per pass."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    reader = PixelBatches(calibration)
    with tempfile.TemporaryDirectory() as tmp, quiet_export():
        quantize_static(
            plain_copy(src, Path(tmp)),
            dst,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(STATIC_OPS),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"CalibStridedMinMax": stride_for(len(reader), chunk)},
        )
    return dst


def fp16(src: str | Path, dst: str | Path) -> Path:
    """``src`` with float16 weights and operators, float32 inputs and outputs; returns ``dst``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    with quiet_export():
        half = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(half, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return dst
