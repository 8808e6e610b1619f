"""Token bins on disk and random batches from them.

`TokenDataset(data_dir)` memory-maps `train.bin`/`val.bin` of a folder written by `moegpt prepare`
and refuses bins whose size or dtype disagree with meta.json. Batches are drawn with the caller's
torch.Generator only, so saving and restoring `generator.get_state()` resumes batches bit-identically.

`prepare_dataset`, `ensure_prepared` and `PrepareResult` live in moegpt.prepare; they are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from moegpt.errors import MoegptError
from moegpt.prepare import PrepareResult, ensure_prepared, prepare_dataset
from moegpt.tokenizer import read_meta

__all__ = ["TokenDataset", "PrepareResult", "ensure_prepared", "prepare_dataset"]

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
SPLITS = ("train", "val")
# Bins up to this many tokens are scanned once for ids outside the vocabulary (cheap: one vectorised pass);
# larger ones are trusted to the size/dtype checks so opening them stays instant.
SCAN_LIMIT_TOKENS = 1 << 26


class TokenDataset:
    """The train and val token streams of a prepared folder, memory-mapped read-only."""

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir)
        self.meta: dict[str, Any] = read_meta(self.data_dir)
        meta_path = self.data_dir / "meta.json"
        dtype_name = self.meta.get("dtype")
        if dtype_name not in DTYPES:
            raise MoegptError(f"{meta_path}: dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
        self.dtype = np.dtype(DTYPES[dtype_name])
        self.vocab_size = int(self.meta.get("vocab_size", 0))
        if not 0 < self.vocab_size <= np.iinfo(self.dtype).max + 1:
            raise MoegptError(f"{meta_path}: vocab_size {self.vocab_size} does not fit dtype {dtype_name}")
        self._data = {split: self._open(split) for split in SPLITS}

    def _open(self, split: str) -> np.ndarray:
        info = self.meta.get("splits", {}).get(split)
        if not isinstance(info, dict) or "tokens" not in info:
            raise MoegptError(f"{self.data_dir / 'meta.json'} describes no {split} split; "
                              "run `moegpt prepare --force`")
        path = self.data_dir / info.get("file", f"{split}.bin")
        if not path.is_file():
            raise MoegptError(f"{path} is missing; run `moegpt prepare --force` to rebuild {self.data_dir}")
        size, expected = path.stat().st_size, int(info["tokens"])
        if size != expected * self.dtype.itemsize:
            raise MoegptError(f"{path} holds {size} bytes but meta.json says {expected} {self.dtype.name} "
                              f"tokens ({expected * self.dtype.itemsize} bytes); "
                              "the bin and meta.json disagree")
        if expected == 0:
            return np.zeros(0, dtype=self.dtype)
        data = np.memmap(path, dtype=self.dtype, mode="r")
        if expected <= SCAN_LIMIT_TOKENS and int(data.max()) >= self.vocab_size:
            raise MoegptError(f"{path} holds token id {int(data.max())} but the vocabulary has "
                              f"{self.vocab_size} tokens; the bin and meta.json disagree")
        return data

    def num_tokens(self, split: str) -> int:
        return len(self._split(split))

    @property
    def fingerprint(self) -> str:
        """sha256 of the source text this folder was prepared from (changes when the data does)."""
        return str(self.meta.get("source", {}).get("sha256", ""))

    def tokens(self, split: str) -> np.ndarray:
        """The whole split as a read-only memmap, in order (for sequential evaluation and reports)."""
        return self._split(split)

    def _split(self, split: str) -> np.ndarray:
        if split not in self._data:
            raise MoegptError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return self._data[split]

    def get_batch(self, split: str, batch_size: int, block_size: int, generator: torch.Generator,
                  device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 [batch_size, block_size], y = x shifted by one; offsets drawn from `generator` only."""
        data = self._split(split)
        n = len(data)
        if block_size + 1 > n:
            raise MoegptError(f"the {split} split of {self.data_dir} has {n} tokens, fewer than "
                              f"block_size + 1 = {block_size + 1}; "
                              "use a smaller block size or prepare more text")
        starts = torch.randint(n - block_size, (batch_size,), generator=generator)
        # One fancy-indexing read of [batch, block+1] from the memmap, then two views.
        rows = data[starts.numpy()[:, None] + np.arange(block_size + 1)]
        chunk = torch.from_numpy(rows.astype(np.int64))
        x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
        device = torch.device(device)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

