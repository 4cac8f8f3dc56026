"""Reading one file into a model's input: the one read path every engine uses.

The DataLoader dataset (:class:`helpers.engines.ImageFileDataset`), the Ray CPU tasks
(:func:`helpers.engines_ray.read_and_preprocess`) and the DALI router's PIL files
(:func:`helpers.dali.iter_preprocessed`) all call :func:`read_pixels`: a file gives its pixels, or
``None`` and one reason, and never raises::

    pixels, error = read_pixels(path, SizedDecode(model.preprocess_spec))

What to do with the picture is a :data:`Preprocess`:

- :class:`SizedDecode` (the default of the engines): decode JPEGs at the size the model needs,
  apply the spec's geometry, hand over **uint8** (the model's device normalises it);
- a :class:`~helpers.models.PreprocessSpec`: the whole picture, then the spec, float32 out;
- a callable on a list of PIL images (a model's own ``preprocess``), float32 out.

Paths may be local or URIs (``s3://``, ``gs://``, ``file://``: :func:`open_any`).
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from helpers.data import ImageReadError, open_image
from helpers.models import ClipModel, PreprocessSpec, preprocess_with_spec, resize_with_spec

__all__ = ["Preprocess", "SizedDecode", "open_any", "read_pixels", "worker_preprocess"]


def open_any(path: str | Path, at_least: tuple[int, str] | None = None) -> Image.Image:
    """Open one image as RGB: a local path with :func:`~helpers.data.open_image`, a URI
    (``s3://``, ``gs://``, ``file://``, ...) through ``pyarrow.fs``. Raises ``ImageReadError``
    with the same reasons either way. ``at_least``: decode JPEGs at reduced size (see
    :func:`~helpers.data.open_image`)."""
    path = str(path)
    if "://" not in path:
        return open_image(path, at_least=at_least)
    import pyarrow.fs

    name = path.rsplit("/", 1)[-1]
    try:
        filesystem, inner = pyarrow.fs.FileSystem.from_uri(path)
        with filesystem.open_input_file(inner) as handle:
            data = handle.read()
    except FileNotFoundError:
        raise ImageReadError(name, "ファイルが見つかりません (not found)") from None
    except (OSError, ValueError) as err:
        raise ImageReadError(name, f"読み取れません ({type(err).__name__}: {err})") from None
    # open_image's checks and reasons apply to the bytes as to a local file.
    with tempfile.NamedTemporaryFile(suffix=Path(name).suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        return open_image(tmp.name, at_least=at_least)


@dataclass(frozen=True)
class SizedDecode:
    """The fast read: decode at the size the model needs, apply its geometry, hand over uint8.

    Taught in notebook 02 (variant g).

    JPEGs are decoded by libjpeg at 1/2, 1/4 or 1/8 scale as long as the picture stays
    :data:`~helpers.models.base.DECODE_MARGIN` times larger than the model's input
    (:meth:`PreprocessSpec.decode_floor`); then the spec's resize, crop or letterbox; the result is
    uint8 ``[3, size, size]`` (a quarter of float32's bytes), normalised later on the model's device
    (:func:`helpers.engines.encode_batch`).
    """

    spec: PreprocessSpec

    def __call__(self, path: str | Path) -> torch.Tensor:
        image = open_any(path, at_least=self.spec.decode_floor())
        return resize_with_spec(image, self.spec)[0]


Preprocess = SizedDecode | PreprocessSpec | Callable[[list[Image.Image]], torch.Tensor]
"""What :func:`read_pixels` does with a picture (see the module docstring)."""


def worker_preprocess(model: ClipModel, exact_decode: bool = False) -> Preprocess:
    """The :data:`Preprocess` the engines run for ``model``.

    By default :class:`SizedDecode`. With ``exact_decode`` the path that reproduces
    ``model.preprocess`` exactly: the model's :class:`PreprocessSpec` (light to send to a worker)
    when the model's own preprocessing *is* :func:`~helpers.models.preprocess_with_spec`
    (``random:vit-b16``, the tiny CLIP); otherwise the model's own ``preprocess`` (an HF image
    processor, rinna's transform). With the ``fork`` start method (Linux, Colab) workers share the
    model's memory; with ``spawn`` the model is pickled to each.
    """
    if not exact_decode:
        return SizedDecode(model.preprocess_spec)
    own = type(model)._preprocess
    if own is ClipModel._preprocess or getattr(model, "processor", "own") is None:
        return model.preprocess_spec
    return model.preprocess


def read_pixels(path: str | Path, preprocess: Preprocess) -> tuple[torch.Tensor | None, str]:
    """One file → ``(pixels [3, H, W], "")``, or ``(None, reason)`` when it cannot be used.

    Never raises for a bad file: the reason is :class:`~helpers.data.ImageReadError`'s (missing,
    empty, not an image, truncated, too large...) or "前処理に失敗しました (...)" for a valid
    picture the preprocessing cannot handle. Warnings are silenced (a worker's would land on a
    notebook's stderr).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if isinstance(preprocess, SizedDecode):
                return preprocess(path), ""
            image = open_any(path)
            if isinstance(preprocess, PreprocessSpec):
                return preprocess_with_spec(image, preprocess)[0], ""
            return preprocess([image])[0], ""
        except ImageReadError as err:
            return None, err.reason
        except Exception as err:  # a valid image the preprocessing cannot handle
            return None, f"前処理に失敗しました ({type(err).__name__}: {err})"
