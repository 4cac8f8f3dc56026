"""Verify the real Japanese CLIP models of ``helpers.models`` against transformers 4.51.3, at full size.

Builds two virtual environments under ``--work`` (default ``build/verify``):

- **reference**: torch 2.13.0, transformers 4.51.3, huggingface_hub 0.x, tokenizers 0.21, timm,
  torchvision and rinna's ``japanese_clip``, where the upstream code runs as its authors wrote it;
- **project**: torch 2.13.0 with the model-layer pins of ``requirements.txt`` (transformers 5.x),
  timm, torchvision and ``japanese_clip``, where the models load through ``helpers.models.load_clip``.

Then it writes a local Hugging Face cache (``HF_HOME`` under ``--work``, the real cache layout) with
``line-corporation/clip-japanese-base`` (LINE's remote code from ``--upstream``), rinna's CLIP and
CLOOB, and ``rinna/japanese-roberta-base``'s SentencePiece model. The config files that cannot be had
offline are rebuilt here (their sizes are the real ones: ViT-B/16 224, 12-layer BERT, EVA02-B/16).
The reference environment builds every model at real size with random weights (fixed seed), saves the
weights into that cache and computes with the upstream API; the project environment loads the same
cache offline (``HF_HUB_OFFLINE=1``) through the repository's code. Printed: the max-abs differences
of image features, text features (on :data:`TEXTS`: capitals, full-width letters, emoji, rare kanji),
logit scale and preprocessed pixels, and how many texts got identical token ids.

Exit status 0 only when image features, text features and logit scales are exactly equal for every
model; 1 when some differ (the notes say which tensors and texts); 2 when a step could not run.

Usage (upstream folder layout: ``tests/verify/README.md``)::

    python3 tests/verify/verify_real_models.py --upstream DIR [--work DIR] [--keep-venvs] [--reuse]

Named ``verify_*.py`` so pytest does not collect it; CI never runs it (it needs the upstream files,
about 2.5 GB of disk and minutes of CPU). The same file is the driver and, run inside each environment
with the hidden ``--stage`` option, the two measuring stages (they import torch and friends lazily).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO / "sample_images"

TORCH = "torch==2.13.0"  # its CPU wheel lies on the machines' disk; never let pip pick another torch
TORCHVISION = "torchvision==0.28.0"  # the release built against torch 2.13
REFERENCE_PACKAGES: tuple[str, ...] = (
    "transformers==4.51.3",
    "huggingface_hub<1.0",
    "tokenizers>=0.21,<0.22",
    "sentencepiece==0.2.2",
    "protobuf",
    "safetensors",
    "pillow",
    "numpy",
    "timm",
    TORCHVISION,
)
PROJECT_REQUIREMENTS: tuple[str, ...] = (
    "transformers",
    "huggingface-hub",
    "tokenizers",
    "safetensors",
    "sentencepiece",
    "protobuf",
    "numpy",
    "pillow",
    "matplotlib",
    "tqdm",
)
"""The model layer's packages, taken with their pins from ``requirements.txt`` (not ray, DALI, jupyter)."""
PROJECT_EXTRAS: tuple[str, ...] = ("timm", TORCHVISION)

LINE = "line-corporation/clip-japanese-base"
RINNA_CLIP = "rinna/japanese-clip-vit-b-16"
RINNA_CLOOB = "rinna/japanese-cloob-vit-b-16"
ROBERTA = "rinna/japanese-roberta-base"
MODELS: tuple[str, ...] = (LINE, RINNA_CLIP, RINNA_CLOOB)
SLUGS = {LINE: "line", RINNA_CLIP: "rinna_clip", RINNA_CLOOB: "rinna_cloob"}

UPSTREAM_LINE = "clip-japanese-base"
UPSTREAM_RINNA = "japanese-clip"
UPSTREAM_ROBERTA = "japanese-roberta-base"
LINE_CODE: tuple[str, ...] = (
    "configuration_clyp.py",
    "modeling_clyp.py",
    "model.py",
    "model_rinna.py",
    "tokenization_clyp.py",
    "image_processing_clyp.py",
)

TEXTS: tuple[str, ...] = (
    "猫の写真",
    "犬の写真",
    "Tシャツを着た人",
    "ＮＡＳＡのロケット",
    "NASAの宇宙飛行士",
    "iPhoneで撮った夜景",
    "犬😀",
    "龘",
    "𠮷野家の牛丼",
    "ｶﾀｶﾅの看板",
    "Ａｂｃ　ＤＥＦ",
    "①番目の花",
    "コーヒーカップとソーサー",
    "赤い花と緑の葉",
    "宇宙に浮かぶ銀河",
    "五重塔と青空",
    "白黒写真の男性",
    "  前後に空白  ",
    "改行を\n含む文",
    "とても長い説明文です。" * 20,
)
"""Capitals, full-width letters, half-width kana, emoji, rare and non-BMP kanji, spaces, a newline and a
text longer than the 77-token limit, beside plain captions."""

SEED = 0
MAX_SEQ_LEN = 77

# ---------------------------------------------------------------- configs rebuilt here (none offline)

BERT_TEXT_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "vocab_size": 32000,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 3,
    "position_embedding_type": "absolute",
}
"""rinna's text tower: a 12-layer BERT over ``rinna/japanese-roberta-base``'s 32000 pieces ([PAD] is 3)."""


VIT_B16_CONFIG: dict[str, Any] = {
    "model_type": "vit",
    "architectures": ["ViTModel"],
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
}
"""rinna's image tower: transformers' ViT-B/16 at 224 pixels (initialised from AugReg's vit-base-patch16-224).
Not a CLIP vision config: LINE's ``model_rinna.py`` builds a CLIP one with ``add_pooling_layer=False``,
which ``CLIPVisionModel`` does not take, so the real config must name another model type."""


RINNA_CONFIGS: dict[str, dict[str, Any]] = {
    RINNA_CLIP: {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 512,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "text_config": BERT_TEXT_CONFIG,
        "vision_config": VIT_B16_CONFIG,
    },
    RINNA_CLOOB: {
        "architectures": ["CLOOBModel"],
        "model_type": "cloob",
        "projection_dim": 512,
        "init_inv_tau": 30.0,
        "scale_hopfield": 15.0,
        "initializer_factor": 1.0,
        "text_config": BERT_TEXT_CONFIG,
        "vision_config": VIT_B16_CONFIG,
    },
}


def _neck(in_channels: int) -> dict[str, Any]:
    return {"in_channels": in_channels, "out_channels": 512, "bias": False}


LINE_CONFIG: dict[str, Any] = {
    "architectures": ["CLYPModel"],
    "auto_map": {"AutoConfig": "configuration_clyp.CLYPConfig", "AutoModel": "modeling_clyp.CLYPModel"},
    "model_type": "clyp",
    "learn_temperature": True,
    "temperature_init": 0.07,
    "temperature_min": 0.01,
    "temperature_max": 1000.0,
    "itc_loss_config": None,
    "torch_dtype": "float32",
    "vision_encoder_config": {
        "backbone_config": {
            "model_name": "eva02_base_patch16_clip_224",
            "pretrained": False,
            "extra_kwargs": {},
        },
        "pooler_config": {"input_type": "timm", "return_patch_features": False},
        "neck_config": _neck(768),
    },
    "text_encoder_config": {
        "backbone_config": {"model_name": RINNA_CLIP},
        "pooler_config": {"input_type": "huggingface", "return_patch_features": False},
        "neck_config": _neck(768),
    },
}
"""CLYPConfig: timm's EVA02-B/16 (built with ``pretrained=False``), rinna's CLIP text tower, 768→512 necks."""
LINE_TOKENIZER_CONFIG: dict[str, Any] = {
    "auto_map": {"AutoTokenizer": ["tokenization_clyp.CLYPTokenizer", None]},
    "tokenizer_class": "CLYPTokenizer",
    "max_length": MAX_SEQ_LEN,
    "padding": "longest",
    "truncation": True,
}
LINE_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "auto_map": {"AutoImageProcessor": "image_processing_clyp.CLYPImageProcessor"},
    "image_processor_type": "CLYPImageProcessor",
    "image_size": 224,
    "normalization_type": "imagenet",
}
ROBERTA_SPECIAL_TOKENS: dict[str, str] = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
ROBERTA_TOKENIZER_CONFIG: dict[str, Any] = {
    **ROBERTA_SPECIAL_TOKENS,
    "extra_ids": 0,
    "additional_special_tokens": [],
    "do_lower_case": True,
    "tokenizer_class": "T5Tokenizer",
    "sp_model_kwargs": {},
}

# ---------------------------------------------------------------- torchvision beside the local torch wheel

TORCHVISION_HOOK_MODULE = "_verify_torchvision_ops"
TORCHVISION_HOOK = '''"""Verification environments only (written by tests/verify/verify_real_models.py).

PyPI's torchvision does not load its C++ ops beside the local torch 2.13 CPU wheel, and its Python side
then fails on import ("operator torchvision::nms does not exist"). Declaring the schemas of its two
ops (nms, qnms) before torchvision is first imported lets torchvision, timm and the image processors
import; the ops themselves stay without kernels (nothing here calls them).
"""

import importlib.abc
import sys

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


def declare():
    """Declare torchvision::nms and torchvision::qnms once (no-op when already declared)."""
    import torch

    if getattr(torch.library, "_verify_torchvision_ops", False):
        return
    for op in ("nms", "qnms"):
        try:
            torch.library.define(f"torchvision::{op}", _SCHEMA)
        except RuntimeError:
            pass  # declared already
    torch.library._verify_torchvision_ops = True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare()
        return None


if not any(type(f).__name__ == "_BeforeTorchvision" for f in sys.meta_path):
    sys.meta_path.insert(0, _BeforeTorchvision())
'''


# ================================================================ the driver


def say(message: str) -> None:
    """One progress line, flushed at once."""
    print(message, flush=True)


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run ``command``, its output appended to ``log``; on failure show the log's tail and stop (exit 2)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        say("\n".join(["    " + line for line in tail]))
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)} (log: {log})")


def project_pins(requirements: Path) -> list[str]:
    """The lines of ``requirements.txt`` that pin :data:`PROJECT_REQUIREMENTS` (comments dropped)."""
    wanted = {name.replace("_", "-").lower() for name in PROJECT_REQUIREMENTS}
    pins: dict[str, str] = {}
    for raw in requirements.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        name = re.split(r"[<>=!~\[;\s]", line, maxsplit=1)[0].replace("_", "-").lower()
        if line and name in wanted:
            pins[name] = line
    missing = sorted(wanted - pins.keys())
    if missing:
        raise SystemExit(f"{requirements} does not name {', '.join(missing)}")
    return [pins[name.replace("_", "-").lower()] for name in PROJECT_REQUIREMENTS]


def site_packages(venv: Path) -> Path:
    """The venv's site-packages folder."""
    found = sorted(venv.glob("lib/python3*/site-packages"))
    if not found:
        raise SystemExit(f"no site-packages under {venv}")
    return found[0]


def build_venv(venv: Path, packages: list[str], rinna_src: Path, work: Path, reuse: bool) -> Path:
    """Create ``venv`` with torch 2.13.0 first, then ``packages`` (torch/torchvision held by a constraints
    file), rinna's package without its pins, and the torchvision hook; return its python."""
    python = venv / "bin" / "python"
    spec = json.dumps({"torch": TORCH, "packages": packages}, sort_keys=True)
    marker = venv / ".verify-spec.json"
    if reuse and marker.is_file() and marker.read_text(encoding="utf-8") == spec:
        say(f"      reusing {venv}")
        return python
    if venv.exists():
        shutil.rmtree(venv)
    log = work / "logs" / f"{venv.name}.log"
    log.unlink(missing_ok=True)
    constraints = work / "constraints.txt"
    constraints.write_text(f"{TORCH}\n{TORCHVISION}\n", encoding="utf-8")
    run_logged([sys.executable, "-m", "venv", str(venv)], log)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    say(f"      pip install {TORCH}")
    run_logged([*pip, TORCH], log)
    say(f"      pip install {' '.join(packages)}")
    run_logged([*pip, "-c", str(constraints), *packages], log)
    say("      pip install --no-deps japanese_clip (rinna's pins ask for sentencepiece<=0.1.94)")
    run_logged([*pip, "--no-deps", str(rinna_src)], log)
    site = site_packages(venv)
    (site / f"{TORCHVISION_HOOK_MODULE}.py").write_text(TORCHVISION_HOOK, encoding="utf-8")
    (site / f"{TORCHVISION_HOOK_MODULE}.pth").write_text(
        f"import {TORCHVISION_HOOK_MODULE}\n", encoding="utf-8"
    )
    run_logged(
        [str(python), "-c", "import torch, torchvision, timm; assert torch.__version__ == '2.13.0+cpu'"], log
    )
    marker.write_text(spec, encoding="utf-8")
    return python


def check_upstream(upstream: Path) -> list[str]:
    """What the upstream folder lacks (empty when its layout is complete)."""
    needed = [upstream / UPSTREAM_LINE / name for name in LINE_CODE]
    needed += [
        upstream / UPSTREAM_RINNA / "setup.py",
        upstream / UPSTREAM_RINNA / "src" / "japanese_clip" / "__init__.py",
        upstream / UPSTREAM_ROBERTA / "spiece.model",
    ]
    return [str(path) for path in needed if not path.is_file()]


def snapshot(hf_home: Path, repo: str) -> Path:
    """The snapshot folder of ``repo`` in the hub cache under ``hf_home`` (named by refs/main), empty."""
    revision = hashlib.sha1(f"verify_real_models:{repo}".encode()).hexdigest()
    base = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(revision, encoding="utf-8")
    folder = base / "snapshots" / revision
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_hub_cache(hf_home: Path, upstream: Path) -> list[str]:
    """Write the four repositories into the cache (weights come later, from the reference stage);
    return one line per file that was rebuilt here rather than taken from ``upstream``."""
    rebuilt = []
    roberta = snapshot(hf_home, ROBERTA)
    shutil.copy2(upstream / UPSTREAM_ROBERTA / "spiece.model", roberta / "spiece.model")
    for name, content in (
        ("tokenizer_config.json", ROBERTA_TOKENIZER_CONFIG),
        ("special_tokens_map.json", ROBERTA_SPECIAL_TOKENS),
    ):
        given = upstream / UPSTREAM_ROBERTA / name
        if given.is_file():
            shutil.copy2(given, roberta / name)
        else:
            write_json(roberta / name, content)
            rebuilt.append(f"{ROBERTA}/{name}")
    for repo, config in RINNA_CONFIGS.items():
        write_json(snapshot(hf_home, repo) / "config.json", config)
        rebuilt.append(f"{repo}/config.json")
    line = snapshot(hf_home, LINE)
    for name in LINE_CODE:
        shutil.copy2(upstream / UPSTREAM_LINE / name, line / name)
    for name, content in (
        ("config.json", LINE_CONFIG),
        ("tokenizer_config.json", LINE_TOKENIZER_CONFIG),
        ("preprocessor_config.json", LINE_PREPROCESSOR_CONFIG),
    ):
        write_json(line / name, content)
        rebuilt.append(f"{LINE}/{name}")
    return rebuilt


def stage_env(work: Path) -> dict[str, str]:
    """Environment of the measuring stages: the local cache only, nothing from the caller's Python."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CLIP_MODEL"}
    }
    env.update(
        HF_HOME=str(work / "hf_home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",  # 4.51.3 calls copying remote code from the cache "downloaded"
        TORCH_HOME=str(work / "torch_home"),
        PYTHONNOUSERSITE="1",
        PYTHONDONTWRITEBYTECODE="1",  # the project stage imports helpers/ from the checkout
    )
    return env


def run_stage(python: Path, stage: str, work: Path, upstream: Path) -> None:
    """Run this file's ``stage`` inside a verification environment (its progress lines pass through)."""
    command = [str(python), str(Path(__file__).resolve()), "--stage", stage, "--work", str(work)]
    command += ["--upstream", str(upstream)]
    done = subprocess.run(command, env=stage_env(work), check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {stage} stage failed ({done.returncode})")


def fmt(value: float | None) -> str:
    """A difference for the table: ``0`` when exactly zero, else 3 significant digits."""
    if value is None:
        return "n/a"
    return "0" if value == 0 else f"{value:.3e}"


def print_report(results: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Print versions, the table and notes; True when image, text and logit scale are exactly equal."""
    for side, versions in (("reference", reference["versions"]), ("project", results["versions"])):
        say(f"{side + ':':<11}" + " | ".join(f"{k} {v}" for k, v in versions.items()))
    header = ("model", "max|Δ| image", "max|Δ| text", "Δ logit scale", "max|Δ| pixels", "token ids equal")
    rows = []
    ok = True
    for name in MODELS:
        r = results["models"][name]
        if "error" in r:
            rows.append((name, "error", "error", "error", "error", "error"))
            ok = False
            continue
        rows.append(
            (
                name,
                fmt(r["image"]),
                fmt(r["text"]),
                fmt(r["logit_scale"]),
                fmt(r["pixels"]),
                f"{r['ids_equal']}/{len(TEXTS)} texts",
            )
        )
        ok = ok and r["image"] == 0 and r["text"] == 0 and r["logit_scale"] == 0
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    for i, row in enumerate((header, *rows)):
        say(" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            say("-+-".join("-" * width for width in widths))
    notes = [f"{name}: {note}" for name in MODELS for note in results["models"][name].get("notes", [])]
    if notes:
        say("notes:")
        for note in notes:
            say(f"  - {note}")
    return ok


def drive(args: argparse.Namespace) -> int:
    """Build both environments and the cache, run both stages, print the comparison."""
    started = time.monotonic()
    upstream = args.upstream.resolve()
    work = args.work.resolve()
    lacking = check_upstream(upstream)
    if lacking:
        say("the upstream folder lacks (see tests/verify/README.md for its layout):")
        for path in lacking:
            say(f"  {path}")
        return 2
    work.mkdir(parents=True, exist_ok=True)
    rinna_src = work / "src" / UPSTREAM_RINNA  # a copy: pip writes build files into the folder it installs
    if rinna_src.exists():
        shutil.rmtree(rinna_src)
    shutil.copytree(upstream / UPSTREAM_RINNA, rinna_src, ignore=shutil.ignore_patterns(".git", "*.egg-info"))

    def step(number: int, text: str) -> None:
        say(f"[{number}/5] {text} ({time.monotonic() - started:.0f} s)")

    step(1, f"reference environment {work / 'venv-reference'}")
    ref_python = build_venv(work / "venv-reference", list(REFERENCE_PACKAGES), rinna_src, work, args.reuse)
    step(2, f"project environment {work / 'venv-project'}")
    packages = project_pins(REPO / "requirements.txt") + list(PROJECT_EXTRAS)
    proj_python = build_venv(work / "venv-project", packages, rinna_src, work, args.reuse)
    step(3, f"Hugging Face cache {work / 'hf_home'} (offline)")
    hf_home = work / "hf_home"
    if hf_home.exists():
        shutil.rmtree(hf_home)
    for line in build_hub_cache(hf_home, upstream):
        say(f"      rebuilt here (not available offline): {line}")
    step(4, "reference stage: random weights into the cache, then the upstream API under transformers 4.51.3")
    run_stage(ref_python, "reference", work, upstream)
    step(5, "project stage: helpers.models.load_clip under the project's pins")
    run_stage(proj_python, "project", work, upstream)
    reference = json.loads((work / "reference.json").read_text(encoding="utf-8"))
    results = json.loads((work / "results.json").read_text(encoding="utf-8"))
    say("")
    ok = print_report(results, reference)
    say(f"\noutputs: {work / 'reference.npz'}, reference.json, results.json, logs/")
    if not (args.keep_venvs or args.reuse):
        say("removing both environments (--keep-venvs keeps them for --reuse)")
        for venv in ("venv-reference", "venv-project"):
            shutil.rmtree(work / venv, ignore_errors=True)
    say(f"{'OK' if ok else 'DIFFERENT'}: {time.monotonic() - started:.0f} s in all")
    return 0 if ok else 1


# ================================================================ the stages (inside the environments)


def load_images() -> tuple[list[str], list[Any]]:
    """The sample photos (``sample_images/*.jpg``), opened as PIL gives them (no mode conversion)."""
    from PIL import Image

    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))
    images = []
    for path in paths:
        with Image.open(path) as image:
            image.load()
            images.append(image.copy())
    return [path.name for path in paths], images


def versions() -> dict[str, str]:
    """Versions of the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in (
        "torch",
        "transformers",
        "timm",
        "tokenizers",
        "huggingface_hub",
        "sentencepiece",
        "torchvision",
    ):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def cache_folder(repo: str) -> Path:
    """The snapshot folder of ``repo`` in the stage's ``HF_HOME``."""
    base = Path(os.environ["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    return base / "snapshots" / (base / "refs" / "main").read_text(encoding="utf-8").strip()


def randomise(model: Any, generator: Any) -> None:
    """Add N(0, 0.02) noise to every parameter (after the model's own seeded init), so that no weight
    keeps a value some other init would also give it: a weight that fails to load shows as a difference."""
    import torch

    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)


def stub_cached_download() -> None:
    """rinna's ``japanese_clip`` imports ``huggingface_hub.cached_download`` (gone since hub 0.26, and
    transformers 4.51.3 needs hub >= 0.30); ``load()`` never calls it, so a stub that raises suffices."""
    import huggingface_hub

    if not hasattr(huggingface_hub, "cached_download"):

        def cached_download(*args: Any, **kwargs: Any) -> str:
            raise RuntimeError("cached_download is not available (verification stub)")

        huggingface_hub.cached_download = cached_download


def save_random_weights() -> None:
    """Build the three models at real size with seeded random weights and save them into the cache."""
    import japanese_clip
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    for offset, name in enumerate((RINNA_CLIP, RINNA_CLOOB)):
        say(f"      {name}: random weights (seed {SEED + offset})")
        torch.manual_seed(SEED + offset)
        generator = torch.Generator().manual_seed(SEED + offset)
        config_class = japanese_clip.CLIPConfig if name == RINNA_CLIP else japanese_clip.CLOOBConfig
        model_class = japanese_clip.CLIPModel if name == RINNA_CLIP else japanese_clip.CLOOBModel
        model = model_class(config_class.from_pretrained(name))
        randomise(model, generator)
        if name == RINNA_CLIP:
            with torch.no_grad():
                model.logit_scale.fill_(4.0 + float(torch.rand((), generator=generator)))
        torch.save(model.state_dict(), cache_folder(name) / "pytorch_model.bin")  # rinna's file name
        del model
    say(f"      {LINE}: random weights (seed {SEED + 2})")
    torch.manual_seed(SEED + 2)
    generator = torch.Generator().manual_seed(SEED + 2)
    config = AutoConfig.from_pretrained(LINE, trust_remote_code=True)
    model_class = get_class_from_dynamic_module(config.auto_map["AutoModel"], LINE)
    model = model_class(config)
    randomise(model, generator)
    with torch.no_grad():
        model.itc_loss_fn.temperature.fill_(0.05 + 0.02 * float(torch.rand((), generator=generator)))
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(cache_folder(LINE) / "model.safetensors"), metadata={"format": "pt"})


def reference_outputs(name: str, images: list[Any]) -> dict[str, Any]:
    """Pixels, features, logit scale and token ids of ``name`` through the upstream API."""
    import torch

    with torch.no_grad():
        if name == LINE:
            from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

            model = AutoModel.from_pretrained(LINE, trust_remote_code=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(LINE, trust_remote_code=True)
            processor = AutoImageProcessor.from_pretrained(LINE, trust_remote_code=True)
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            encoded = tokenizer(list(TEXTS))
            image = model.get_image_features(pixel_values=pixels)
            text = model.get_text_features(**encoded)
            scale = 1.0 / float(model.itc_loss_fn.temperature)
        else:
            import japanese_clip

            model, transform = japanese_clip.load(name, device="cpu")
            tokenizer = japanese_clip.load_tokenizer()
            pixels = torch.stack([transform(im) for im in images])
            encoded = japanese_clip.tokenize(
                list(TEXTS), tokenizer=tokenizer, max_seq_len=MAX_SEQ_LEN, device="cpu"
            )
            image = model.get_image_features(pixel_values=pixels)
            text = model.get_text_features(**encoded)
            scale = float(model.logit_scale.exp()) if name == RINNA_CLIP else float(model.inv_tau)
    return {
        "pixels": pixels.numpy(),
        "image": image.numpy(),
        "text": text.numpy(),
        "logit_scale": scale,
        "input_ids": encoded["input_ids"].numpy(),
        "attention_mask": encoded["attention_mask"].numpy(),
    }


def reference_stage(work: Path) -> None:
    """Inside the reference environment: save random weights, compute, write reference.npz/.json."""
    import gc

    import numpy as np

    stub_cached_download()
    save_random_weights()
    gc.collect()
    names, images = load_images()
    arrays: dict[str, Any] = {}
    scales = {}
    for name in MODELS:
        say(f"      {name}: upstream API on {len(images)} photos and {len(TEXTS)} texts")
        out = reference_outputs(name, images)
        scales[name] = out.pop("logit_scale")
        arrays.update({f"{SLUGS[name]}.{key}": value for key, value in out.items()})
        gc.collect()
    np.savez(work / "reference.npz", **arrays)
    write_json(work / "reference.json", {"versions": versions(), "images": names, "logit_scale": scales})


def _tokens(ids: Any, mask: Any, row: int) -> list[int]:
    return [int(t) for t, m in zip(ids[row], mask[row], strict=True) if m]


def compare_model(
    name: str, images: list[Any], image_names: list[str], ref: Any, ref_scale: float
) -> dict[str, Any]:
    """Load ``name`` with ``helpers.models.load_clip`` and compare it with the reference arrays."""
    import numpy as np
    import torch

    from helpers.models import load_clip

    slug = SLUGS[name]
    model = load_clip(name, device="cpu")
    notes: list[str] = []
    pixels = model.preprocess(images)
    ref_pixels = ref[f"{slug}.pixels"]
    if tuple(pixels.shape) == ref_pixels.shape:
        per_image = np.abs(pixels.numpy() - ref_pixels).reshape(len(images), -1).max(axis=1)
        pixel_diff = float(per_image.max())
        off = [f"{n} {d:.3g}" for n, d in zip(image_names, per_image, strict=True) if d]
        if off:
            notes.append(f"pixels differ on {len(off)}/{len(images)} photos: {', '.join(off)}")
    else:
        pixel_diff = None
        notes.append(f"pixel shapes differ: {tuple(pixels.shape)} vs reference {ref_pixels.shape}")
    image = model.encode_images(pixels).float().numpy()
    image_diff = float(np.abs(image - ref[f"{slug}.image"]).max())
    if image_diff:
        on_ref = model.encode_images(torch.from_numpy(ref_pixels)).float().numpy()
        on_ref_diff = float(np.abs(on_ref - ref[f"{slug}.image"]).max())
        notes.append(f"image features on the reference's own pixels: max|Δ| {fmt(on_ref_diff)}")
    text = model.encode_texts(list(TEXTS)).float().numpy()
    per_text = np.abs(text - ref[f"{slug}.text"]).max(axis=1)
    text_diff = float(per_text.max())
    encoded = model.tokenize(list(TEXTS))
    ids, mask = encoded["input_ids"].numpy(), encoded["attention_mask"].numpy()
    ref_ids, ref_mask = ref[f"{slug}.input_ids"], ref[f"{slug}.attention_mask"]
    same_ids = [_tokens(ids, mask, i) == _tokens(ref_ids, ref_mask, i) for i in range(len(TEXTS))]
    if ids.shape != ref_ids.shape:
        notes.append(f"token id shapes differ: {ids.shape} vs reference {ref_ids.shape}")
    for i, text_i in enumerate(TEXTS):
        if not same_ids[i]:
            ours, theirs = _tokens(ids, mask, i)[:12], _tokens(ref_ids, ref_mask, i)[:12]
            notes.append(f"ids differ for {text_i!r}: {ours} vs reference {theirs}")
        elif per_text[i]:
            notes.append(
                f"same ids but text features differ for {text_i!r}: max|Δ| {fmt(float(per_text[i]))}"
            )
    scale = float(model.logit_scale)
    if scale != ref_scale:
        notes.append(f"logit scale {scale!r} vs reference {ref_scale!r} ({model.logit_scale_source})")
    return {
        "image": image_diff,
        "text": text_diff,
        "per_text": {t: float(d) for t, d in zip(TEXTS, per_text, strict=True)},
        "logit_scale": abs(scale - ref_scale),
        "logit_scale_value": scale,
        "pixels": pixel_diff,
        "ids_equal": sum(same_ids),
        "notes": notes,
    }


def project_stage(work: Path) -> None:
    """Inside the project environment: load through helpers.models, compare, write results.json."""
    import gc

    import numpy as np

    sys.path.insert(0, str(REPO))
    reference = json.loads((work / "reference.json").read_text(encoding="utf-8"))
    ref = dict(np.load(work / "reference.npz"))
    names, images = load_images()
    models: dict[str, Any] = {}
    for name in MODELS:
        say(f"      {name}: load_clip, preprocess, encode_images, encode_texts, logit_scale, tokenize")
        try:
            models[name] = compare_model(name, images, names, ref, reference["logit_scale"][name])
        except Exception as err:  # report and go on with the next model
            models[name] = {
                "error": f"{type(err).__name__}: {err}",
                "notes": [f"failed: {type(err).__name__}: {err}"],
            }
        gc.collect()
    write_json(work / "results.json", {"versions": versions(), "models": models})


# ================================================================ entry point


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--upstream", type=Path, required=True, help="folder with the upstream files (tests/verify/README.md)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "build" / "verify",
        help="working folder: environments, cache, outputs (default: build/verify)",
    )
    parser.add_argument("--keep-venvs", action="store_true", help="keep both environments after the run")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse environments kept by an earlier run (and keep them)"
    )
    parser.add_argument("--stage", choices=("reference", "project"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage == "reference":
        reference_stage(args.work.resolve())
        return 0
    if args.stage == "project":
        project_stage(args.work.resolve())
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
