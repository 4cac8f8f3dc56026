"""Other precisions of an exported fp32 ONNX file: INT8 (dynamic, static QDQ) and fp16.

- :func:`int8_dynamic`: ONNX Runtime's ``quantize_dynamic``: weights stored as signed INT8 (one
  scale per tensor), activations quantised on the fly per batch. No calibration data.
- :func:`int8_static`: ``quantize_static`` in the QDQ format: weights per output channel, the
  activations' ranges fixed beforehand by running calibration images through the fp32 model
  (MinMax). MinMax keeps every intermediate output of every calibration run; ONNX Runtime's
  ``CalibMaxIntermediateOutputs`` folds them into ranges every few runs, which bounds the memory
  (:data:`CALIBRATION_CHUNK` batches of :data:`CALIBRATION_BATCH` images at a time). Only the
  matrix products and convolutions are quantised (:data:`STATIC_OPS`): a ViT's LayerNorm,
  Softmax and residual additions stay float, where per-tensor INT8 would lose most.
- :func:`fp16`: every float weight and operator in float16, inputs and outputs still float32
  (``keep_io_types``), for ONNX Runtime's CUDA provider.

The quantiser's own shape inference trips over the type annotations PyTorch's exporter leaves on
intermediate values, so each function works from a copy without them (:func:`_plain_copy`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from helpers.runtimes.export import quiet_export

__all__ = ["CALIBRATION_BATCH", "CALIBRATION_CHUNK", "STATIC_OPS", "fp16", "int8_dynamic", "int8_static"]

STATIC_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
"""What :func:`int8_static` quantises (the rest of the graph stays float32)."""
CALIBRATION_BATCH = 4
"""Images per calibration run."""
CALIBRATION_CHUNK = 4
"""Calibration runs whose intermediate outputs are kept before they are folded into ranges."""


def _plain_copy(src: Path, folder: Path) -> Path:
    """``src`` saved into ``folder`` without its ``value_info`` annotations (weights as external data)."""
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    out = folder / src.name
    onnx.save(model, str(out), save_as_external_data=True, location=src.name + ".data")
    return out


def int8_dynamic(src: str | Path, dst: str | Path) -> Path:
    """``quantize_dynamic`` of ``src`` into ``dst`` (signed INT8 weights); returns ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp, quiet_export():
        quantize_dynamic(_plain_copy(src, Path(tmp)), dst, weight_type=QuantType.QInt8)
    return dst


class _Reader:
    """ONNX Runtime's ``CalibrationDataReader`` over batches of pixel values."""

    def __init__(self, batches: Iterable[np.ndarray], input_name: str = "pixel_values") -> None:
        self._batches: Iterator[np.ndarray] = iter(batches)
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: np.ascontiguousarray(batch, dtype=np.float32)}


def int8_static(
    src: str | Path,
    dst: str | Path,
    calibration: Iterable[np.ndarray],
    per_channel: bool = True,
    chunk: int = CALIBRATION_CHUNK,
) -> Path:
    """``quantize_static`` (QDQ, MinMax ranges from ``calibration``: float32 pixel batches
    [b, 3, H, W], the model's own preprocessing) of the image tower ``src`` into ``dst``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("CalibrationReader", (_Reader, CalibrationDataReader), {})(calibration)
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory() as tmp, quiet_export():
        quantize_static(
            _plain_copy(src, Path(tmp)),
            dst,
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(STATIC_OPS),
            per_channel=per_channel,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"CalibMaxIntermediateOutputs": chunk},
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
