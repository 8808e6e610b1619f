"""Tokenizers: `char` (the train split's characters), `bpe` (byte-level, trained by rustbpe, run by
tiktoken, the nanochat recipe) and `gpt2` (tiktoken's own). `load_tokenizer(data_dir)` is the one way in.

A prepared folder's meta.json carries a `tokenizer` section (kind, file, sha256, vocab size, pattern,
special tokens); the tokenizer file beside it holds the vocabulary itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from moegpt.digest import file_sha256
from moegpt.errors import MoegptError

KINDS = ("bpe", "char", "gpt2")
EOT = "<|endoftext|>"  # document separator, appended after every document in the bins
UNK = "<|unk|>"  # char tokenizer: stands for characters the train split never showed
REPLACEMENT_BYTES = "\ufffd".encode()
# nanochat's split pattern: GPT-4's, with digits grouped by at most 2 (not 3), which suits small vocabularies.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
BPE_SPECIALS = (EOT,)
MIN_BPE_VOCAB = 256 + len(BPE_SPECIALS)  # every byte, then the specials
MAX_VOCAB = 1 << 24  # far above anything this trainer can use; keeps a typo from running for hours
BPE_FILE = "tokenizer.tiktoken"
CHAR_FILE = "tokenizer.json"
# tiktoken's gpt2 files; their sha1 is the name tiktoken caches them under (tiktoken.load.read_file_cached).
GPT2_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
             "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json")
GPT2_HOST = "openaipublic.blob.core.windows.net"


class Tokenizer:
    """What every tokenizer offers: encode/decode, bytes for streaming, the vocabulary size, the EOT id."""

    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in the text are plain text, never specials."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The UTF-8 bytes of `ids`; a sampler joins them across steps so multi-byte characters survive."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def info(self) -> dict[str, Any]:
        """The meta.json `tokenizer` section (the file name and hash are added when it is saved)."""
        raise NotImplementedError


class TiktokenTokenizer(Tokenizer):
    """bpe and gpt2: a `tiktoken.Encoding`; ids past its vocabulary decode to U+FFFD rather than raising."""

    def __init__(self, kind: str, encoding: Any) -> None:
        self.kind = kind
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        batches = self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
        return [np.asarray(ids, dtype=np.int64) for ids in batches]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        if all(0 <= i < self.vocab_size for i in ids):
            return self.encoding.decode_bytes(ids)
        return b"".join(self.encoding.decode_bytes([i]) if 0 <= i < self.vocab_size else REPLACEMENT_BYTES
                        for i in ids)

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "pattern": self.encoding._pat_str,
                "special_tokens": dict(self.encoding._special_tokens), "eot_id": self.eot_id,
                "encoding": self.encoding.name}


class CharTokenizer(Tokenizer):
    """One id per character seen in the train split (sorted by code point), then EOT and UNK.

    Unknown-character policy: a character outside the vocabulary encodes to UNK, and UNK decodes to
    U+FFFD, so validation text and prompts with unseen characters still encode.
    """

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.chars = chars
        self.eot_id = len(chars)
        self.unk_id = len(chars) + 1
        self.vocab_size = len(chars) + 2
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)
        self._pieces = [c.encode("utf-8", errors="surrogatepass") for c in chars] + [EOT.encode(),
                                                                                       REPLACEMENT_BYTES]

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    def encode_array(self, text: str) -> np.ndarray:
        # Vectorised lookup: a Python loop over the characters of a large corpus is far slower.
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")
        if not len(self._codepoints):
            return np.full(len(points), self.unk_id, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._codepoints, points), len(self._codepoints) - 1)
        return np.where(self._codepoints[pos] == points, pos, self.unk_id).astype(np.int64)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        pieces, n = self._pieces, len(self._pieces)
        return b"".join(pieces[i] if 0 <= i < n else REPLACEMENT_BYTES for i in map(int, ids))

    def info(self) -> dict[str, Any]:
        return {"kind": "char", "vocab_size": self.vocab_size, "pattern": None,
                "special_tokens": {EOT: self.eot_id, UNK: self.unk_id}, "eot_id": self.eot_id,
                "unknown_char_policy": f"encode to {UNK}, decode to U+FFFD"}


# ---- building ---------------------------------------------------------------------------------------

def check_vocab_size(kind: str, vocab_size: int) -> None:
    if kind == "bpe" and not MIN_BPE_VOCAB <= vocab_size <= MAX_VOCAB:
        raise MoegptError(f"--vocab-size for bpe must be in [{MIN_BPE_VOCAB}, {MAX_VOCAB}] "
                          f"(256 byte tokens + {len(BPE_SPECIALS)} special); got {vocab_size}")


def train_bpe(texts: Iterator[str], vocab_size: int) -> TiktokenTokenizer:
    """Byte-level BPE trained by rustbpe, wrapped in a tiktoken Encoding (nanochat's recipe).

    A small corpus may run out of pairs to merge before `vocab_size`; the result is then smaller.
    """
    import rustbpe

    check_vocab_size("bpe", vocab_size)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, vocab_size - len(BPE_SPECIALS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
    return bpe_from_ranks(ranks, trainer.get_pattern())


def bpe_from_ranks(ranks: dict[bytes, int], pattern: str) -> TiktokenTokenizer:
    import tiktoken

    specials = {name: len(ranks) + i for i, name in enumerate(BPE_SPECIALS)}
    encoding = tiktoken.Encoding(name=f"moegpt-bpe-{len(ranks) + len(specials)}", pat_str=pattern,
                                 mergeable_ranks=ranks, special_tokens=specials)
    return TiktokenTokenizer("bpe", encoding)


def tiktoken_cache_dir() -> str:
    """Where tiktoken looks for downloaded vocabularies (mirrors tiktoken.load.read_file_cached)."""
    import tempfile

    return os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache")


def gpt2_files_cached() -> bool:
    cache = tiktoken_cache_dir()
    names = (hashlib.sha1(url.encode()).hexdigest() for url in GPT2_URLS)
    return all(os.path.exists(os.path.join(cache, name)) for name in names)


def load_gpt2() -> TiktokenTokenizer:
    """tiktoken's gpt2 encoding; offline without its cached files this fails fast with a way out."""
    import tiktoken

    from moegpt.corpus import host_reachable

    hint = (f"the gpt2 tokenizer needs tiktoken's gpt2 files in its cache (TIKTOKEN_CACHE_DIR, now "
            f"{tiktoken_cache_dir()})")
    if not gpt2_files_cached() and not host_reachable(GPT2_HOST):
        raise MoegptError(f"{hint}, and {GPT2_HOST} cannot be reached to download them; set "
                          "TIKTOKEN_CACHE_DIR to a folder holding them "
                          "or use --tokenizer bpe (trained offline)")
    try:
        return TiktokenTokenizer("gpt2", tiktoken.get_encoding("gpt2"))
    except Exception as err:  # requests, OSError, hash mismatch: all mean "no usable gpt2 files"
        raise MoegptError(f"{hint}; loading them failed ({type(err).__name__}: {err}); "
                          "use --tokenizer bpe (trained offline)") from None


# ---- saving and loading ------------------------------------------------------------------------------

def save_tokenizer(tok: Tokenizer, folder: Path) -> dict[str, Any]:
    """Write the tokenizer's file into `folder`; return the meta.json section that describes it."""
    info = tok.info()
    if isinstance(tok, CharTokenizer):
        path = folder / CHAR_FILE
        path.write_text(json.dumps({"kind": "char", "chars": tok.chars}, ensure_ascii=True) + "\n")
    elif tok.kind == "bpe":
        # The .tiktoken format tiktoken itself ships: one "base64(token) rank" line per mergeable token.
        path = folder / BPE_FILE
        ranks = sorted(tok.encoding._mergeable_ranks.items(), key=lambda item: item[1])
        path.write_text("".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks))
    else:
        return {**info, "file": None, "sha256": None}  # gpt2: the vocabulary lives in tiktoken's cache
    return {**info, "file": path.name, "sha256": file_sha256(path)}


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    meta_path = Path(data_dir) / "meta.json"
    if not meta_path.is_file():
        raise MoegptError(f"no prepared data at {data_dir} (missing meta.json); run `moegpt prepare` first")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoegptError(f"corrupt {meta_path}: {err}; run `moegpt prepare --force` to rebuild it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tokenizer"), dict):
        raise MoegptError(f"corrupt {meta_path}: no tokenizer section; run `moegpt prepare --force`")
    return meta


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared folder (checked against the hash meta.json recorded)."""
    data_dir = Path(data_dir)
    info = read_meta(data_dir)["tokenizer"]
    kind = info.get("kind")
    if kind == "gpt2":
        return load_gpt2()
    if kind not in ("bpe", "char"):
        raise MoegptError(f"unknown tokenizer kind {kind!r} in {data_dir / 'meta.json'}; "
                          f"valid: {', '.join(KINDS)}")
    path = data_dir / str(info.get("file"))
    if not path.is_file():
        raise MoegptError(f"tokenizer file {path} is missing; run `moegpt prepare --force` to rebuild it")
    if info.get("sha256") and file_sha256(path) != info["sha256"]:
        raise MoegptError(f"tokenizer file {path} does not match meta.json (sha256 differs); "
                          "run `moegpt prepare --force` to rebuild it")
    try:
        if kind == "char":
            tok: Tokenizer = CharTokenizer(json.loads(path.read_text())["chars"])
        else:
            ranks = {}
            for line in path.read_text().splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            tok = bpe_from_ranks(ranks, info["pattern"])
    except (ValueError, KeyError, TypeError) as err:
        raise MoegptError(f"corrupt tokenizer file {path}: {err}") from None
    if tok.vocab_size != info.get("vocab_size"):
        raise MoegptError(f"tokenizer file {path} has {tok.vocab_size} tokens but meta.json says "
                          f"{info.get('vocab_size')}; run `moegpt prepare --force`")
    return tok
