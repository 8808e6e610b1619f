"""sha256 of a file, read in blocks (bins, tokenizer files and checkpoints can be large)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 8 << 20


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
