"""prepare_dataset: local text, stdlib, structured files, the hub (faked), determinism, bins vs meta."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from moegpt import corpus
from moegpt.data import TokenDataset, ensure_prepared, prepare_dataset
from moegpt.errors import MoegptError
from moegpt.prepare import split_corpus
from moegpt.tokenizer import EOT, load_tokenizer

WORDS = ("the quick brown fox jumps over a lazy dog while experts route tokens through layers "
         "café naïve Grüße 東京 def return import class self None True").split()


def write_corpus(folder: Path, n_files: int = 12, lines: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)) + "\n"
        (folder / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub names are never contacted: offline flags set and the reachability probe stubbed."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(corpus, "host_reachable", lambda *a, **k: False)


def bin_tokens(folder: Path, split: str, meta: dict) -> np.ndarray:
    return np.fromfile(folder / f"{split}.bin", dtype=meta["dtype"])


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_local_folder_round_trip_and_bins_match_meta(tmp_path, kind):
    src = write_corpus(tmp_path / "src")
    result = prepare_dataset(str(src), name="d", data_root=tmp_path / "data", tokenizer=kind, vocab_size=320)
    meta = json.loads((result.path / "meta.json").read_text())
    assert meta == result.meta and meta["tokenizer"]["kind"] == kind and meta["dtype"] == "uint16"
    assert meta["source"]["kind"] == "local" and meta["source"]["documents"] == 12
    tok = load_tokenizer(result.path)
    assert tok.vocab_size == meta["vocab_size"]
    originals = [p.read_text(encoding="utf-8") for p in sorted(src.glob("*.txt"))]
    seen = []
    for split in ("train", "val"):
        info, ids = meta["splits"][split], bin_tokens(result.path, split, meta)
        assert len(ids) == info["tokens"] and int(ids.max()) < meta["vocab_size"]
        assert (result.path / f"{split}.bin").stat().st_size == info["tokens"] * 2
        docs = tok.decode(ids.tolist()).split(EOT)
        assert docs[-1] == "" and len(docs) - 1 == info["documents"]  # every document ends with EOT
        assert sum(len(d.encode()) for d in docs) == info["bytes"]
        seen += docs[:-1]
    assert sorted(seen) == sorted(originals)  # split by whole documents, nothing lost or duplicated
    assert not list((tmp_path / "data").glob(".*"))  # no temp folders left


def test_same_inputs_give_identical_bytes(tmp_path):
    src = write_corpus(tmp_path / "src")
    runs = [prepare_dataset(str(src), name=f"r{i}", data_root=tmp_path, vocab_size=300, seed=7)
            for i in range(2)]
    for file in ("train.bin", "val.bin", "tokenizer.tiktoken"):
        assert (runs[0].path / file).read_bytes() == (runs[1].path / file).read_bytes()
    metas = [dict(r.meta, created=None) for r in runs]
    assert metas[0] == metas[1]
    # The seed, and only the seed, picks the val documents.
    texts = [f"doc {i}" for i in range(20)]
    assert split_corpus(texts, 0.2, 7) == split_corpus(texts, 0.2, 7)
    assert len({tuple(split_corpus(texts, 0.2, seed)[0]["val"]) for seed in range(4)}) > 1


def test_stdlib_source_with_small_cap(tmp_path):
    result = prepare_dataset("stdlib", data_root=tmp_path, tokenizer="char", max_bytes=150_000)
    meta = result.meta
    assert result.path == tmp_path / "stdlib-char"
    src = meta["source"]
    assert src["kind"] == "stdlib" and src["python_version"] and src["truncated"]
    assert 140_000 < src["bytes"] <= 150_000 == src["max_bytes"]
    assert sum(s["bytes"] for s in meta["splits"].values()) == src["bytes"]
    root, files = corpus.stdlib_files()
    names = [name for name, _ in files]
    assert names == sorted(names) and "os.py" in names
    assert not any(part in ("test", "tests", "idlelib", "site-packages")
                   for name in names for part in name.split("/"))


def test_stdlib_listing_matches_fingerprint_of_cut(tmp_path):
    a = corpus.load_corpus("stdlib", max_bytes=50_000)
    b = corpus.load_corpus("stdlib", max_bytes=50_000)
    c = corpus.load_corpus("stdlib", max_bytes=60_000)
    assert a.source["sha256"] == b.source["sha256"] != c.source["sha256"]
    assert a.names == [n for n, _ in corpus.stdlib_files()[1][: len(a.names)]]


def test_jsonl_and_parquet_with_text_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(1)
    rows = [{"body": " ".join(rng.choice(WORDS) for _ in range(60)), "id": i} for i in range(30)]
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "a.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:15])
    pq.write_table(pa.Table.from_pylist(rows[15:]), src / "b.parquet")
    result = prepare_dataset(str(src), data_root=tmp_path / "data", tokenizer="char", text_field="body")
    assert result.path.name == "src-char"
    assert result.meta["source"]["documents"] == 30 and result.meta["source"]["text_field"] == "body"
    tok = load_tokenizer(result.path)
    texts = []
    for split in ("train", "val"):
        texts += tok.decode(bin_tokens(result.path, split, result.meta).tolist()).split(EOT)[:-1]
    assert sorted(texts) == sorted(r["body"] for r in rows)
    with pytest.raises(MoegptError, match="has no field 'text'.*body, id"):
        prepare_dataset(str(src / "a.jsonl"), data_root=tmp_path / "data", text_field="text")


def test_hub_source_uses_datasets_when_reachable(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(repo, config, split, streaming):
        calls.append((repo, config, split, streaming))
        return iter([{"text": f"record {i} " + " ".join(WORDS) * 3} for i in range(20)])

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(corpus, "host_reachable", lambda *a, **k: True)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = prepare_dataset("hf:someone/tiny:en", data_root=tmp_path, tokenizer="char", split="validation")
    assert calls == [("someone/tiny", "en", "validation", True)]
    assert result.path.name == "tiny-en-char" and result.meta["source"]["kind"] == "hub"
    assert result.meta["source"]["documents"] == 20


def test_hub_offline_fails_fast_and_suggests_local_path(tmp_path):
    with pytest.raises(MoegptError, match="HF_HUB_OFFLINE is set.*local path"):
        prepare_dataset("hf:someone/tiny", data_root=tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_single_document_is_cut_at_a_line(tmp_path):
    write_corpus(tmp_path / "src", n_files=1, lines=200)
    result = prepare_dataset(str(tmp_path / "src" / "doc00.txt"), data_root=tmp_path, tokenizer="char")
    assert result.path.name == "doc00-char" and result.meta["split"]["unit"].startswith("line")
    val = result.meta["splits"]["val"]
    assert val["documents"] == 1 and 0.05 < val["bytes"] / result.meta["source"]["bytes"] < 0.15


def test_force_replaces_and_ensure_prepared_reuses(tmp_path, monkeypatch):
    src = write_corpus(tmp_path / "src", n_files=4)
    first = prepare_dataset(str(src), name="stdlib", data_root=tmp_path, tokenizer="char")
    (first.path / "marker").write_text("kept until --force")
    with pytest.raises(MoegptError, match="already exists"):
        prepare_dataset(str(src), name="stdlib", data_root=tmp_path, tokenizer="char")
    assert (first.path / "marker").exists()
    # ensure_prepared finds the folder and does not prepare again.
    monkeypatch.setattr("moegpt.prepare.prepare_dataset", lambda **k: pytest.fail("prepared again"))
    assert ensure_prepared(tmp_path, "stdlib") == first.path
    monkeypatch.undo()
    second = prepare_dataset(str(src), name="stdlib", data_root=tmp_path, tokenizer="char", force=True)
    assert not (second.path / "marker").exists() and TokenDataset(second.path).num_tokens("train") > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "stdlib"]


def test_ensure_prepared_builds_the_default_corpus(tmp_path, monkeypatch):
    seen = {}

    def fake_prepare(**kwargs):
        seen.update(kwargs)
        return type("R", (), {"path": Path(kwargs["data_root"]) / kwargs["name"]})()

    monkeypatch.setattr("moegpt.prepare.prepare_dataset", fake_prepare)
    assert ensure_prepared(tmp_path / "data") == tmp_path / "data" / "stdlib"
    assert seen["source"] == "stdlib" and seen["name"] == "stdlib"
    with pytest.raises(MoegptError, match="moegpt prepare --source SRC --name mine"):
        ensure_prepared(tmp_path / "data", "mine")


def test_jsonl_encoding_errors_strict_names_offset_replace_counts(tmp_path):
    path = tmp_path / "rows.jsonl"
    good = "".join(json.dumps({"t": " ".join(WORDS) * 2}) + "\n" for _ in range(30))
    path.write_bytes(good.encode() + b'{"t": "caf\xe9 ' + b"words " * 40 + b'"}\n')
    offset = len(good.encode()) + len('{"t": "caf')
    with pytest.raises(MoegptError, match=rf"rows.jsonl is not UTF-8 \(byte 0xe9 at offset {offset}\)"):
        prepare_dataset(str(path), data_root=tmp_path / "data", text_field="t", tokenizer="char")
    assert not (tmp_path / "data").exists()
    result = prepare_dataset(str(path), data_root=tmp_path / "data", text_field="t", tokenizer="char",
                             encoding_errors="replace")
    assert result.meta["source"]["replaced_bytes"] == 1 and result.meta["source"]["documents"] == 31
    assert [p.name for p in result.path.iterdir()] and not (result.path / ".scratch").exists()


def test_gpt2_plumbing_with_a_stand_in_encoding(tmp_path, monkeypatch):
    """No gpt2 files offline: stand in a small tiktoken Encoding to check prepare and load_tokenizer."""
    import tiktoken

    from moegpt import tokenizer

    stand_in = tokenizer.train_bpe(iter(WORDS * 50), 300).encoding
    monkeypatch.setattr(tokenizer, "gpt2_files_cached", lambda: True)
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    src = write_corpus(tmp_path / "src", n_files=6)
    result = prepare_dataset(str(src), data_root=tmp_path, tokenizer="gpt2")
    assert result.path.name == "src-gpt2" and result.meta["tokenizer"]["file"] is None
    tok = load_tokenizer(result.path)
    assert tok.kind == "gpt2" and tok.vocab_size == result.meta["vocab_size"] == stand_in.n_vocab
    assert TokenDataset(result.path).num_tokens("val") == result.meta["splits"]["val"]["tokens"]
