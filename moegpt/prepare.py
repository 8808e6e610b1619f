"""`prepare_dataset`: source → documents → train/val split → tokenizer → token bins + meta.json.

Everything is written into a hidden temporary folder beside the target and renamed into place at the
end, so a failure (or Ctrl-C) leaves nothing behind and an existing folder is replaced only with
`force`. The same inputs give byte-identical bins and tokenizer files; meta.json differs only in
its `created` field.
"""

from __future__ import annotations

import datetime
import json
import os
import random
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import moegpt
from moegpt.corpus import ProgressFn, check_read_options, load_corpus
from moegpt.digest import file_sha256
from moegpt.errors import MoegptError
from moegpt.tokenizer import (
    KINDS,
    MAX_VOCAB,
    CharTokenizer,
    Tokenizer,
    check_vocab_size,
    load_gpt2,
    save_tokenizer,
    train_bpe,
)

DEFAULT_NAME = "stdlib"
DEFAULT_VOCAB_SIZE = 2048
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_SEED = 1337
# A split must hold one block of a reasonable context (64 tokens) plus its shifted target.
MIN_SPLIT_TOKENS = 65
SPLITS = ("train", "val")
ENCODE_BATCH_BYTES = 1 << 20  # documents per encode call: enough for threads, small for a lively bar
STAGES = {"read": "reading", "tokenizer": "training tokenizer", "encode": "tokenising", "write": "writing"}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class PrepareResult:
    path: Path
    meta: dict[str, Any]
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 while every id (0 … vocab_size-1) fits in 16 bits, else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def default_name(source: str, tokenizer: str) -> str:
    """stdlib, a hub dataset's name (+config), or a file's stem / folder's name; then -char/-gpt2 if so."""
    if source == "stdlib":
        base = DEFAULT_NAME
    elif source.startswith("hf:"):
        base = source[3:].split("/")[-1].replace(":", "-")
    else:
        path = Path(source.split("*")[0] or ".").expanduser()
        base = (path.stem if path.suffix else path.name) or path.resolve().name
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip(".-_") or "data"
    return base if tokenizer == "bpe" else f"{base}-{tokenizer}"


def check_options(name: str, tokenizer: str, vocab_size: int, val_fraction: float, seed: int) -> None:
    if tokenizer not in KINDS:
        raise MoegptError(f"unknown tokenizer {tokenizer!r}; valid: {', '.join(KINDS)}")
    check_vocab_size(tokenizer, vocab_size)
    if not 0.0 < val_fraction < 1.0:
        raise MoegptError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    if not NAME_PATTERN.fullmatch(name):
        raise MoegptError(f"--name must be letters, digits, '.', '_' or '-' and not start with '.' "
                          f"(got {name!r})")
    if not 0 <= seed < 2**63:
        raise MoegptError(f"--seed must be in [0, 2**63) (got {seed})")


def prepare_dataset(source: str = "stdlib", name: str | None = None, data_root: str | Path = "data",
                    tokenizer: str = "bpe", vocab_size: int = DEFAULT_VOCAB_SIZE,
                    val_fraction: float = DEFAULT_VAL_FRACTION, max_bytes: int | None = None,
                    text_field: str | None = None, split: str = "train", seed: int = DEFAULT_SEED,
                    force: bool = False, encoding_errors: str = "strict", progress: ProgressFn | None = None,
                    min_split_tokens: int = MIN_SPLIT_TOKENS) -> PrepareResult:
    """Prepare `data_root/name/`: train.bin, val.bin, the tokenizer file and meta.json.

    max_bytes=None means the source's default (16 MB for stdlib, everything otherwise). `progress`
    is called as progress(stage, done, total) with stage in STAGES and byte counts (total may be None).
    """
    started = time.perf_counter()
    name = name or default_name(source, tokenizer)
    check_options(name, tokenizer, vocab_size, val_fraction, seed)
    check_read_options(max_bytes, encoding_errors)  # all flags checked before any work starts
    root = Path(data_root)
    target = root / name
    if target.exists() and not force:
        raise MoegptError(f"{target} already exists; pass --force to replace it (or choose another --name)")
    if target.exists() and not target.is_dir():
        raise MoegptError(f"{target} exists and is not a folder; remove it first")
    # gpt2 fails fast when its files are unavailable, before any corpus is read.
    ready_tokenizer = load_gpt2() if tokenizer == "gpt2" else None
    created_root = [p for p in [root, *root.parents] if not p.exists()]
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    work.mkdir()
    try:
        meta, stage_seconds = build(work, source=source, tokenizer=tokenizer, ready_tokenizer=ready_tokenizer,
                                    vocab_size=vocab_size, val_fraction=val_fraction, max_bytes=max_bytes,
                                    text_field=text_field, split=split, seed=seed,
                                    encoding_errors=encoding_errors, progress=progress,
                                    min_split_tokens=min_split_tokens)
        install(work, target, force)
    except BaseException:  # Ctrl-C included: leave no half-written folder behind
        shutil.rmtree(work, ignore_errors=True)
        for folder in created_root:  # innermost first; only folders this call created, only if empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return PrepareResult(target, meta, time.perf_counter() - started, stage_seconds)


def ensure_prepared(data_root: str | Path = "data", name: str = DEFAULT_NAME,
                    progress: ProgressFn | None = None) -> Path:
    """The prepared folder data_root/name, preparing the built-in corpus first if it is the one missing."""
    target = Path(data_root) / name
    if (target / "meta.json").is_file():
        return target
    if target.exists():
        raise MoegptError(f"{target} exists but has no meta.json; run `moegpt prepare --name {name} --force`")
    if name != DEFAULT_NAME:
        raise MoegptError(f"no prepared data at {target}; "
                          f"run `moegpt prepare --source SRC --name {name}` first")
    return prepare_dataset(source="stdlib", name=name, data_root=data_root, progress=progress).path


def install(work: Path, target: Path, force: bool) -> None:
    if not target.exists():
        os.rename(work, target)
        return
    if not force:  # appeared while we worked
        raise MoegptError(f"{target} appeared while preparing; pass --force to replace it")
    old = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(target, old)
    try:
        os.rename(work, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def split_corpus(texts: list[str], val_fraction: float, seed: int) -> tuple[dict[str, list[str]], str]:
    """Whole documents go to train or val (a seeded shuffle picks val); one document is cut at a line end."""
    if len(texts) >= 2:
        n_val = min(len(texts) - 1, max(1, round(len(texts) * val_fraction)))
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        is_val = set(order[:n_val])
        # Each split keeps the source order, so neighbouring files stay neighbours in the bins.
        return {"train": [t for i, t in enumerate(texts) if i not in is_val],
                "val": [t for i, t in enumerate(texts) if i in is_val]}, "document"
    text = texts[0]
    at = int(len(text) * (1.0 - val_fraction))
    line_end = text.rfind("\n", 0, at)
    at = line_end + 1 if line_end > 0 else at
    return {"train": [text[:at]], "val": [text[at:]]}, "line (single document)"


def build(work: Path, *, source: str, tokenizer: str, ready_tokenizer: Tokenizer | None, vocab_size: int,
          val_fraction: float, max_bytes: int | None, text_field: str | None, split: str, seed: int,
          encoding_errors: str, progress: ProgressFn | None,
          min_split_tokens: int) -> tuple[dict[str, Any], dict[str, float]]:
    report = progress or (lambda stage, done, total: None)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    corpus = load_corpus(source, text_field=text_field, split=split, max_bytes=max_bytes,
                         encoding_errors=encoding_errors, scratch=work / ".scratch", progress=progress)
    shutil.rmtree(work / ".scratch", ignore_errors=True)
    seconds["read"], clock = time.perf_counter() - clock, time.perf_counter()
    splits, unit = split_corpus(corpus.texts, val_fraction, seed)

    report("tokenizer", 0, None)
    if tokenizer == "bpe":
        tok: Tokenizer = train_bpe(iter(splits["train"]), vocab_size)  # train split only: val stays unseen
    elif tokenizer == "char":
        tok = CharTokenizer.train(splits["train"])
    else:
        assert ready_tokenizer is not None
        tok = ready_tokenizer
    if tok.vocab_size > MAX_VOCAB:
        raise MoegptError(f"vocabulary of {tok.vocab_size} exceeds {MAX_VOCAB}")
    report("tokenizer", 1, 1)
    seconds["tokenizer"], clock = time.perf_counter() - clock, time.perf_counter()

    dtype = dtype_for_vocab(tok.vocab_size)
    split_bytes = {s: [len(t.encode("utf-8", errors="surrogatepass")) for t in splits[s]] for s in SPLITS}
    total = sum(sum(b) for b in split_bytes.values())
    counts: dict[str, dict[str, Any]] = {}
    done = 0
    for s in SPLITS:
        tokens, consumed = write_bin(work / f"{s}.bin", tok, splits[s], split_bytes[s], np.dtype(dtype),
                                     lambda d, base=done: report("encode", base + d, total))
        done += consumed
        n_docs, n_bytes = len(splits[s]), sum(split_bytes[s])
        counts[s] = {"file": f"{s}.bin", "documents": n_docs, "bytes": n_bytes, "tokens": tokens,
                     # separators excluded, so the ratio describes the tokenizer, not the document count
                     "bytes_per_token": round(n_bytes / max(1, tokens - n_docs), 4)}
    for s in SPLITS:
        if counts[s]["tokens"] < min_split_tokens:
            raise MoegptError(f"the {s} split holds only {counts[s]['tokens']} tokens, fewer than one block "
                              f"({min_split_tokens - 1} + 1); add text, raise --val-fraction or --max-bytes")
    seconds["encode"], clock = time.perf_counter() - clock, time.perf_counter()

    report("write", 0, 1)
    for s in SPLITS:
        counts[s]["sha256"] = file_sha256(work / f"{s}.bin")
    tok_info = save_tokenizer(tok, work)
    if tokenizer == "bpe":
        tok_info["requested_vocab_size"] = vocab_size
    meta = {
        "format": 1,
        "moegpt_version": moegpt.__version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": corpus.source,
        "split": {"unit": unit, "val_fraction": val_fraction, "seed": seed},
        "tokenizer": tok_info,
        "vocab_size": tok.vocab_size,
        "dtype": dtype,
        "splits": counts,
    }
    write_synced(work / "meta.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    report("write", 1, 1)
    seconds["write"] = time.perf_counter() - clock
    return meta, seconds


def write_bin(path: Path, tok: Tokenizer, texts: list[str], sizes: list[int], dtype: np.dtype,
              progress: Any) -> tuple[int, int]:
    """Encode documents in ~1 MB batches, each followed by EOT; return (tokens written, bytes consumed)."""
    tokens = consumed = 0
    eot = np.array([tok.eot_id], dtype=dtype)
    with open(path, "wb") as out:
        start = 0
        while start < len(texts):
            end, batch_bytes = start, 0
            while end < len(texts) and (end == start or batch_bytes + sizes[end] <= ENCODE_BATCH_BYTES):
                batch_bytes += sizes[end]
                end += 1
            for ids in tok.encode_batch(texts[start:end]):
                out.write(ids.astype(dtype).tobytes())
                out.write(eot.tobytes())
                tokens += len(ids) + 1
            consumed += batch_bytes
            progress(consumed)
            start = end
        out.flush()
        os.fsync(out.fileno())
    return tokens, consumed


def write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())


