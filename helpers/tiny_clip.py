"""Training and evaluating the embedded tiny Japanese CLIP, which is shipped in Hugging Face format.

It stands in for the real hub models in CI and offline. Its architecture and loading live with the
other model backends (:mod:`helpers.models.embedded`); this command draws the pictures
(:mod:`helpers.fixtures.shapes`), trains for a fixed number of steps, writes the model card and
measures zero-shot accuracy. ``import helpers.tiny_clip`` registers the classes, after which
``AutoModel``/``AutoTokenizer``/``AutoImageProcessor.from_pretrained(MODEL_DIR)`` load the folder
like any hub model (see :func:`load` for the torchvision-free image processor import).

Commands::

    python -m helpers.tiny_clip train [--out DIR] [--steps N] [--seed S]
    python -m helpers.tiny_clip evaluate [--model-dir DIR] [--n N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from helpers import zeroshot
from helpers.fixtures.shapes import COLORS, LABELS, SHAPES, draw_shape, make_dataset
from helpers.models.compat import quiet_transformers
from helpers.models.embedded import (
    MODEL_DIR,
    TinyClipConfig,
    TinyClipModel,
    contrastive_loss,
    register,
)
from helpers.timing import pinned_threads

TEMPLATES: tuple[str, ...] = ("{}", "{}の絵", "{}の画像", "{}のイラスト")
"""Caption templates used in training, the bare label ``"{}"`` first."""

SENTENCE_TEMPLATES: tuple[str, ...] = ("{}が描かれている", "{}が描かれた絵", "これは{}です", "{}が一つある")
"""Sentence captions also used in training."""

IMAGE_SIZE = 64
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
"""Preprocessing: shorter side to 64 (bicubic), centre crop 64, CLIP's mean/std on the 0-1 scale."""

TRAIN_SEED = 0
EVAL_SEED = 20_261_123
"""Held-out pictures for :func:`evaluate`; training draws from ``[seed, 1, i]`` streams of small seeds."""

DEFAULT_STEPS = 1200
TRAIN_IMAGES = 16_000
TRAIN_DRAW_SIZES: tuple[int, ...] = (64, 64, 96, 128, 224)
BATCH_SIZE = 128
PEAK_LR = 2e-3
WARMUP_STEPS = 60
MAX_LOGIT_SCALE = math.log(100.0)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]")

__all__ = [
    "COLORS",
    "EVAL_SEED",
    "IMAGE_MEAN",
    "IMAGE_SIZE",
    "IMAGE_STD",
    "LABELS",
    "MODEL_DIR",
    "SENTENCE_TEMPLATES",
    "SHAPES",
    "TEMPLATES",
    "TinyClipConfig",
    "TinyClipModel",
    "build_image_processor",
    "build_tokenizer",
    "draw_shape",
    "evaluate",
    "load",
    "make_dataset",
    "quiet_transformers",
    "train",
    "zero_shot_accuracy",
]

register()


def _vocabulary() -> list[str]:
    chars = sorted({c for text in LABELS + list(TEMPLATES + SENTENCE_TEMPLATES) for c in text} - set("{}"))
    return list(SPECIAL_TOKENS) + chars


def build_tokenizer(max_length: int = 24, characters: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level ``PreTrainedTokenizerFast``: ``[CLS]`` + one token per character.

    The vocabulary is the special tokens plus ``characters`` (default: every character of the
    labels and templates the tiny model is trained on).
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    tokens = _vocabulary() if characters is None else [*SPECIAL_TOKENS, *sorted(set(characters))]
    vocab = {token: i for i, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A", pair="[CLS] $A $B", special_tokens=[("[CLS]", vocab["[CLS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        model_max_length=max_length,
        padding_side="right",
    )


def build_image_processor() -> CLIPImageProcessorPil:
    """The image processor (transformers' PIL-backend CLIP processor at 64 px; no torchvision needed)."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )


def load(
    model_dir: str | Path = MODEL_DIR,
) -> tuple[TinyClipModel, PreTrainedTokenizerFast, CLIPImageProcessorPil]:
    """(model, tokenizer, image processor) from ``model_dir`` through the Auto classes, quietly.

    ``AutoImageProcessor`` is imported from its module: on transformers 5.15 the top-level name
    ``transformers.AutoImageProcessor`` demands torchvision even for PIL-backend processors.
    The PIL backend is requested so every machine preprocesses identically.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    with quiet_transformers():
        model = AutoModel.from_pretrained(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    return model.eval(), tokenizer, processor


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def _label_embeddings(
    model: TinyClipModel, tokenizer: PreTrainedTokenizerFast, labels: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """One normalised text embedding per label, averaged over ``templates`` (a prompt ensemble)."""

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        return model.get_text_features(tokens["input_ids"], tokens["attention_mask"])

    return zeroshot.label_embeddings(encode, labels, templates)


@torch.no_grad()
def zero_shot_accuracy(
    model: TinyClipModel,
    tokenizer: PreTrainedTokenizerFast,
    processor: CLIPImageProcessorPil,
    images: Sequence,
    targets: Sequence[int],
    templates: Sequence[str] = ("{}",),
    labels: Sequence[str] = LABELS,
) -> float:
    """Top-1 zero-shot accuracy of ``model`` on ``images`` (PIL or uint8 HWC arrays) over ``labels``."""
    text = _label_embeddings(model, tokenizer, labels, templates)
    correct = 0
    for start in range(0, len(images), 250):
        chunk = [np.asarray(im) for im in images[start : start + 250]]
        pixels = processor(images=chunk, return_tensors="pt")["pixel_values"]
        predicted = zeroshot.cosine(model.get_image_features(pixels), text).argmax(dim=-1)
        correct += int((predicted == torch.as_tensor(targets[start : start + 250])).sum())
    return correct / len(images)


def evaluate(
    model_dir: str | Path = MODEL_DIR,
    n: int = 500,
    seed: int = EVAL_SEED,
    templates: Sequence[str] = ("{}",),
    draw_size: int = IMAGE_SIZE,
) -> float:
    """Zero-shot top-1 accuracy over all :data:`LABELS` on ``n`` freshly drawn held-out pictures."""
    model, tokenizer, processor = load(model_dir)
    images, targets = make_dataset(n, seed, size=draw_size)
    return zero_shot_accuracy(model, tokenizer, processor, list(images), targets, templates)


# --- training ---------------------------------------------------------------------------------


def training_images(n: int, seed: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The training pictures (uint8 [n, 64, 64, 3]) and label indices, drawn in ``workers`` processes."""
    bounds = [int(b) for b in np.linspace(0, n, max(workers, 1) + 1)]
    if workers <= 1:
        parts = [make_dataset(n, seed, IMAGE_SIZE, TRAIN_DRAW_SIZES)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [
                pool.submit(make_dataset, n, seed, IMAGE_SIZE, TRAIN_DRAW_SIZES, start=a, stop=b)
                for a, b in itertools.pairwise(bounds)
            ]
            parts = [f.result() for f in futures]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([np.asarray(p[1]) for p in parts])
    return images, labels


def _augment(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips and transposes per picture (shapes and colours keep their names)."""
    b = batch.shape[0]
    flip_h, flip_v, swap = (torch.rand(3, b, 1, 1, 1, generator=gen) < 0.5).unbind(0)
    batch = torch.where(flip_h, batch.flip(3), batch)
    batch = torch.where(flip_v, batch.flip(2), batch)
    return torch.where(swap, batch.transpose(2, 3), batch)


def _say(message: str) -> None:
    """Print a progress line at once (also when stdout is a log file)."""
    print(message, flush=True)


def _lr_at(step: int, steps: int, warmup: int = WARMUP_STEPS) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    warmup = min(warmup, max(steps // 10, 1))
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return PEAK_LR * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    out: str | Path = MODEL_DIR,
    steps: int = DEFAULT_STEPS,
    seed: int = TRAIN_SEED,
    n_images: int = TRAIN_IMAGES,
    batch_size: int = BATCH_SIZE,
    threads: int = 1,
    log_every: int = 100,
    log: Callable[[str], object] = _say,
    callback: Callable[[int, TinyClipModel], object] | None = None,
    config: TinyClipConfig | None = None,
) -> dict:
    """Train the tiny CLIP for exactly ``steps`` steps and save it (with its model card) to ``out``.

    ``callback(step, model)`` runs after every ``log_every`` steps (e.g. to evaluate).
    Returns a summary dict (steps, seconds, parameter count, final loss, logit scale).
    """
    with pinned_threads(threads):
        return _train(Path(out), steps, seed, n_images, batch_size, threads, log_every, log, callback, config)


def _train(
    out: Path,
    steps: int,
    seed: int,
    n_images: int,
    batch_size: int,
    threads: int,
    log_every: int,
    log: Callable[[str], object],
    callback: Callable[[int, TinyClipModel], object] | None,
    config: TinyClipConfig | None,
) -> dict:
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    images_np, labels_np = training_images(n_images, seed, workers=2)
    images = torch.from_numpy(images_np).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    labels = torch.from_numpy(labels_np).long()
    log(f"drew {len(images)} training pictures in {time.perf_counter() - started:.0f} s")

    templates = TEMPLATES + SENTENCE_TEMPLATES
    captions = [t.format(label) for label in LABELS for t in templates]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)

    config = config or TinyClipConfig()
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    model = TinyClipModel(config).train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.02}, {"params": no_decay, "weight_decay": 0.0}], lr=PEAK_LR
    )
    gen = torch.Generator().manual_seed(seed)
    loss_avg = float("nan")
    bar = tqdm(range(steps), desc="tiny CLIP を学習中", mininterval=2.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps)
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        pixels = _augment(images[idx], gen).float().div_(255).sub_(mean).div_(std)
        batch_labels = labels[idx]
        which = batch_labels * len(templates) + torch.randint(0, len(templates), (batch_size,), generator=gen)
        out_ = model(
            input_ids=tokens["input_ids"][which],
            attention_mask=tokens["attention_mask"][which],
            pixel_values=pixels,
        )
        loss = contrastive_loss(out_.logits_per_image, batch_labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        loss_avg = loss.item() if step == 0 else 0.95 * loss_avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.3f}", refresh=False)
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            log(
                f"step {step + 1}/{steps}  loss {loss_avg:.3f}  scale {model.logit_scale.exp().item():.1f}"
                f"  {time.perf_counter() - started:.0f} s"
            )
            if callback is not None:
                callback(step + 1, model)
                model.train()
    bar.close()
    seconds = time.perf_counter() - started
    model.eval()
    summary = {
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "train_images": n_images,
        "seconds": round(seconds, 1),
        "parameters": n_params,
        "final_loss": round(loss_avg, 4),
        "logit_scale": round(model.logit_scale.exp().item(), 2),
        "threads": threads,
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {threads} torch thread(s), "
        f"torch {torch.__version__}",
    }
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        _portable_tokenizer_class(out)
        build_image_processor().save_pretrained(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary


def _portable_tokenizer_class(folder: Path) -> None:
    """Name the tokenizer class ``PreTrainedTokenizerFast`` (5.x writes its alias ``TokenizersBackend``,
    which transformers 4.x does not know); both lines then load the same tokenizer."""
    path = folder / "tokenizer_config.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- model card -------------------------------------------------------------------------------


def write_model_card(out: Path, summary: dict, scores: dict[str, float]) -> None:
    """Write ``README.md`` (the model card) into ``out`` from the training summary and measured scores."""
    mb = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 1e6
    card = MODEL_CARD.format(
        params=f"{summary['parameters']:,}",
        steps=summary["steps"],
        seed=summary["seed"],
        batch=summary["batch_size"],
        images=f"{summary['train_images']:,}",
        minutes=summary["seconds"] / 60,
        machine=summary["machine"],
        scale=summary["logit_scale"],
        temperature=1 / summary["logit_scale"],
        bare=scores["bare"],
        template=scores["template"],
        sentence=scores["sentence"],
        large=scores["large"],
        ensemble=scores["ensemble"],
        n=scores["n"],
        eval_seed=EVAL_SEED,
        labels="、".join(LABELS),
        templates="、".join(f"「{t}」" for t in TEMPLATES),
        sentences="、".join(f"「{t}」" for t in SENTENCE_TEMPLATES),
        size_mb=mb,
    )
    (out / "README.md").write_text(card, encoding="utf-8")


MODEL_CARD = """\
---
license: mit
language: ja
tags: [clip, zero-shot-image-classification, toy-model]
---

# tiny-clip-ja(教材用の小さな日本語 CLIP)

このリポジトリのコード(`helpers/tiny_clip.py`)が自分で描いた図形の絵だけで学習した、
とても小さな日本語 CLIP です。CI やオフライン環境で、本物の日本語 CLIP(Hugging Face Hub の
モデル)の代わりに同じ `from_pretrained` の道筋で読み込むために同梱しています。

## 何で学習したか
- データ: `helpers/shapes.py` が numpy の乱数と PIL の `ImageDraw` で描いた 64×64 の絵
  (一部は 96〜224 px で描いてから bicubic で 64 px に縮小)。背景は灰色系の単色・グラデーション・ノイズ、
  図形の大きさ・位置・回転・色味はランダム。外部のデータは一切使っていません。
- ラベル(20 種 = 5 色 × 4 形): {labels}
- キャプション: テンプレート {templates} と文 {sentences}。
  同じラベルのペアはバッチ内で正解を分け合うソフトターゲットの対照学習(CLIP の損失)。
- ライセンス: リポジトリのコードと同じ MIT。

## どう学習したか
- 画像側: 3×3 畳み込み 4 層(BatchNorm + ReLU)+ 大域平均プーリング + 線形射影。
- テキスト側: 文字単位のトークナイザー(`[CLS]` + 1 文字 1 トークン)+ 2 層の Transformer、
  `[CLS]` の出力を射影。
- 埋め込みは 128 次元、学習される `logit_scale`(CLIP と同じく対数で保存、初期値 log(1/0.07)、上限 100)。
- パラメータ数 {params}、{steps} ステップ × バッチ {batch}(事前に描いた {images} 枚 + 反転・転置)、
  AdamW、ウォームアップ付きコサイン学習率、シード {seed}。
- 学習時間 {minutes:.1f} 分({machine}。ほかの作業と共用のマシンで計測)。
  `python -m helpers.tiny_clip train` で同じ手順を再現できます(ステップ数固定)。

## どれくらい当たるか
`python -m helpers.tiny_clip evaluate`: 学習に使っていないシード {eval_seed} で新しく描いた {n} 枚、
20 ラベルすべての中からのゼロショット top-1 正解率:

| テキスト | 正解率 |
| --- | --- |
| ラベルだけ(「赤い丸」) | {bare:.3f} |
| テンプレート「{{}}の絵」 | {template:.3f} |
| 文「{{}}が描かれている」 | {sentence:.3f} |
| 学習時の 8 つのテンプレートの平均(プロンプトアンサンブル) | {ensemble:.3f} |
| ラベルだけ、224 px で描いた絵を 64 px に縮小 | {large:.3f} |

学習された logit scale: {scale:.1f}(温度 1/scale = {temperature:.4f})。フォルダーの大きさ: {size_mb:.1f} MB。

## 限界
この絵の世界(5 色 × 4 形の図形 1 つ)しか知りません。写真や他の言葉には意味のある答えを返しません。
語彙は学習に出てきた文字だけで、それ以外の文字は `[UNK]` になります。速度の計測には
`random:vit-b16` など本物と同じ大きさのモデルを使ってください。

## 読み込み方
```python
import helpers.tiny_clip  # AutoConfig / AutoModel に登録される
from transformers import AutoModel, AutoTokenizer
from transformers.models.auto.image_processing_auto import AutoImageProcessor

model = AutoModel.from_pretrained(helpers.tiny_clip.MODEL_DIR)
tokenizer = AutoTokenizer.from_pretrained(helpers.tiny_clip.MODEL_DIR)
processor = AutoImageProcessor.from_pretrained(helpers.tiny_clip.MODEL_DIR, backend="pil")
```
(transformers 5.15 では torchvision が無いと `transformers.AutoImageProcessor` が使えないため、
モジュールから直接 import しています。)

## English summary
A tiny Japanese CLIP ({params} parameters: a 4-layer conv image tower and a 2-layer character-level
text transformer, 128-d embeddings, learned logit scale) trained by this repository's own code on
64 px pictures of coloured shapes that the code draws itself (no external data; MIT licence, like
the code). 20 labels (5 colours × 4 shapes), {steps} steps of batch {batch}, seed {seed},
{minutes:.1f} minutes on a shared 2-core CPU ({machine}).
Zero-shot top-1 on {n} held-out drawings: {bare:.3f} with bare labels, {template:.3f} with
「{{}}の絵」, {sentence:.3f} with 「{{}}が描かれている」, {ensemble:.3f} averaging all 8 training templates,
{large:.3f} on 224 px drawings scaled down by the processor; logit scale {scale:.1f}.
It only knows these drawn shapes and is meaningless on photos. It exists so that CI and offline
runs exercise the same `from_pretrained` code path as the real hub models.
"""


# --- command line -----------------------------------------------------------------------------


def _report(model_dir: Path, n: int, seed: int, say=print) -> dict[str, float]:
    """Measure and print every accuracy ``evaluate`` reports; returns them."""
    model, tokenizer, processor = load(model_dir)
    images, targets = make_dataset(n, seed)
    large, _ = make_dataset(n, seed, size=224)
    scores = {"n": n}
    for key, templates, what in (
        ("bare", ("{}",), "ラベルだけ 「赤い丸」"),
        ("template", ("{}の絵",), "テンプレート 「{}の絵」"),
        ("sentence", ("{}が描かれている",), "文 「{}が描かれている」"),
        ("ensemble", TEMPLATES + SENTENCE_TEMPLATES, "学習時の全テンプレートの平均"),
    ):
        scores[key] = zero_shot_accuracy(model, tokenizer, processor, list(images), targets, templates)
        say(f"{what}: {scores[key]:.3f}")
    scores["large"] = zero_shot_accuracy(model, tokenizer, processor, list(large), targets)
    say(f"224 px で描いて 64 px に縮小、ラベルだけ: {scores['large']:.3f}")
    scale = model.logit_scale.exp().item()
    say(f"logit scale: {scale:.2f} (温度 1/scale = {1 / scale:.4f})")
    return scores


def main(argv: Sequence[str] | None = None) -> int:
    """``train`` or ``evaluate`` from the command line."""
    parser = argparse.ArgumentParser(prog="python -m helpers.tiny_clip", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="draw pictures, train, save, evaluate")
    p_train.add_argument("--out", type=Path, default=MODEL_DIR)
    p_train.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p_train.add_argument("--seed", type=int, default=TRAIN_SEED)
    p_train.add_argument("--images", type=int, default=TRAIN_IMAGES, help="pictures drawn before training")
    p_train.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p_train.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest)")
    p_train.add_argument("--eval-n", type=int, default=500)
    p_eval = sub.add_parser("evaluate", help="zero-shot accuracy on held-out drawings")
    p_eval.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    p_eval.add_argument("--n", type=int, default=500)
    p_eval.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args(argv)

    if args.command == "train":
        summary = train(
            args.out,
            steps=args.steps,
            seed=args.seed,
            n_images=args.images,
            batch_size=args.batch_size,
            threads=args.threads,
        )
        print(json.dumps(summary, ensure_ascii=False))
        scores = _report(args.out, args.eval_n, EVAL_SEED)
        write_model_card(args.out, summary, scores)
        print(f"saved to {args.out}")
    else:
        scores = _report(args.model_dir, args.n, args.seed)
    print(f"accuracy: {scores['bare']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
