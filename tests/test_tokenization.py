"""Tokenisation equal to transformers 4.x for the SentencePiece tokenizer LINE's and rinna's code use.

Both wrap ``T5Tokenizer`` over ``rinna/japanese-roberta-base``'s ``spiece.model`` and set
``do_lower_case = True``. A SentencePiece model with that layout (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``[PAD]`` 3, ``[CLS]`` 4, ``[SEP]`` 5, ``[MASK]`` 6, unigram, NFKC) is trained here offline in a second.
The expected ids are what transformers 4.51.3's slow ``T5Tokenizer`` gives for it (lower-cased text,
the model's own ``<unk>``), written out below; on 5.x without the project's repairs, 「Tシャツ」 and
「ＮＡＳＡ」 keep their capitals and the emoji and the rare kanji become id 2 (``</s>``).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from helpers.models import PreprocessSpec, Scoring, load_clip
from helpers.models.hf import HFClip

FAKE_RINNA = Path(__file__).parent / "fake_japanese_clip"
CLS_ID, UNK_ID = 4, 0

SENTENCES = [
    "犬が公園で走っている。", "猫がソファの上で寝ている。", "赤いシャツを着た男性が立っている。",
    "白いシャツと青いジーンズ。", "写真には山と湖が写っている。", "子供たちがサッカーをしている。",
    "テーブルの上にコーヒーとケーキがある。", "電車が駅に到着した。", "女性がカメラで写真を撮っている。",
    "ひらがなとカタカナと漢字を使う。", "きれいなはなが咲いている。", "おいしいラーメンを食べた。",
    "東京タワーと富士山の風景。", "宇宙ロケットが打ち上げられた。", "nasa launched a rocket.",
    "a photo of a dog.", "a photo of a cat.", "t-shirt and jeans.", "tシャツを着た子供。",
    "shirt shop in tokyo.", "new york city at night.", "the quick brown fox jumps over the lazy dog.",
    "バスケットボールをする少年。", "ピザとパスタとサラダ。", "海辺で夕日を眺める。",
]  # fmt: skip

CASES = {  # text → (pieces, ids) that transformers 4.51.3's slow T5Tokenizer gives for this model
    "Tシャツ": (["▁t", "シ", "ャ", "ツ"], [38, 170, 167, 168]),  # capital: lower-cased first
    "ＮＡＳＡ": (["▁n", "a", "s", "a"], [36, 37, 28, 37]),  # full-width: lower-cased, then NFKC
    "😀": (["▁", "😀"], [7, UNK_ID]),  # not in the vocabulary: the model's own <unk>, not 2
    "龘": (["▁", "龘"], [7, UNK_ID]),  # a rare kanji: the same
}


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory) -> Path:
    """A ``from_pretrained`` folder like ``rinna/japanese-roberta-base``: spiece.model and its configs."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20),
        model_writer=model,
        model_type="unigram",
        vocab_size=200,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=True,
        byte_fallback=False,
        unk_id=UNK_ID,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        control_symbols=["[PAD]", "[CLS]", "[SEP]", "[MASK]"],
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    assert [p.piece for p in proto.pieces[:7]] == [
        "<unk>",
        "<s>",
        "</s>",
        "[PAD]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
    ]
    folder = tmp_path_factory.mktemp("spiece")
    (folder / "spiece.model").write_bytes(model.getvalue())
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    settings = {**special, "extra_ids": 0, "additional_special_tokens": [], "tokenizer_class": "T5Tokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": True}))
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    for text, (pieces, _) in CASES.items():  # the trained model is the one the ids were written for
        assert processor.encode(text.lower(), out_type=str) == pieces, text
    return folder


class ClypLikeTokenizer:
    """What LINE's ``CLYPTokenizer`` does: a ``T5Tokenizer`` with ``do_lower_case = True`` inside,
    ``[CLS]`` prepended by hand, padding to the longest text, ``position_ids`` built alongside."""

    def __init__(self, folder: Path) -> None:
        from transformers import T5Tokenizer

        self.tokenizer = T5Tokenizer.from_pretrained(folder)
        self.tokenizer.do_lower_case = True

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(
            texts, max_length=76, padding="longest", truncation=True, add_special_tokens=False
        )
        input_ids = [[self.tokenizer.cls_token_id, *ids] for ids in out["input_ids"]]
        mask = [[1, *m] for m in out["attention_mask"]]
        positions = [list(range(len(input_ids[0])))] * len(input_ids)
        return {
            "input_ids": torch.tensor(input_ids),
            "attention_mask": torch.tensor(mask),
            "position_ids": torch.tensor(positions),
        }


class _TextTower(torch.nn.Module):
    def get_text_features(self, input_ids=None, attention_mask=None, position_ids=None):
        return input_ids.float()


@pytest.mark.parametrize("text", list(CASES))
def test_line_style_tokens_equal_transformers_4(spiece_dir, text):
    """The HF backend with a CLYP-style remote tokenizer: [CLS] + the 4.x ids."""
    model = HFClip(
        name="line-like",
        kind="real",
        module=_TextTower(),
        preprocess_spec=PreprocessSpec(32, "squash", "bicubic", (0.5,) * 3, (0.5,) * 3),
        scoring=Scoring("softmax", 100.0),
        device=torch.device("cpu"),
        dtype=torch.float32,
        tokenizer=ClypLikeTokenizer(spiece_dir),
        processor=None,
    )
    assert model.tokenize([text])["input_ids"][0].tolist() == [CLS_ID, *CASES[text][1]]


@pytest.fixture
def rinna_with_spiece(monkeypatch, spiece_dir):
    from helpers import env

    monkeypatch.syspath_prepend(str(FAKE_RINNA))
    monkeypatch.delitem(sys.modules, "japanese_clip", raising=False)
    monkeypatch.setattr(env, "hub_reachable", lambda *a, **k: True)
    monkeypatch.setenv("FAKE_JAPANESE_CLIP_SPIECE", str(spiece_dir))
    yield
    sys.modules.pop("japanese_clip", None)


@pytest.mark.parametrize("text", list(CASES))
def test_rinna_tokens_equal_transformers_4(rinna_with_spiece, text):
    """rinna's own ``tokenize`` (padding to 77) through the rinna backend: [CLS] + the 4.x ids."""
    model = load_clip("rinna/japanese-clip-vit-b-16", device="cpu")
    tokens = model.tokenize([text])
    expected = [CLS_ID, *CASES[text][1]]
    assert tokens["input_ids"][0, : len(expected)].tolist() == expected
    assert int(tokens["attention_mask"][0].sum()) == len(expected)


def test_special_tokens_keep_their_spelling_when_lower_casing(spiece_dir):
    from helpers.models.compat import lower_case_like_slow_tokenizers

    tokenizer = ClypLikeTokenizer(spiece_dir)
    assert lower_case_like_slow_tokenizers(["[CLS]ＡBc [MASK]"], tokenizer) == ["[CLS]ａbc [MASK]"]
    assert lower_case_like_slow_tokenizers(["ABC"], object()) == ["ABC"]  # nobody asked: unchanged


def test_a_missing_tokenizer_package_is_named_not_tiktoken(monkeypatch):
    """transformers 5.x says "`tiktoken` is required" when sentencepiece or protobuf is missing."""
    import importlib.util

    from helpers.models import hub

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "sentencepiece" else real(n, *a)
    )
    err = ValueError(
        "`tiktoken` is required to read a `tiktoken` file. Install it with `pip install tiktoken`."
    )
    message = hub.explain_load_error("rinna/japanese-clip-vit-b-16", err)
    assert "sentencepiece" in message and "tiktoken" not in message and "\n" not in message
    assert "%pip install sentencepiece" in message
