"""helpers.dali.training_pipeline on the CPU: every epoch reads every file exactly once.

Without ``pad_last_batch=True`` on the reader, a shuffled reader (``random_shuffle`` or
``shuffle_after_epoch``) fills the last short batch with files of the next epoch, and
``LastBatchPolicy.PARTIAL`` drops them: epochs 2, 3, ... then miss some files and read others
twice (one run of notebook 04's section 2.1, 1,000 files at batch 32, counted 24, 46 and 65 missed
in epochs 2-4; the notebook prints its own run's counts). Small files keep this fast.
tests/gpu/test_gpu.py checks the same for the ``mixed`` decoder on a GPU.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from helpers import env

if env.dali_version() is None:  # requirements.txt installs it: its absence is a broken set-up, not a skip
    pytest.fail("NVIDIA DALI does not import (re-create .venv: make venv)", pytrace=False)

from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from helpers import dali

N_FILES, BATCH, EPOCHS = 45, 8, 3  # 45 = 5 full batches + 5: the last batch is short


def _tiny_jpegs(folder: Path, n: int, classes: int = 3) -> list[Path]:
    """``n`` 24×20 JPEGs in ``classes`` sub-folders (``c0``, ``c1``, …), file i in folder i % classes."""
    paths = []
    for i in range(n):
        sub = folder / f"c{i % classes}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{i:03d}.jpg"
        Image.new("RGB", (24, 20), (i * 5 % 256, 80, 160)).save(path)
        paths.append(path)
    return paths


def _epochs(pipe, epochs: int = EPOCHS) -> list[list[int]]:
    """The labels of each epoch, in reading order, through the iterator the notebook uses."""
    loader = DALIGenericIterator(
        pipe,
        dali.TRAIN_OUTPUTS,
        reader_name=dali.READER_NAME,
        last_batch_policy=LastBatchPolicy.PARTIAL,
        auto_reset=True,
    )
    seen = []
    for _ in range(epochs):
        labels = []
        for batch in loader:
            images = batch[0]["images"]
            assert images.shape[1:] == (3, 8, 8) and len(images) == len(batch[0]["labels"])
            labels += [int(x) for x in batch[0]["labels"].view(-1)]
        seen.append(labels)
    return seen


def test_shuffled_training_epoch_reads_every_file_exactly_once(tmp_path: Path) -> None:
    files = _tiny_jpegs(tmp_path, N_FILES)
    pipe = dali.training_pipeline(files, BATCH, "cpu", size=8, labels=range(N_FILES))  # label = file number
    epochs = _epochs(pipe)
    for number, labels in enumerate(epochs, start=1):
        counts = Counter(labels)
        missed = sorted(set(range(N_FILES)) - set(counts))
        twice = sorted(k for k, c in counts.items() if c > 1)
        assert not missed and not twice, f"epoch {number}: missed {missed}, read twice {twice}"
        assert len(labels) == N_FILES
    assert epochs[0] != sorted(epochs[0]), "the training pipeline does not shuffle"
    assert epochs[1] != epochs[0] and epochs[2] != epochs[1], "every epoch should have its own order"


def test_folder_epochs_keep_class_counts_and_validation_keeps_order(tmp_path: Path) -> None:
    _tiny_jpegs(tmp_path, N_FILES)  # file_root mode: labels are the sorted sub-folders c0, c1, c2
    for number, labels in enumerate(_epochs(dali.training_pipeline(tmp_path, BATCH, size=8)), start=1):
        assert Counter(labels) == {0: 15, 1: 15, 2: 15}, f"epoch {number}: {Counter(labels)}"
    files = _tiny_jpegs(tmp_path / "flat", N_FILES)
    val = dali.training_pipeline(files, BATCH, size=8, augment=False, labels=range(N_FILES))
    assert _epochs(val) == [list(range(N_FILES))] * EPOCHS


def test_training_pipeline_rejects_an_unknown_decoder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mixed"):
        dali.training_pipeline(tmp_path, BATCH, "gpu")  # type: ignore[arg-type]


@pytest.mark.skipif(env.cuda_available(), reason="a GPU is here: the mixed decoder is allowed")
def test_mixed_training_pipeline_without_a_gpu_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(dali.DaliUnavailableError, match="GPU"):
        dali.training_pipeline(tmp_path, BATCH, "mixed")


def test_notebook_04_training_pipeline_reads_every_file_once_per_epoch(tmp_path: Path) -> None:
    """The pipeline notebook 04 teaches (its own cell), shuffled, on the CPU: every epoch every file once."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def
    from test_dali_definition import notebook_definitions

    from helpers.models import CLIP_MEAN, CLIP_STD

    _tiny_jpegs(tmp_path, N_FILES, classes=N_FILES)  # one folder per file: the label names the file
    names = {
        "fn": fn,
        "types": types,
        "pipeline_def": pipeline_def,
        "CLIP_MEAN": CLIP_MEAN,
        "CLIP_STD": CLIP_STD,
    }
    scope = notebook_definitions("04_dali_training.ipynb", {"training_pipeline"}, SIZE=8, **names)
    pipe = scope["training_pipeline"](
        str(tmp_path), "cpu", batch_size=BATCH, num_threads=1, device_id=None, seed=0
    )
    epochs = _epochs(pipe)
    for number, labels in enumerate(epochs, start=1):
        assert sorted(labels) == list(range(N_FILES)), f"epoch {number}: not every file exactly once"
    assert len({tuple(labels) for labels in epochs}) == EPOCHS, "every epoch should have its own order"
