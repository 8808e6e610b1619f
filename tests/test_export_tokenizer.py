"""tokenizer.json conversion: the `tokenizers` library, reading only the exported JSON, encodes to moegpt's ids."""

from __future__ import annotations

import json
import random

import pytest
from conftest import write_text_corpus

from moegpt.data import TokenDataset
from moegpt.export.hf_tokenizer import bpe_merges, byte_to_unicode, tokenizer_files
from moegpt.tokenizer import EOT, CharTokenizer, bpe_from_ranks, load_tokenizer, train_bpe

tokenizers = pytest.importorskip("tokenizers")


def hf_tokenizer(tok):
    return tokenizers.Tokenizer.from_str(json.dumps(tokenizer_files(tok, 64)["tokenizer.json"]))


def awkward_text(seed: int = 0, n: int = 3000) -> str:
    """Contractions, digits, runs of spaces and newlines, accents, emoji and random code points."""
    rng = random.Random(seed)
    fixed = "don't we'll I'M 12345 3.14159  \t\n\n   x\r\n héllo wörld ünïcode 😀🎉 ﬁ ß ∑ 中文字符 "
    return fixed + "".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(160, 0x3000)])) for _ in range(n))


@pytest.fixture(scope="module")
def corpus_text(tmp_path_factory) -> str:
    folder = write_text_corpus(tmp_path_factory.mktemp("corpus"), n_files=8)
    return "".join(p.read_text() for p in sorted(folder.iterdir()))


@pytest.fixture(scope="module")
def bpe(corpus_text):
    return train_bpe(iter([corpus_text, awkward_text(1)]), 600)


def test_bpe_encodes_like_tiktoken(bpe, corpus_text):
    hf = hf_tokenizer(bpe)
    for text in (corpus_text, awkward_text(2), "  leading and trailing  ", ""):
        assert hf.encode(text).ids == bpe.encode(text)
        assert hf.decode(bpe.encode(text)) == text


def test_gpt2_split_pattern_encodes_like_tiktoken(bpe, corpus_text):
    # the `gpt2` kind's vocabulary needs a download; its split pattern (tiktoken's own) does not
    from tiktoken_ext.openai_public import r50k_pat_str

    tok = bpe_from_ranks(dict(bpe.encoding._mergeable_ranks), r50k_pat_str)
    hf = hf_tokenizer(tok)
    for text in (corpus_text, awkward_text(3)):
        assert hf.encode(text).ids == tok.encode(text)


def test_bpe_special_and_byte_tokens(bpe):
    body = tokenizer_files(bpe, 64)["tokenizer.json"]
    assert body["added_tokens"] == [{"id": bpe.eot_id, "content": EOT, "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True}]
    assert body["model"]["vocab"][EOT] == bpe.eot_id and len(body["model"]["vocab"]) == bpe.vocab_size
    assert hf_tokenizer(bpe).encode(EOT).ids == [bpe.eot_id]


def test_merges_include_every_split_into_two_tokens():
    # "abc" was made from "ab"+"c", but tiktoken also merges "a"+"bc" when those are adjacent
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5, b"x": 6}
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c")]
    pattern = r"[a-z]+|\s+"
    tok = bpe_from_ranks(ranks, pattern)
    for text in ("abc", "abcabc", "bcabcab", "cbabcba", "aabbcc"):
        assert hf_tokenizer(tok).encode(text).ids == tok.encode(text), text


def test_byte_table_is_gpt2s_bijection():
    table = byte_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"
    assert table[ord("a")] == "a"


def test_char_vocabulary_with_unknown_characters(corpus_text):
    tok = CharTokenizer.train([corpus_text])
    hf = hf_tokenizer(tok)
    text = corpus_text[:2000] + "é😀\u0000Z"  # unseen characters: one <|unk|> each
    ids = hf.encode(text).ids
    assert ids == tok.encode(text) and ids.count(tok.unk_id) == 4
    assert hf.decode(tok.encode(corpus_text[:500])) == corpus_text[:500]


def test_prepared_folder_tokenizer(tiny_data):
    tok = load_tokenizer(tiny_data / "tiny")
    ids = TokenDataset(tiny_data / "tiny").tokens("train")[:5000].tolist()
    documents = tok.decode(ids).split(EOT)
    assert len(documents) > 1
    hf = hf_tokenizer(tok)
    assert [hf.encode(d).ids for d in documents] == [tok.encode(d) for d in documents]


def test_special_token_text_is_the_documented_difference(tiny_data):
    # transformers' tokenizers turn a literal "<|endoftext|>" into the special id (as GPT-2's does);
    # moegpt's encode treats special-token strings in text as plain characters
    tok = load_tokenizer(tiny_data / "tiny")
    assert hf_tokenizer(tok).encode(f"def{EOT}").ids == tok.encode("def") + [tok.eot_id]
    assert tok.encode(f"def{EOT}") != tok.encode("def") + [tok.eot_id]
