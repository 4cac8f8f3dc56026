"""How close ``python -m helpers.classify`` gets to the CPU's decode ceiling, on this machine.

Not collected by pytest, never run by CI. From the repository root::

    .venv/bin/python tests/verify/measure_classify_speed.py [--n 512] [--rounds 3]

The ceiling: two processes that only read the workload JPEGs (1260×750, distinct) with PIL,
decoding each at reduced size (``Image.draft("RGB", (224, 224))``, libjpeg's DCT-domain downscale)
and resizing its shorter side to 224 — the least work any read path must do for a 224-px model.
Against it, the command on the same files with a cheap 224-px model (a one-layer random CLIP saved
to a temporary folder, ``--no-check``) in its default mode and with ``--exact-decode``; its
images/s is the summary line's (from the first batch request to the last row written). The
variants run interleaved, ``--rounds`` times; the table gives median, min and max, and the ratio
to the ceiling of the same round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _decode_resize(paths: list[str]) -> int:
    from PIL import Image

    for path in paths:
        with Image.open(path) as image:
            image.draft("RGB", (224, 224))
            image = image.convert("RGB")
            w, h = image.size
            scale = 224 / min(w, h)
            image.resize((max(224, round(w * scale)), max(224, round(h * scale))), Image.Resampling.BICUBIC)
    return len(paths)


def ceiling(paths: list[Path], processes: int = 2) -> float:
    """Images/s of ``processes`` processes that only draft-decode and resize to 224."""
    chunks = [[str(p) for p in paths[i::processes]] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_decode_resize, [c[:4] for c in chunks]))  # warm the processes
        start = time.perf_counter()
        done = sum(pool.map(_decode_resize, chunks))
    return done / (time.perf_counter() - start)


def cheap_model(folder: Path) -> None:
    """A one-layer random CLIP at 224 px (patch 32) with a character tokenizer: the model costs little."""
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from helpers import tiny_clip
    from helpers.models.compat import quiet_transformers

    tokenizer = tiny_clip.build_tokenizer(16, characters="犬猫象車の写真")
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 2,
            "eos_token_id": 2,
        },
        vision_config={**tower, "image_size": 224, "patch_size": 32},
        projection_dim=16,
    )
    torch.manual_seed(0)
    with quiet_transformers():
        CLIPModel(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        crop = {"height": 224, "width": 224}
        CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size=crop, resample=3).save_pretrained(folder)


def classify_rate(images: Path, model: Path, out: Path, *extra: str) -> float:
    """The images/s in the command's summary line."""
    command = [sys.executable, "-m", "helpers.classify", str(images), "--labels", "犬,猫,象,車"]
    command += ["--model", str(model), "--no-check", "--out", str(out), "--no-progress", *extra]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    summary = result.stdout.strip().splitlines()[-1]
    return float(summary.split(" images/s")[0].rsplit(", ", 1)[1])


def main(argv: list[str] | None = None) -> int:
    from helpers.data import make_workload

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    paths = make_workload(args.n, progress=False)
    names = ["ceiling: 2 processes, draft + resize", "classify (default)", "classify --exact-decode"]
    rates: dict[str, list[float]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "cheap224"
        cheap_model(model)
        for _ in range(args.rounds):
            top = ceiling(paths)
            rates[names[0]].append(top)
            for name, extra in ((names[1], ()), (names[2], ("--exact-decode",))):
                rate = classify_rate(paths[0].parent, model, Path(tmp) / "out.csv", *extra)
                rates[name].append(rate)
                ratios[name].append(rate / top)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{len(paths)} JPEGs 1260×750, {platform.machine()} {cores} cores, {args.rounds} rounds, interleaved"
    )
    print("| variant | images/s median (min–max) | ratio to the ceiling, median (min–max) |")
    print("|---|---:|---:|")
    for name in names:
        r = rates[name]
        ratio = ratios.get(name)
        share = f"{statistics.median(ratio):.0%} ({min(ratio):.0%}–{max(ratio):.0%})" if ratio else "100 %"
        print(f"| {name} | {statistics.median(r):.0f} ({min(r):.0f}–{max(r):.0f}) | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
