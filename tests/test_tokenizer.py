"""Tokenizers: round trips, unknown characters, streaming bytes, saved files, gpt2 offline."""

from __future__ import annotations

import json

import pytest

from moegpt import corpus, tokenizer
from moegpt.errors import MoegptError
from moegpt.tokenizer import EOT, CharTokenizer, load_tokenizer, save_tokenizer, train_bpe

TEXTS = ["def f(x):\n    return x + 1\n", "Grüße aus Köln — 東京 🚀 café\n",
         "plain words, plain words.\n" * 20]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("empty-tiktoken-cache")))
    monkeypatch.setattr(corpus, "host_reachable", lambda *a, **k: False)


def saved(tok: tokenizer.Tokenizer, folder) -> tokenizer.Tokenizer:
    """Write tok and a minimal meta.json into folder, then load it back the public way."""
    info = save_tokenizer(tok, folder)
    (folder / "meta.json").write_text(json.dumps({"tokenizer": info}))
    return load_tokenizer(folder)


def test_char_round_trip_and_unknown_policy(tmp_path):
    tok = saved(CharTokenizer.train(TEXTS), tmp_path)
    assert tok.kind == "char" and tok.vocab_size == len(set("".join(TEXTS))) + 2
    for text in TEXTS:
        ids = tok.encode(text)
        assert len(ids) == len(text) and tok.decode(ids) == text
    ids = tok.encode("x€z")  # characters the training text never showed
    assert ids[1] == tok.unk_id == ids[2] and ids[0] == tok.encode("x")[0]
    assert tok.decode(ids) == "x\ufffd\ufffd"
    assert tok.decode([tok.eot_id]) == EOT


def test_bpe_round_trip_and_saved_file(tmp_path):
    tok = train_bpe(iter(TEXTS * 3), 300)
    assert tok.kind == "bpe" and 257 <= tok.vocab_size <= 300
    loaded = saved(tok, tmp_path)
    assert (tmp_path / "tokenizer.tiktoken").is_file() and loaded.vocab_size == tok.vocab_size
    for text in [*TEXTS, "unseen ✓ text\r\n\x00"]:
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.decode(loaded.encode(text)) == text
    # Special-token text in input is plain text, never the EOT id.
    assert loaded.eot_id not in loaded.encode(f"a{EOT}b")


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_decode_bytes_streams_multibyte_characters(kind):
    tok = CharTokenizer.train(TEXTS) if kind == "char" else train_bpe(iter(TEXTS), 260)
    text = "Köln 東京 🚀"
    pieces = [tok.decode_bytes([i]) for i in tok.encode(text)]
    assert b"".join(pieces).decode("utf-8") == text
    # Past the vocabulary (a padded model head) decodes to U+FFFD instead of raising.
    assert tok.decode([tok.vocab_size + 5]) == "\ufffd"


def test_load_refuses_edited_tokenizer_file(tmp_path):
    save = saved(CharTokenizer.train(TEXTS), tmp_path)
    assert save.vocab_size > 2
    path = tmp_path / "tokenizer.json"
    path.write_text(path.read_text().replace('"a"', '"A"', 1))
    with pytest.raises(MoegptError, match="does not match meta.json"):
        load_tokenizer(tmp_path)


def test_load_without_meta_says_run_prepare(tmp_path):
    with pytest.raises(MoegptError, match="run `moegpt prepare` first"):
        load_tokenizer(tmp_path / "nowhere")


def test_gpt2_offline_without_cache_names_the_cache_variable():
    with pytest.raises(MoegptError, match="TIKTOKEN_CACHE_DIR") as err:
        tokenizer.load_gpt2()
    assert "--tokenizer bpe" in str(err.value)


def test_bpe_vocab_bounds():
    with pytest.raises(MoegptError, match="257"):
        tokenizer.check_vocab_size("bpe", 256)
    tokenizer.check_vocab_size("bpe", 257)
    tokenizer.check_vocab_size("bpe", 70_000)  # allowed: the bins switch to uint32
