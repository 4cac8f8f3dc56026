"""Keeping older CLIP code working on transformers 5.x and huggingface_hub 1.x.

Everything here is small, documented and applied only where the thing it supplies is missing:

- :func:`as_features`: ``get_image_features``/``get_text_features`` return a tensor on some
  versions and an output object (features in ``.pooler_output``) on transformers 5.x.
- :func:`apply_legacy_shims`: names that rinna's ``japanese_clip`` package and LINE's remote code
  (written for transformers 4.2x-4.4x) import or call, but that newer libraries removed or renamed.
- :func:`ensure_post_init`: remote-code models that never call ``post_init()`` (LINE's), which
  transformers 5.x needs before ``from_pretrained`` can finish.
- :func:`reinit_non_persistent_buffers`: transformers 5.x builds a model on the meta device and
  leaves buffers that are not in the checkpoint uninitialised unless the model's own
  ``_init_weights`` fills them; LINE's does nothing, so timm's EVA02 rotary embeddings (RoPE) end up
  as garbage and the features are wrong. This recomputes them the way the modules' ``__init__`` does.
- :func:`quiet_transformers`: transformers' progress bars and warnings off for a while.
- :func:`lower_case_like_slow_tokenizers` and :func:`repair_unigram_unk_id`: the SentencePiece
  tokenizer LINE's and rinna's code load (``T5Tokenizer`` over ``rinna/japanese-roberta-base``'s
  ``spiece.model``) tokenises differently on 5.x. Both set ``tokenizer.do_lower_case = True``, which
  4.x's slow tokenizers honoured and 5.x's tokenizers-backed class ignores (「Tシャツ」, 「ＮＡＳＡ」 keep
  their capitals); and 5.x builds the Unigram model with ``unk_id=2`` whatever the SentencePiece model
  says (rinna's ``<unk>`` is 0; 2 is ``</s>``), so emoji and rare kanji become ``</s>``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "apply_legacy_shims",
    "as_features",
    "ensure_post_init",
    "lower_case_like_slow_tokenizers",
    "non_persistent_buffer_names",
    "quiet_transformers",
    "reinit_non_persistent_buffers",
    "repair_unigram_unk_id",
    "wants_lower_case",
]


# ------------------------------------------------------------------ outputs


def as_features(output: Any) -> torch.Tensor:
    """The feature tensor [B, D] from what a ``get_*_features`` call returned.

    Accepts a plain tensor (transformers 4.x, rinna, LINE, the embedded model), an output object
    with ``pooler_output`` (transformers 5.x ``BaseModelOutputWithPooling``), one with
    ``image_embeds``/``text_embeds``, or a tuple whose first item is the features.
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find features in a {type(output).__name__} (expected a tensor or pooler_output)")


# ------------------------------------------------------------------ logging


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Turn transformers' progress bars and warnings off for the duration, then restore them."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------ SentencePiece tokenizers on 5.x


def wants_lower_case(tokenizer: Any) -> bool:
    """True when ``tokenizer`` (or the tokenizer it wraps, as LINE's ``CLYPTokenizer`` does) asks for
    lower-casing through ``do_lower_case``."""
    inner = getattr(tokenizer, "tokenizer", None)
    return bool(getattr(tokenizer, "do_lower_case", False) or getattr(inner, "do_lower_case", False))


def lower_case_like_slow_tokenizers(texts: list[str], tokenizer: Any) -> list[str]:
    """``texts`` lower-cased the way transformers 4.x's slow tokenizers did when ``do_lower_case`` was
    set: ``str.lower()`` on everything except the special tokens, which keep their spelling.

    Applied before tokenising, it gives the same ids on 4.x (where lower-casing again changes nothing)
    and on 5.x (where the tokenizer no longer does it).
    """
    if not wants_lower_case(tokenizer):
        return list(texts)
    inner = getattr(tokenizer, "tokenizer", None)
    specials = {
        str(t) for tok in (tokenizer, inner) for t in (getattr(tok, "all_special_tokens", None) or [])
    }
    if not specials:
        return [text.lower() for text in texts]
    pattern = re.compile(
        "(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + r")|(.+?)"
    )
    return [pattern.sub(lambda m: m.group(1) or m.group(2).lower(), text) for text in texts]


def _sentencepiece_unk_id(tokenizer: Any, vocab: list) -> int | None:
    """The ``<unk>`` id of the SentencePiece model behind ``tokenizer``: from the model file itself
    (``unk_id()``) when sentencepiece can read it, else the unknown piece's position in the vocabulary."""
    vocab_file = getattr(tokenizer, "vocab_file", None)
    if vocab_file and str(vocab_file).endswith(".model"):
        try:
            import sentencepiece

            return int(sentencepiece.SentencePieceProcessor(model_file=str(vocab_file)).unk_id())
        except (ImportError, OSError, RuntimeError):
            pass
    unk = getattr(tokenizer, "unk_token", None)
    pieces = [entry[0] for entry in vocab]
    return pieces.index(str(unk)) if unk is not None and str(unk) in pieces else None


def repair_unigram_unk_id(tokenizer: Any) -> bool:
    """Make a tokenizers-backed SentencePiece (Unigram) tokenizer map unknown pieces to its model's own
    ``<unk>`` id instead of the 2 that transformers 5.x hard-codes for T5. Returns True when it changed
    something (nothing to do on 4.x's slow tokenizers, or when the ids already agree)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return False
    settings = json.loads(backend.to_str())
    model = settings.get("model") or {}
    if model.get("type") != "Unigram":
        return False
    right = _sentencepiece_unk_id(tokenizer, model.get("vocab") or [])
    if right is None or right == model.get("unk_id"):
        return False
    from tokenizers import Tokenizer

    model["unk_id"] = right
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(settings))
    return True


# ------------------------------------------------------------------ names removed from the libraries

_HUB_URL = re.compile(r"/(?P<repo>[^/]+/[^/]+|[^/]+)/resolve/(?P<revision>[^/]+)/(?P<filename>.+)$")


def _cached_download(url: str, *, cache_dir: str | None = None, **kwargs: Any) -> str:
    """Stand-in for ``huggingface_hub.cached_download`` (removed in 0.26): a file URL from
    ``hf_hub_url`` is fetched with ``hf_hub_download`` into the usual cache."""
    from huggingface_hub import hf_hub_download

    match = _HUB_URL.search(url.split("?", 1)[0])
    if match is None:
        raise ValueError(f"cached_download shim understands only hf_hub_url() addresses, not {url!r}")
    return hf_hub_download(
        repo_id=match["repo"],
        filename=match["filename"],
        revision=match["revision"],
        cache_dir=cache_dir,
        token=kwargs.get("token") or kwargs.get("use_auth_token"),
    )


class _NoDefaultsFromIsComposition:
    """``has_no_defaults_at_init`` that also honours its pre-4.52 name ``is_composition``.

    Configuration classes in old remote code say ``is_composition = True`` because their
    ``__init__`` raises without sub-configs (rinna: "`vision_config` can not be `None`").
    transformers >= 4.52 reads only ``has_no_defaults_at_init`` and calls ``cls()`` to diff
    against defaults, even for ``repr(config)`` inside ``from_pretrained``. Classes that define
    ``has_no_defaults_at_init`` themselves shadow this descriptor; transformers' own classes keep
    the base value ``False``.
    """

    def __get__(self, obj: Any, owner: type) -> bool:
        for klass in owner.__mro__:
            if klass.__module__.startswith("transformers."):
                continue
            if klass.__dict__.get("is_composition", False):
                return True
        return False


def apply_legacy_shims() -> list[str]:
    """Supply what old CLIP code expects from transformers / huggingface_hub; idempotent.

    Returns the names it added this call (empty when the libraries already have them all):

    - ``huggingface_hub.cached_download`` (rinna's ``japanese_clip`` imports it; removed in hub 0.26)
    - ``transformers.modeling_utils.ModelOutput`` (rinna imports it from there; moved in 5.x)
    - ``PreTrainedConfig.has_no_defaults_at_init`` honouring ``is_composition`` (rinna's and LINE's
      configs, else "`vision_config` can not be `None`" on transformers >= 4.52)
    - ``PreTrainedConfig.dict_torch_dtype_to_str`` (LINE's ``to_diff_dict`` calls it; renamed
      ``dict_dtype_to_str`` in 5.x)
    """
    import huggingface_hub
    import transformers.modeling_utils as modeling_utils
    from transformers import PretrainedConfig

    added: list[str] = []
    if not hasattr(huggingface_hub, "cached_download"):
        huggingface_hub.cached_download = _cached_download
        added.append("huggingface_hub.cached_download")
    if not hasattr(modeling_utils, "ModelOutput"):
        from transformers.utils import ModelOutput

        modeling_utils.ModelOutput = ModelOutput
        added.append("transformers.modeling_utils.ModelOutput")
    base = PretrainedConfig
    if "is_composition" not in base.__dict__ and not isinstance(
        base.__dict__.get("has_no_defaults_at_init"), _NoDefaultsFromIsComposition
    ):
        base.has_no_defaults_at_init = _NoDefaultsFromIsComposition()
        added.append("PretrainedConfig.has_no_defaults_at_init")
    if not hasattr(base, "dict_torch_dtype_to_str") and hasattr(base, "dict_dtype_to_str"):
        base.dict_torch_dtype_to_str = base.dict_dtype_to_str
        added.append("PretrainedConfig.dict_torch_dtype_to_str")
    return added


def ensure_post_init(model_class: type) -> bool:
    """Make ``model_class.__init__`` end with ``post_init()`` if it forgets to (transformers 5.x only).

    transformers 5.x's ``from_pretrained`` reads ``all_tied_weights_keys``, which ``post_init()``
    sets; LINE's ``CLYPModel`` never calls it and would fail with an ``AttributeError``. Only
    instances still missing that attribute after their own ``__init__`` get the call. Returns True
    when the class was wrapped (now or before).
    """
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "get_expanded_tied_weights_keys"):  # transformers 4.x
        return False
    if getattr(model_class.__init__, "_clip_compat_post_init", False):
        return True
    original: Callable[..., None] = model_class.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if type(self) is model_class and "all_tied_weights_keys" not in self.__dict__:
            self.post_init()

    __init__._clip_compat_post_init = True  # type: ignore[attr-defined]
    __init__.__doc__ = original.__doc__
    __init__.__signature__ = inspect.signature(original)  # type: ignore[attr-defined]
    model_class.__init__ = __init__
    return True


# ------------------------------------------------------------------ buffers left empty by meta-device loading


def non_persistent_buffer_names(module: nn.Module) -> list[str]:
    """Names of all buffers under ``module`` that are not saved in checkpoints."""
    names = []
    for prefix, sub in module.named_modules():
        for name in sub._non_persistent_buffers_set:
            if getattr(sub, name, None) is not None:
                names.append(f"{prefix}.{name}" if prefix else name)
    return names


def _recompute_legacy_rope(module: nn.Module) -> bool:
    """Refill an older timm ``RotaryEmbedding``/``RotaryEmbeddingCat`` with the values its ``__init__``
    computes (timm 1.0.20 and older have no ``init_non_persistent_buffers``; 1.0.15 and 1.0.20 checked)."""
    from timm.layers import pos_embed_sincos as sincos  # type: ignore[import-not-found]

    kind = type(module).__name__
    if kind not in {"RotaryEmbedding", "RotaryEmbeddingCat"}:
        return False
    # Attributes as stored by timm 1.0.x (older releases lack some; their defaults apply).
    dim, max_res = module.dim, getattr(module, "max_res", 224)
    temperature, in_pixels = getattr(module, "temperature", 10000), getattr(module, "in_pixels", True)
    linear_bands = getattr(module, "linear_bands", False)
    bands = getattr(module, "bands", None)
    if isinstance(bands, torch.Tensor):
        if in_pixels:
            fresh = sincos.pixel_freq_bands(dim // 4, float(max_res), linear_bands=linear_bands)
        else:
            fresh = sincos.freq_bands(dim // 4, temperature=temperature, step=1)
        bands.copy_(fresh)
    if getattr(module, "feat_shape", None) is None:
        return True
    wanted = {
        "feat_shape": module.feat_shape,
        "dim": dim,
        "max_res": max_res,
        "temperature": temperature,
        "linear_bands": linear_bands,
        "in_pixels": in_pixels,
        "ref_feat_shape": getattr(module, "ref_feat_shape", None),
        "grid_offset": getattr(module, "grid_offset", 0.0),
        "grid_indexing": getattr(module, "grid_indexing", "ij"),
    }
    accepted = inspect.signature(sincos.build_rotary_pos_embed).parameters
    sin_emb, cos_emb = sincos.build_rotary_pos_embed(**{k: v for k, v in wanted.items() if k in accepted})
    if kind == "RotaryEmbeddingCat":
        module.pos_embed.copy_(torch.cat([sin_emb, cos_emb], -1))
    else:
        module.pos_embed_sin.copy_(sin_emb)
        module.pos_embed_cos.copy_(cos_emb)
    return True


@torch.no_grad()
def reinit_non_persistent_buffers(model: nn.Module) -> list[str]:
    """Recompute computed (non-persistent) buffers the way the modules' ``__init__`` does.

    For every sub-module that offers ``init_non_persistent_buffers()`` (timm >= 1.0.24: RoPE
    ``bands``/``pos_embed``, EVA attention's zero ``k_bias``, relative-position indices, ...) that
    method is called. Older timm releases lack it; their ``RotaryEmbedding(Cat)`` modules are
    rebuilt with timm's own ``build_rotary_pos_embed`` and EVA attention's ``k_bias`` is zeroed.
    Call it on a model whose weights are loaded, before moving it to another dtype. Checked with
    timm 1.0.15, 1.0.20 and 1.0.31: an EVA02 loaded through transformers 5.15 then gives exactly the
    features of the model it was saved from (NaN or wrong values before).
    Returns the names of the modules it refilled.
    """
    refilled = []
    for name, module in model.named_modules():
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        elif not type(module).__module__.startswith("timm."):
            continue
        elif not _recompute_legacy_rope(module):
            if "k_bias" not in module._non_persistent_buffers_set or module.k_bias is None:
                continue
            module.k_bias.zero_()  # EVA attention: a constant zero bias between q's and v's
        refilled.append(name or "(root)")
    return refilled
