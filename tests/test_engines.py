"""helpers.engines: one record per file, in input order, bad files as errors, both backends."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import helpers
from helpers import engines, env
from helpers.data import open_image
from helpers.fixtures import shapes
from helpers.models import ClipModel, load_clip, preprocess_with_spec, random_vit

BAD = {  # file name → a word its error reason must contain
    "empty.jpg": "empty",
    "text.jpg": "not an image",
    "truncated.jpg": "truncated",
    "folder.jpg": "directory",
}


@pytest.fixture(scope="module")
def model() -> ClipModel:
    return load_clip("embedded", device="cpu")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Good pictures of several sizes and formats with bad files in between (first and last good)."""
    root = tmp_path_factory.mktemp("engine")
    good = []
    for i, (label, size) in enumerate(
        [("赤い丸", 96), ("青い三角", 80), ("緑の四角", 120), ("黄色い星", 64)]
    ):
        picture = shapes.draw_shape(label, i, size=size)
        if i == 1:
            picture = picture.resize((size, size // 2))
        path = root / f"good{i}.{'png' if i == 2 else 'jpg'}"
        picture.save(path)
        good.append(path)
    big = root / "good4.jpg"
    shapes.draw_shape("赤い丸", 9, size=160).save(big, quality=90)
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is text, not a JPEG")
    (root / "truncated.jpg").write_bytes(big.read_bytes()[:600])
    (root / "folder.jpg").mkdir()
    names = ["good0.jpg", "empty.jpg", "good1.jpg", "text.jpg", "truncated.jpg", "good2.png"]
    names += ["folder.jpg", "good3.jpg", "good4.jpg"]
    return [root / name for name in names]


def _reference(model: ClipModel, path: Path) -> torch.Tensor:
    return F.normalize(model.encode_images(model.preprocess([open_image(path)])).float(), dim=-1)[0]


def _flatten(batches) -> list[engines.Record]:
    return [record for batch in batches for record in batch]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_gives_every_file_once_in_order(model, files, workers) -> None:
    batches = list(
        engines.iter_embeddings(
            model, files, backend="dataloader", batch_size=3, num_workers=workers, progress=False
        )
    )
    records = _flatten(batches)
    assert [r.index for r in records] == list(range(len(files)))
    assert [r.path for r in records] == files
    assert all(batch for batch in batches)
    for record in records:
        name = record.path.name
        if name in BAD:
            assert record.status == "error" and record.embedding is None
            assert BAD[name] in record.error.lower(), (name, record.error)
        else:
            assert record.status == "ok" and record.error == ""
            emb = record.embedding
            assert emb.dtype == torch.float32 and emb.device.type == "cpu" and emb.ndim == 1
            assert torch.allclose(emb.norm(), torch.tensor(1.0), atol=1e-5)
            assert torch.allclose(emb, _reference(model, record.path), atol=1e-5)


def test_a_batch_of_only_bad_files_still_yields_its_records(model, files) -> None:
    bad = [p for p in files if p.name in BAD]
    records = _flatten(engines.iter_embeddings(model, bad, "dataloader", 2, 0, progress=False))
    assert [r.status for r in records] == ["error"] * len(bad)
    assert list(engines.iter_embeddings(model, [], "dataloader", progress=False)) == []


def test_collate_keeps_errors_beside_the_stack() -> None:
    pixels = torch.zeros(3, 4, 4)
    indices, batch, errors = engines.collate([(0, pixels, ""), (1, None, "空"), (2, pixels + 1, "")])
    assert indices == [0, 2] and batch.shape == (2, 3, 4, 4) and errors == {1: "空"}
    assert engines.collate([(5, None, "x")])[1].numel() == 0


def test_worker_preprocess_matches_the_model(model) -> None:
    assert engines.worker_preprocess(model) == engines.SizedDecode(model.preprocess_spec)  # the fast default
    assert engines.worker_preprocess(model, exact_decode=True) == model.preprocess  # the HF processor itself
    small = {
        "vision_config": {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        "text_config": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 32,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 127},
        "projection_dim": 16,
    }  # fmt: skip
    tiny_random = random_vit.load_random_vit_b16(torch.device("cpu"), torch.float32, config_overrides=small)
    spec = engines.worker_preprocess(tiny_random, exact_decode=True)
    assert spec is tiny_random.preprocess_spec  # its own preprocessing is preprocess_with_spec
    image = shapes.draw_shape("青い三角", 3, size=90).resize((90, 50))
    assert torch.equal(preprocess_with_spec(image, spec), tiny_random.preprocess([image]))


# ---------------------------------------------------------------- input order


def test_input_order_releases_in_order_and_refuses_or_counts_repeats() -> None:
    order = engines.InputOrder(4)
    order.add(2, "c")
    assert order.ready() == [] and order.pending == {2: "c"}  # holds only what came early
    order.add(0, "a")
    assert order.ready() == ["a"]
    order.add(1, "b")
    assert order.ready() == ["b", "c"]
    with pytest.raises(RuntimeError, match="index 1 twice"):
        order.add(1, "again")
    with pytest.raises(RuntimeError, match=r"outside 0\.\.3"):
        order.add(4, "e")
    with pytest.raises(RuntimeError, match="never returned 1 file"):
        order.finish()
    ray_like = engines.InputOrder(2, on_duplicate="count")  # a task Ray ran again after a crash
    for index in (1, 1, 0, 0):
        ray_like.add(index, index)
    assert ray_like.ready() == [0, 1] and ray_like.duplicates == 2
    ray_like.finish()


# ---------------------------------------------------------------- the DALI backend, faked


def _fake_dali(monkeypatch: pytest.MonkeyPatch, iter_preprocessed=None) -> list[dict]:
    """Put a fake ``helpers.dali`` in place; returns the list its calls are recorded in."""
    calls: list[dict] = []
    module = types.ModuleType("helpers.dali")
    if iter_preprocessed is not None:

        def recording(paths, spec, batch_size, device, num_threads, fallbacks=None, knobs=None):
            calls.append(
                {
                    "n": len(paths),
                    "batch_size": batch_size,
                    "device": device,
                    "threads": num_threads,
                    "knobs": knobs,
                }
            )
            yield from iter_preprocessed(paths, spec, batch_size)

        module.iter_preprocessed = recording
    monkeypatch.setitem(sys.modules, "helpers.dali", module)
    monkeypatch.setattr(helpers, "dali", module, raising=False)
    return calls


def _pil_batches(paths, spec, batch_size, order=lambda chunks: chunks):
    """What DALI promises: (indices, pixels, errors), every index once (here through PIL)."""
    chunks = []
    for start in range(0, len(paths), batch_size):
        indices, tensors, errors = [], [], {}
        for i in range(start, min(start + batch_size, len(paths))):
            try:
                tensors.append(preprocess_with_spec(open_image(paths[i]), spec)[0])
                indices.append(i)
            except Exception as err:
                errors[i] = getattr(err, "reason", str(err))
        chunks.append((indices, torch.stack(tensors) if tensors else torch.empty(0), errors))
    yield from order(chunks)


def test_dali_backend_uses_iter_preprocessed(model, files, monkeypatch) -> None:
    calls = _fake_dali(monkeypatch, lambda p, s, b: _pil_batches(p, s, b, order=lambda c: c[::-1]))
    records = _flatten(engines.iter_embeddings(model, files, "dali", 4, 3, progress=False))
    assert calls == [{"n": len(files), "batch_size": 4, "device": "cpu", "threads": 3, "knobs": None}]
    assert [r.index for r in records] == list(range(len(files)))  # reordered although yielded backwards
    for record in records:
        if record.path.name in BAD:
            assert record.status == "error" and BAD[record.path.name] in record.error.lower()
        else:
            assert torch.allclose(record.embedding, _reference(model, record.path), atol=1e-5)


def test_dali_backend_checks_the_contract(model, files, monkeypatch) -> None:
    def dropping(paths, spec, batch_size):
        for indices, pixels, errors in _pil_batches(paths, spec, batch_size):
            yield indices[1:], pixels[1:], errors

    _fake_dali(monkeypatch, dropping)
    with pytest.raises(RuntimeError, match="never returned"):
        _flatten(engines.iter_embeddings(model, files, "dali", 4, progress=False))

    def twice(paths, spec, batch_size):
        batches = list(_pil_batches(paths, spec, batch_size))
        yield from batches + batches[:1]

    _fake_dali(monkeypatch, twice)
    with pytest.raises(RuntimeError, match="twice"):
        _flatten(engines.iter_embeddings(model, files, "dali", 4, progress=False))


def test_dali_backend_without_iter_preprocessed_says_so(model, files, monkeypatch) -> None:
    _fake_dali(monkeypatch)
    with pytest.raises(RuntimeError, match="iter_preprocessed"):
        next(engines.iter_embeddings(model, files, "dali", progress=False))


def test_resolve_backend(monkeypatch) -> None:
    assert engines.resolve_backend("dataloader") == "dataloader"
    assert engines.resolve_backend("dali") == "dali"
    with pytest.raises(ValueError, match="backend"):
        engines.resolve_backend("ray")
    monkeypatch.setattr(env, "dali_gpu_ok", lambda: False)
    assert engines.resolve_backend("auto") == "dataloader"
    assert "auto" in engines.backend_notice("auto")
    monkeypatch.setattr(env, "dali_gpu_ok", lambda: True)
    _fake_dali(monkeypatch)  # a helpers.dali without iter_preprocessed
    assert engines.resolve_backend("auto") == "dataloader"
    _fake_dali(monkeypatch, _pil_batches)
    assert engines.resolve_backend() == "dali"
    assert engines.backend_notice() == "バックエンド: dali (auto: DALI の GPU パイプラインが使えるため)"


def test_default_workers_follow_quick_mode(monkeypatch) -> None:
    monkeypatch.setattr(engines, "usable_cpus", lambda: 16)
    monkeypatch.setenv("TUTORIAL_QUICK", "1")
    assert engines.default_num_workers() == 2
    monkeypatch.setenv("TUTORIAL_QUICK", "0")
    assert engines.default_num_workers() == 8
    assert engines.autocast_dtype("cuda") == torch.float16 and engines.autocast_dtype("cpu") is None


# ---------------------------------------------------------------- zero-shot helpers


def test_classify_and_probabilities(model, files) -> None:
    labels = ["赤い丸", "青い三角", "緑の四角", "黄色い星"]
    text = model.label_features(labels, templates=("{}", "{}の絵"))
    assert text.shape[0] == 4 and torch.allclose(text.norm(dim=-1), torch.ones(4), atol=1e-5)
    records = _flatten(engines.iter_embeddings(model, files, "dataloader", 4, 0, progress=False))
    predictions = engines.classify(records, text, model.scoring, labels, top_k=2)
    assert [p.index for p in predictions] == list(range(len(files)))
    answers = {p.path.name: p for p in predictions}
    assert answers["good0.jpg"].top[0][0] == "赤い丸" and answers["good3.jpg"].top[0][0] == "黄色い星"
    assert answers["empty.jpg"].status == "error" and "empty" in answers["empty.jpg"].error
    first = answers["good0.jpg"]
    assert len(first.top) == 2 and first.top[0][1] >= first.top[1][1] and -1 <= first.best_cosine <= 1
    embeddings = torch.stack([r.embedding for r in records if r.status == "ok"])
    probs = model.probabilities(embeddings * 3, text * 2)  # scale-free
    assert torch.allclose(probs.sum(-1), torch.ones(len(embeddings)))
    assert abs(float(probs[0].max()) - first.top[0][1]) < 1e-5
    with pytest.raises(ValueError):
        engines.classify(records, text[:2], model.scoring, labels)


def test_image_file_dataset_reports_preprocessing_failures(tmp_path: Path) -> None:
    path = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(path)

    def broken(images):
        raise ValueError("boom")

    index, pixels, error = engines.ImageFileDataset([path], broken)[0]
    assert index == 0 and pixels is None and "boom" in error


def test_sized_decode_reads_big_jpegs_reduced_and_sends_uint8(model, tmp_path: Path) -> None:
    """A 1260×750 JPEG for a 64-px model: libjpeg decodes 1/4 (315×188, still ≥ 1.5 × 64 on the shorter
    side), the worker sends uint8 at the model's size, and the answer stays close to the exact path's."""
    path = tmp_path / "big.jpg"
    shapes.draw_shape("緑の四角", 4, size=750).resize((1260, 750)).save(path, quality=90)
    spec = model.preprocess_spec
    assert open_image(path, at_least=spec.decode_floor()).size == (315, 188)
    pixels = engines.SizedDecode(spec)(path)
    assert pixels.dtype == torch.uint8 and tuple(pixels.shape) == (3, spec.size, spec.size)
    fast = engines.encode_batch(model, pixels[None])[0]
    exact = _reference(model, path)
    assert float(fast @ exact) > 0.99  # cosine of the two embeddings
    from helpers.models import normalize

    assert torch.allclose(
        normalize(pixels[None], spec),
        preprocess_with_spec(open_image(path, at_least=spec.decode_floor()), spec),
    )
