"""Japanese CLIP models behind one small interface: :func:`load_clip`, :class:`ClipModel`, :func:`check`.

Every backend gives the same object (:class:`ClipModel`)::

    model = load_clip()                      # the argument, else $CLIP_MODEL, else "auto"
    pixels = model.preprocess([image])       # float32 [B, 3, H, W] on the CPU
    image_features = model.encode_images(pixels)      # [B, D], unnormalised, as the model gives them
    text_features = model.encode_texts(["猫の写真"])  # [T, D]
    model.scoring                            # its rule: softmax (CLIP) or per-label sigmoid (SigLIP)
    model.preprocess_spec                    # size, resize rule, interpolation, mean/std: for DALI

Model names (:func:`load_clip`):

- ``"line-corporation/clip-japanese-base"`` (:data:`DEFAULT_MODEL`): the real default; remote code
  with a timm EVA02 image tower (needs timm, hence torchvision: Colab and the GPU machine have both).
  ``"line-corporation/clip-japanese-base-v2"`` (:data:`LINE_V2`) loads the same way (its code was not
  available to verify here; docs/models.md says what was checked).
- ``"rinna/japanese-cloob-vit-b-16"``, ``"rinna/japanese-clip-vit-b-16"``: through rinna's optional
  ``japanese_clip`` package (:mod:`helpers.models.rinna`).
- ``"embedded"`` (alias ``"tiny"``): the tiny CLIP shipped in ``helpers/assets/tiny-clip-ja``
  (:mod:`helpers.models.embedded`); meaningful only on drawn shapes. Runs anywhere, offline.
- ``"random:vit-b16"`` (alias ``"vit-b16-random"``): a random-initialised CLIP of ViT-B/16 size for
  speed measurements; no download, fixed seed, meaningless answers (:mod:`helpers.models.random_vit`).
- a SigLIP folder or hub id (``model_type`` ``"siglip"``, e.g. ``llm-jp/waon-siglip2-base-patch16-256``):
  scored with a per-label sigmoid (:mod:`helpers.models.siglip`).
- any local folder saved with ``save_pretrained`` (config, weights, tokenizer, image processor),
  or another hub id that ``AutoModel`` understands (:mod:`helpers.models.hf`). A folder that ships
  its own code runs it only with ``trust_remote_code=True``.
- ``"auto"``: :data:`DEFAULT_MODEL` when the hub answers; otherwise the notebooks' default
  (``fallback=True``) loads ``"embedded"`` and says so in one line, and the commands
  (``fallback=False``) stop with an error that names ``--model embedded``.

A model that was asked for by name and cannot load raises :class:`ModelLoadError` (cause and what
to do); only ``"auto"`` falls back. :func:`check` classifies a known picture and raises
:class:`ModelCheckError` when the answer is wrong; :func:`prepare` (what every command and Ray actor
uses) loads and checks in one call.

Inside the package, dependencies run one way: ``base`` (types, preprocessing spec) ← ``hub`` and
``compat`` ← ``hf`` ← the backends (``siglip``, ``embedded``, ``random_vit``, ``rinna``) ← this
dispatcher.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from PIL import Image

from helpers import env
from helpers.models.base import (
    ALIASES,
    AUTO,
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MODEL,
    EMBEDDED,
    LINE_MODELS,
    LINE_V2,
    RANDOM_VIT_B16,
    RINNA_MODELS,
    TRUSTED_REMOTE_CODE,
    ClipModel,
    ModelCheckError,
    ModelLoadError,
    PreprocessSpec,
    Scoring,
    describe,
    normalize,
    preprocess_with_spec,
    resize_with_spec,
)
from helpers.models.hub import is_hub_id, offline_plan, read_config

__all__ = [
    "AUTO",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MODEL",
    "EMBEDDED",
    "LINE_MODELS",
    "LINE_V2",
    "RANDOM_VIT_B16",
    "RINNA_MODELS",
    "TRUSTED_REMOTE_CODE",
    "ClipModel",
    "ModelCheckError",
    "ModelLoadError",
    "PreprocessSpec",
    "Scoring",
    "add_loading_options",
    "check",
    "describe",
    "load_clip",
    "normalize",
    "prepare",
    "preprocess_with_spec",
    "requested_model",
    "resize_with_spec",
]

OFFLINE_NOTICE = "Hugging Face Hub に接続できないため、同梱の小さなモデル (embedded) を使います。"
NO_FALLBACK_HINT = (
    "同梱の小さなモデル (描いた図形しか知りません) で試すなら --model embedded"
    " (Python では load_clip('embedded'))、ダウンロード済みのモデルなら"
    " --model そのフォルダー を指定してください。"
)


def requested_model(name: str | None = None) -> str:
    """The model asked for, spelled canonically: ``name``, else ``$CLIP_MODEL``, else ``"auto"``."""
    chosen = (name or os.environ.get("CLIP_MODEL") or AUTO).strip()
    lowered = chosen.lower()
    if lowered in {AUTO, EMBEDDED, RANDOM_VIT_B16} or lowered in ALIASES:
        return ALIASES.get(lowered, lowered)
    return chosen


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device) if device is not None else torch.device(env.device())


def _first_line(text: object) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def load_clip(
    name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    fallback: bool = True,
    trust_remote_code: bool = False,
) -> ClipModel:
    """Load a CLIP model by name (see the module docstring) on ``device`` (default: the GPU when
    there is one) in ``dtype`` (default float32).

    Resolution: ``name``, else the ``CLIP_MODEL`` environment variable, else ``"auto"``. ``"auto"``
    loads :data:`DEFAULT_MODEL` when the hub answers (``helpers.env.hub_reachable``, at most ~3 s).
    When it cannot, ``fallback=True`` (the notebooks) loads the embedded model and prints one line
    that says so; ``fallback=False`` (the commands) raises :class:`ModelLoadError` naming
    ``--model embedded``. A model asked for by name never falls back. ``trust_remote_code`` lets a
    local folder (or an unknown hub id) run the code it ships; the known hub ids
    (:data:`TRUSTED_REMOTE_CODE`) are trusted without it.
    """
    requested = requested_model(name)
    target_device = _default_device(device)
    target_dtype = dtype or torch.float32
    if requested != AUTO:
        return _load_named(requested, target_device, target_dtype, trust_remote_code)
    if env.hub_reachable():
        try:
            return _load_named(DEFAULT_MODEL, target_device, target_dtype, trust_remote_code)
        except ModelLoadError as err:
            reason = _first_line(err)
            notice = f"{DEFAULT_MODEL} を読み込めないため、同梱の小さなモデル (embedded) を使います: {reason}"
    else:
        reason = f"Hugging Face Hub に接続できないため {DEFAULT_MODEL} を読み込めません。"
        notice = OFFLINE_NOTICE
    if not fallback:
        raise ModelLoadError(f"{reason}{'' if reason.endswith('。') else ' '}{NO_FALLBACK_HINT}")
    print(notice)
    return _load_named(EMBEDDED, target_device, target_dtype, False)


def _model_type(name: str) -> str:
    """``model_type`` from the config of a folder or hub id ("" when it cannot be read here)."""
    path = Path(name).expanduser()
    try:
        local_only = False if path.is_dir() else offline_plan(name, [(name, "config.json")])
        return str(read_config(path if path.is_dir() else name, local_only).get("model_type", ""))
    except ModelLoadError:
        raise
    except Exception:
        return ""  # the backend that loads it will explain the failure


def _load_named(name: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool) -> ClipModel:
    """Dispatch a canonical model name to its backend."""
    from helpers.models import embedded, hf, random_vit, siglip

    if name == EMBEDDED:
        return embedded.load_embedded(device, dtype)
    if name == RANDOM_VIT_B16:
        return random_vit.load_random_vit_b16(device, dtype)
    if name in RINNA_MODELS:
        from helpers.models import rinna

        return rinna.load_rinna(name, device, dtype)
    if name in LINE_MODELS:
        return hf.load_line(name, device, dtype)
    path = Path(name).expanduser()
    if not path.is_dir() and not is_hub_id(name):
        choices = ", ".join([AUTO, *LINE_MODELS, *RINNA_MODELS, EMBEDDED, RANDOM_VIT_B16])
        raise ModelLoadError(
            f"モデル {name!r} が見つかりません (フォルダーでも Hub の名前でもありません)。"
            f"選べる名前: {choices}、"
            "または save_pretrained で保存したフォルダー。"
        )
    source = str(path) if path.is_dir() else name
    model_type = _model_type(source)
    if model_type == embedded.MODEL_TYPE:
        return embedded.load_embedded(device, dtype, model_dir=path, name=name)
    if model_type in siglip.MODEL_TYPES:
        return siglip.load_siglip(source, name=name, device=device, dtype=dtype, model_type=model_type)
    trust = trust_remote_code or name in TRUSTED_REMOTE_CODE
    return hf.load_pretrained(source, name=name, device=device, dtype=dtype, trust_remote_code=trust)


def add_loading_options(parser: argparse.ArgumentParser) -> None:
    """The switches every command gives :func:`prepare`: ``--no-check`` and ``--trust-remote-code``."""
    parser.add_argument("--no-check", action="store_true", help="読み込んだモデルの確認 (猫の写真) を省く")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="ローカルのモデルフォルダーに同梱された Python コードを実行する (中身を確かめてから)",
    )


def prepare(
    name: str | None = None,
    *,
    run_check: bool = True,
    trust_remote_code: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[ClipModel, str]:
    """What every command and Ray actor does before touching a file: load (``auto`` never falls back)
    and, unless ``run_check`` is False or the model is ``random:*``, :func:`check` it once.

    Returns the model and a one-line note: the check's OK line, or why it was not run.
    Raises :class:`ModelLoadError` / :class:`ModelCheckError`.
    """
    model = load_clip(name, device, dtype, fallback=False, trust_remote_code=trust_remote_code)
    if model.kind == "random":
        return model, f"モデル確認なし ({model.name}: 重みがランダムなので確かめる答えがありません)"
    if not run_check:
        return model, f"モデル確認を省略しました (--no-check): {model.name}"
    return model, check(model)


# ---------------------------------------------------------------- the sanity check

PHOTO_LABELS: tuple[str, ...] = ("犬", "猫", "象", "車")
PHOTO_TEMPLATE = "{}の写真"
PHOTO_ANSWER = "猫"
SHAPE_LABELS: tuple[str, ...] = ("赤い丸", "青い三角", "緑の四角", "黄色い星")
SHAPE_SEEDS: tuple[int, ...] = (1, 2)


def _zero_shot_probs(model: ClipModel, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """The model's own label probabilities [images, texts], after checking features are finite."""
    image_features = model.encode_images(images).float()
    text_features = model.encode_texts(texts).float()
    for what, feats, n in (("画像", image_features, len(images)), ("テキスト", text_features, len(texts))):
        if feats.ndim != 2 or feats.shape[0] != n:
            raise ModelCheckError(
                f"{what}の特徴量の形が [{n}, D] ではありません: {list(feats.shape)} ({model.name})"
            )
        if not torch.isfinite(feats).all():
            raise ModelCheckError(
                f"{what}の特徴量に NaN/inf が含まれます ({model.name})。{_likely_causes(model)}"
            )
    if image_features.shape[1] != text_features.shape[1]:
        raise ModelCheckError(
            f"画像とテキストの特徴量の次元が違います: {image_features.shape[1]} と {text_features.shape[1]}"
        )
    return model.probabilities(image_features, text_features).cpu()


def _likely_causes(model: ClipModel) -> str:
    """What usually makes a model answer wrongly, and what to do, for this model."""
    import transformers

    causes = []
    if model.dtype in (torch.float16, torch.bfloat16) and model.device.type == "cpu":
        causes.append("CPU で float16/bfloat16 は不安定です: dtype=torch.float32 で読み込んでください")
    if model.name == DEFAULT_MODEL or any(
        type(m).__module__.startswith("timm.") for m in model.module.modules()
    ):
        causes.append(
            f"transformers {transformers.__version__} で EVA02 の回転位置埋め込み (RoPE) バッファが"
            "未初期化のまま"
            " (helpers.models.compat.reinit_non_persistent_buffers が効いていない): timm を更新するか、"
            "`%pip install transformers==4.51.3` で試してください"
        )
    elif model.backend == "rinna":
        causes.append(
            f"japanese_clip と transformers {transformers.__version__} の組み合わせ: "
            "`%pip install transformers==4.51.3` で試してください"
        )
    elif model.kind == "embedded":
        causes.append(
            "同梱モデルの重みが壊れているか古い: `python -m helpers.tiny_clip train` で作り直してください"
        )
    causes.append("前処理 (preprocess_spec) がモデルの学習時と違う")
    return "考えられる原因: " + " / ".join(causes)


def check(model: ClipModel) -> str:
    """Classify a known picture and return a one-line Japanese OK message, or raise :class:`ModelCheckError`.

    - real models: the cat photo ``sample_images/cat.jpg`` among 「犬」「猫」「象」「車」
      (template 「{}の写真」, the model's own scoring) must come out 「猫」: with probability ≥ 0.5
      for a softmax over labels, ranked first for a per-label sigmoid (SigLIP's probabilities are
      independent and often small, so no threshold applies);
    - the embedded model: drawn shapes (:func:`helpers.fixtures.shapes.draw_shape`) of four labels, two
      pictures each, classified among those labels: at least 7 of 8 right;
    - ``random:vit-b16``: only the shapes and finiteness of the features (random weights have no
      meaningful answer).

    NaN/inf features always fail, with the likely cause.
    """
    if model.kind == "random":
        image = Image.new("RGB", (320, 240), (120, 140, 160))
        _zero_shot_probs(model, [image], [PHOTO_TEMPLATE.format(x) for x in PHOTO_LABELS])
        return (
            f"モデル確認 OK ({model.name}): 特徴量の形と値 (NaN/inf なし) を確認しました。"
            "重みがランダムなので答えの正しさは確かめません。"
        )
    if model.kind == "embedded":
        from helpers.fixtures import shapes

        pictures = [(label, shapes.draw_shape(label, seed)) for seed in SHAPE_SEEDS for label in SHAPE_LABELS]
        probs = _zero_shot_probs(model, [p for _, p in pictures], list(SHAPE_LABELS))
        answers = [SHAPE_LABELS[i] for i in probs.argmax(dim=-1).tolist()]
        right = sum(a == label for a, (label, _) in zip(answers, pictures, strict=True))
        if right < len(pictures) - 1:
            wrong = "、".join(
                f"{label}→{a}" for a, (label, _) in zip(answers, pictures, strict=True) if a != label
            )
            raise ModelCheckError(
                f"モデル確認 NG ({model.name}): 図形 {len(pictures)} 枚中 {right} 枚しか正しく分類できません"
                f" ({wrong})。{_likely_causes(model)}"
            )
        mean_p = float(probs.max(-1).values.mean())
        return f"モデル確認 OK: 図形 {right}/{len(pictures)} 枚を正しく分類 (平均確率 {mean_p:.2f})"
    from helpers.data import open_image, sample_photo

    photo = open_image(sample_photo("cat"))
    probs = _zero_shot_probs(model, [photo], [PHOTO_TEMPLATE.format(x) for x in PHOTO_LABELS])[0]
    best = int(probs.argmax())
    answer, p = PHOTO_LABELS[best], float(probs[best])
    threshold = 0.5 if model.scoring.kind == "softmax" else 0.0
    if answer != PHOTO_ANSWER or p < threshold:
        table = "、".join(f"{label} {float(q):.2f}" for label, q in zip(PHOTO_LABELS, probs, strict=True))
        raise ModelCheckError(
            f"モデル確認 NG ({model.name}): 猫の写真の答えが「{answer}」({p:.2f}) でした [{table}]。"
            f"{_likely_causes(model)}"
        )
    return f"モデル確認 OK: {answer} ({p:.2f})"
