"""TokenDataset: batches, generator-only sampling, and refusal of bins that disagree with meta.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moegpt.data import TokenDataset
from moegpt.errors import MoegptError


def fake_prepared(folder: Path, train: np.ndarray, val: np.ndarray, vocab_size: int = 1000,
                  dtype: str = "uint16") -> Path:
    """A prepared folder written by hand, so each test controls the exact bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, ids in (("train", train), ("val", val)):
        ids.astype(dtype).tofile(folder / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": len(ids)}
    meta = {"tokenizer": {"kind": "char"}, "vocab_size": vocab_size, "dtype": dtype, "splits": splits}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def dataset(tmp_path) -> TokenDataset:
    return TokenDataset(fake_prepared(tmp_path / "d", np.arange(500) % 1000, np.arange(100, 150)))


def test_batches_are_shifted_int64_windows(dataset):
    g = torch.Generator().manual_seed(0)
    x, y = dataset.get_batch("train", 8, 16, g)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y - x, torch.ones_like(x))  # the train stream is 0, 1, 2, …
    assert dataset.num_tokens("train") == 500 and dataset.num_tokens("val") == 50
    assert dataset.vocab_size == 1000 and dataset.meta["dtype"] == "uint16"


def test_restoring_generator_state_resumes_batches_bit_identically(dataset):
    g = torch.Generator().manual_seed(123)
    dataset.get_batch("train", 4, 8, g)
    state = g.get_state()
    first = [dataset.get_batch(split, 4, 8, g) for split in ("train", "val", "train")]
    g.set_state(state)
    again = [dataset.get_batch(split, 4, 8, g) for split in ("train", "val", "train")]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_block_larger_than_split_names_split_and_count(dataset):
    g = torch.Generator()
    dataset.get_batch("val", 2, 49, g)  # 49 + 1 = 50 tokens: exactly fits
    with pytest.raises(MoegptError, match=r"the val split .* has 50 tokens.*block_size \+ 1 = 51"):
        dataset.get_batch("val", 2, 50, g)


def test_uint32_bins_round_trip(tmp_path):
    ids = np.array([0, 70_000, 5, 69_999] * 10)
    data = TokenDataset(fake_prepared(tmp_path, ids, ids, vocab_size=70_001, dtype="uint32"))
    x, _ = data.get_batch("train", 3, 4, torch.Generator().manual_seed(1))
    assert int(x.max()) <= 70_000 and set(x.flatten().tolist()) <= {0, 5, 69_999, 70_000}


def test_missing_folder_says_run_prepare(tmp_path):
    with pytest.raises(MoegptError, match="run `moegpt prepare` first"):
        TokenDataset(tmp_path / "absent")


def test_bin_size_disagreeing_with_meta_is_refused(tmp_path):
    folder = fake_prepared(tmp_path, np.arange(100), np.arange(100))
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(MoegptError, match="val.bin holds 202 bytes but meta.json says 100 uint16 tokens"):
        TokenDataset(folder)


def test_bin_dtype_disagreeing_with_meta_is_refused(tmp_path):
    folder = fake_prepared(tmp_path, np.arange(100), np.arange(100))
    meta = json.loads((folder / "meta.json").read_text())
    np.arange(100).astype("uint32").tofile(folder / "train.bin")  # written wide, described narrow
    with pytest.raises(MoegptError, match="train.bin holds 400 bytes"):
        TokenDataset(folder)
    meta["dtype"] = "int8"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(MoegptError, match="dtype 'int8'"):
        TokenDataset(folder)


def test_ids_beyond_vocabulary_are_refused(tmp_path):
    folder = fake_prepared(tmp_path, np.arange(100), np.arange(100), vocab_size=50)
    with pytest.raises(MoegptError, match="token id 99 but the vocabulary has 50"):
        TokenDataset(folder)


def test_bins_widen_to_uint32_only_past_16_bit_ids():
    from moegpt.prepare import dtype_for_vocab

    assert dtype_for_vocab(2048) == dtype_for_vocab(65_536) == "uint16"  # ids 0 … 65535 fit
    assert dtype_for_vocab(65_537) == "uint32"
