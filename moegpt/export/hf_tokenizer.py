"""A moegpt tokenizer as a Hugging Face `tokenizers` file (tokenizer.json) that encodes text to the same ids.

Written as plain JSON in the format `tokenizers` reads (version "1.0"), so exporting needs no Hugging Face
package; loading it back (AutoTokenizer, `tokenizers.Tokenizer.from_file`) does.

- bpe / gpt2 (tiktoken): byte-level BPE. The same split regex isolates pieces, ByteLevel maps each byte to
  the printable character GPT-2 uses for it, and the model holds the tiktoken ranks as ids. tiktoken merges,
  within a piece, the adjacent pair whose concatenation has the lowest rank, whatever the two parts are; so
  the merge list holds every split of every token into two tokens (not only the split that created it in
  training), ordered by the rank of the result. A piece that is a whole token maps to it directly
  (`ignore_merges`), as in tiktoken.
- char: one id per character (BPE without merges over the characters), unknown characters to <|unk|>.

Both differ from moegpt's `encode` only where text spells a special token literally (`<|endoftext|>`):
transformers' tokenizers map that to the special id, as GPT-2's does; moegpt encodes it as plain text.
"""

from __future__ import annotations

from typing import Any

from moegpt.errors import MoegptError
from moegpt.tokenizer import EOT, UNK, CharTokenizer, Tokenizer

FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every (left, right) pair of tokens whose concatenation is a token, ordered by that token's rank
    (then by split position), so that merging by list order is merging by tiktoken's rank order."""
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, cut, left, right))
    merges.sort(key=lambda m: (m[0], m[1]))
    return [(left, right) for _, _, left, right in merges]


def special_entry(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def bpe_model(vocab: dict[str, int], merges: list[list[str]], unk: str | None, ignore_merges: bool) -> dict:
    return {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges}


def tiktoken_json(encoding: Any) -> dict[str, Any]:
    """tokenizer.json of a tiktoken Encoding (mergeable ranks, split pattern, special tokens)."""
    ranks: dict[bytes, int] = encoding._mergeable_ranks
    table = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {text(token): rank for token, rank in ranks.items()}
    if len(vocab) != len(ranks):
        raise MoegptError("the BPE vocabulary has two tokens with the same bytes; it cannot be converted")
    specials = dict(encoding._special_tokens)
    vocab.update(specials)
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special_entry(i, name) for name, i in sorted(specials.items(), key=lambda s: s[1])],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": encoding._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", **byte_level}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": bpe_model(vocab, [[text(a), text(b)] for a, b in bpe_merges(ranks)], None, ignore_merges=True),
    }


def char_json(tok: CharTokenizer) -> dict[str, Any]:
    """tokenizer.json of a char vocabulary: each character its own word piece, no merges."""
    vocab = {c: i for i, c in enumerate(tok.chars)}
    vocab.update({EOT: tok.eot_id, UNK: tok.unk_id})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [special_entry(tok.eot_id, EOT), special_entry(tok.unk_id, UNK)],
        "normalizer": None, "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Fuse"},  # characters join with nothing between them
        "model": bpe_model(vocab, [], UNK, ignore_merges=False),
    }


def tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, dict[str, Any]]:
    """File name -> JSON content: tokenizer.json, its tokenizer_config.json and special_tokens_map.json."""
    if isinstance(tok, CharTokenizer):
        body, specials = char_json(tok), {"bos_token": EOT, "eos_token": EOT, "unk_token": UNK}
    elif hasattr(tok, "encoding"):
        body, specials = tiktoken_json(tok.encoding), {"bos_token": EOT, "eos_token": EOT}
    else:
        raise MoegptError(f"no Hugging Face conversion for the {tok.kind!r} tokenizer")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
              **specials,
              "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"}
                                       for t in body["added_tokens"]}}
    return {FILE: body, CONFIG_FILE: config, SPECIAL_MAP_FILE: specials}
