"""Hub access for :mod:`helpers.models`: offline detection, cache-only loading, and errors explained.

Loading a model by hub id must never hang on a network that is not there, and must say why it
failed and what to do (a token, an instructor's pre-downloaded cache, a local folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from helpers import env
from helpers.models.base import ModelLoadError

__all__ = [
    "explain_load_error",
    "hub_offline",
    "is_hub_id",
    "missing_tokenizer_packages",
    "offline_plan",
    "read_config",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """True when ``name`` is spelled like a hub id (``owner/name``), not a relative path."""
    return bool(_HUB_ID.match(name)) and not name.startswith(("./", "../"))


def read_config(source: str | Path, local_only: bool) -> dict[str, Any]:
    """The ``config.json`` of a model folder or hub id, as a dict (from the cache when ``local_only``)."""
    path = Path(source) / "config.json"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(str(source), "config.json", local_files_only=local_only))
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def hub_offline(active: bool) -> Iterator[None]:
    """Make huggingface_hub use only its cache for the duration (no network waits) when ``active``."""
    if not active:
        yield
        return
    from huggingface_hub import constants

    before, env_before = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before
        if env_before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = env_before


def _missing_from_cache(files: Sequence[tuple[str, str]]) -> list[str]:
    """The ``repo/file`` entries of ``files`` that the local hub cache does not hold."""
    from huggingface_hub import try_to_load_from_cache

    return [
        f"{repo}/{name}" for repo, name in files if not isinstance(try_to_load_from_cache(repo, name), str)
    ]


def offline_plan(name: str, files: Sequence[tuple[str, str]]) -> bool:
    """True when the hub cannot be reached and ``files`` are all cached (load from the cache only).

    Raises :class:`ModelLoadError` at once when the hub cannot be reached and something is missing.
    """
    if env.hub_reachable():
        return False
    missing = _missing_from_cache(files)
    if missing:
        raise ModelLoadError(
            f"{name} を読み込めません: Hugging Face Hub に接続できず、キャッシュにもありません"
            f" ({missing[0]})。ネットワークを確認するか、接続できる環境で一度読み込んで"
            "キャッシュ (HF_HOME) を用意してください。"
            "図形しか知らない同梱の小さなモデルで試すなら --model embedded"
            " (Python では load_clip('embedded'))。"
        )
    return True


def missing_tokenizer_packages() -> list[str]:
    """Which of the packages transformers 5.x needs to read a SentencePiece ``spiece.model`` are missing."""
    import importlib.util

    wanted = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}
    missing = []
    for package, module in wanted.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(package)
    return missing


def explain_load_error(name: str, err: BaseException) -> str:
    """A one-paragraph Japanese explanation (cause + what to do) of why loading ``name`` failed."""
    import transformers

    status = getattr(getattr(err, "response", None), "status_code", None)
    kind = type(err).__name__
    detail = str(err).strip().splitlines()[0] if str(err).strip() else kind
    if status in (401, 403, 429):
        return (
            f"{name} を読み込めません: Hugging Face Hub がダウンロードを断りました (HTTP {status})。"
            "教室など多人数が同じ回線を使うと起きます: HF_TOKEN を設定する (huggingface_hub.login())、"
            "または講師が事前にダウンロードしたキャッシュ (HF_HOME) を使ってください。"
        )
    if kind in {"RepositoryNotFoundError", "GatedRepoError"}:
        return f"{name} を読み込めません: Hub にこの名前のモデルがないか、アクセスできません ({detail})。"
    if kind in {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} or "offline" in detail.lower():
        return f"{name} を読み込めません: オフラインでキャッシュにも見つかりません ({detail})。"
    missing = missing_tokenizer_packages()
    if missing and ("tiktoken" in detail or any(m in detail.lower() for m in missing)):
        # transformers 5.x falls back to its tiktoken reader when it cannot read spiece.model, then
        # reports "`tiktoken` is required"; the real cause is a missing SentencePiece reader.
        return (
            f"{name} のトークナイザー (SentencePiece の spiece.model) を読むには"
            f" {' と '.join(missing)} が必要です: `%pip install {' '.join(missing)}`"
        )
    return (
        f"{name} を読み込めません ({kind}: {detail})。transformers {transformers.__version__} との相性なら "
        "`%pip install transformers==4.51.3` で試せます。"
    )
