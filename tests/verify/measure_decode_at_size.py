"""What decoding JPEGs at reduced size (the engines' default) changes, against ``--exact-decode``.

Not collected by pytest, never run by CI. From the repository root::

    .venv/bin/python tests/verify/measure_decode_at_size.py [--n 200]

For three sets of JPEGs (the sample photos; ``--n`` workload photos of 1260×750; drawn shapes saved
as 1260×750 JPEGs) it runs both read paths of ``helpers.engines`` and prints, per model: how much
the model's input pixels move (grey levels, 0-255), the cosine between the two embeddings of each
file, and — on the model's own zero-shot labels — the largest change of a probability and the
top-1 agreement. Models: the embedded tiny CLIP (64 px; its labels mean something only on the
drawn shapes) and ``random:vit-b16`` (224 px, random weights: input and embedding changes only).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import engines
from helpers.data import make_workload, open_image, sample_photos
from helpers.fixtures import shapes
from helpers.models import load_clip, normalize, preprocess_with_spec, resize_with_spec

SHAPE_LABELS = list(shapes.LABELS)


def drawn_shapes(folder: Path, n: int) -> list[Path]:
    """``n`` drawn shapes (one label each, in turn) scaled to 1260×750 and saved as JPEG q90."""
    paths = []
    for i in range(n):
        label = SHAPE_LABELS[i % len(SHAPE_LABELS)]
        path = folder / f"shape_{i:04d}.jpg"
        shapes.draw_shape(label, 1000 + i, size=750).resize((1260, 750)).save(path, quality=90)
        paths.append(path)
    return paths


def embed(model, paths: list[Path], exact: bool) -> torch.Tensor:
    """Normalised embeddings of ``paths`` through the engine (DataLoader, 2 workers)."""
    records = [
        r
        for batch in engines.iter_embeddings(
            model, paths, "dataloader", 32, 2, progress=False, exact_decode=exact
        )
        for r in batch
    ]
    return torch.stack([r.embedding for r in records])


def input_levels(model, paths: list[Path]) -> tuple[float, float]:
    """Mean and max |Δ| of the model's input pixels (0-255) between reduced and full decoding."""
    spec = model.preprocess_spec
    means, peaks = [], []
    for path in paths:
        fast = normalize(resize_with_spec(open_image(path, at_least=spec.decode_floor()), spec), spec)
        full = preprocess_with_spec(open_image(path), spec)
        levels = (fast - full).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255
        means.append(float(levels.mean()))
        peaks.append(float(levels.max()))
    return sum(means) / len(means), max(peaks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="workload photos and drawn shapes (each)")
    parser.add_argument("--models", default="embedded,random:vit-b16", help="comma-separated load_clip names")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        sets = {
            "sample photos": [p.path for p in sample_photos()],
            f"workload 1260×750 ({args.n})": make_workload(args.n, progress=False),
            f"drawn shapes 1260×750 ({args.n})": drawn_shapes(Path(tmp), args.n),
        }
        header = (
            "| model | set | input Δ mean / max (levels) | embedding cosine min | max Δprob | top-1 agree"
        )
        print(header + " | accuracy exact → at size |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for name in args.models.split(","):
            model = load_clip(name, device="cpu")
            labels = model.label_features(SHAPE_LABELS)
            for set_name, paths in sets.items():
                fast, exact = embed(model, paths, exact=False), embed(model, paths, exact=True)
                cosine = float((fast * exact).sum(-1).min())
                mean, peak = input_levels(model, paths)
                p_fast, p_exact = model.probabilities(fast, labels), model.probabilities(exact, labels)
                dprob = float((p_fast - p_exact).abs().max())
                agree = float((p_fast.argmax(-1) == p_exact.argmax(-1)).float().mean())
                meaningful = name == "embedded" and set_name.startswith("drawn")
                truth = torch.tensor([i % len(SHAPE_LABELS) for i in range(len(paths))])
                right = [float((p.argmax(-1) == truth).float().mean()) for p in (p_exact, p_fast)]
                answers = f"{dprob:.4f} | {agree:.3f} | {right[0]:.3f} → {right[1]:.3f}"
                probs = answers if meaningful else "— | — | —"
                print(
                    f"| {name} | {set_name} | {mean:.2f} / {peak:.0f} | {cosine:.4f} | {probs} |", flush=True
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
