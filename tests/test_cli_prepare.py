"""`moegpt prepare` through the CLI: the summary, and every bad input as one line, exit 2, nothing left."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moegpt import corpus
from moegpt.cli.main import app

runner = CliRunner()
WORDS = "alpha beta gamma delta router expert token layer ünïcode 東京 return self".split()


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("empty-tiktoken-cache")))
    monkeypatch.setattr(corpus, "host_reachable", lambda *a, **k: False)


def text_folder(folder: Path, n_files: int = 10) -> Path:
    rng = random.Random(3)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = (" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(30))
        (folder / f"part{i}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_prepare_folder_prints_summary(tmp_path):
    src = text_folder(tmp_path / "src")
    result = runner.invoke(app, ["prepare", "--source", str(src), "--data-root", str(tmp_path / "data"),
                                 "--vocab-size", "300"])
    assert result.exit_code == 0, result.output
    for word in ("prepared", "train", "val", "bytes/token", "bpe, vocab", "time"):
        assert word in result.stdout
    meta = json.loads((tmp_path / "data" / "src" / "meta.json").read_text())
    assert meta["tokenizer"]["requested_vocab_size"] == 300 and result.stderr == ""


def test_prepare_stdlib_with_small_cap(tmp_path):
    result = runner.invoke(app, ["prepare", "--data-root", str(tmp_path), "--max-bytes", "200k",
                                 "--vocab-size", "400"])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "stdlib" / "meta.json").read_text())
    assert meta["source"]["kind"] == "stdlib" and meta["source"]["bytes"] <= 200_000
    assert meta["vocab_size"] == 400 and "standard library" in result.stdout


def test_replace_proceeds_and_reports_replaced_bytes(tmp_path):
    src = text_folder(tmp_path / "src")
    (src / "bad.txt").write_bytes(b"caf\xe9 latin-1 text\n" * 40)
    result = runner.invoke(app, ["prepare", "-s", str(src), "--data-root", str(tmp_path / "d"), "-t", "char",
                                 "--encoding-errors", "replace"])
    assert result.exit_code == 0, result.output
    assert "40 invalid byte(s) replaced" in result.stdout
    meta = json.loads((tmp_path / "d" / "src-char" / "meta.json").read_text())
    assert meta["source"]["replaced_bytes"] == 40


def bad_cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    src = text_folder(tmp / "src")
    (tmp / "empty").mkdir()
    (tmp / "empty" / "a.txt").write_text("")
    (tmp / "empty" / "b.md").write_text("  \n\n")
    (tmp / "nothing").mkdir()
    (tmp / "nothing" / "x.bin").write_bytes(b"\0")
    (tmp / "binary").mkdir()
    (tmp / "binary" / "img.txt").write_bytes(b"GIF89a\0\1\2")
    (tmp / "latin1").mkdir()
    (tmp / "latin1" / "old.txt").write_bytes(b"hello w\xf6rld\n")
    (tmp / "tiny").mkdir()
    (tmp / "tiny" / "t.txt").write_text("hello world\n" * 30)
    (tmp / "rows.jsonl").write_text('{"text": "hi"}\n')
    return {
        "missing path": ([str(tmp / "nope")], ("no such file or folder",)),
        "empty after filtering": ([str(tmp / "empty")], ("holds no text after dropping blank documents",)),
        "no supported files": ([str(tmp / "nothing")], ("no .txt, .md",)),
        "binary": ([str(tmp / "binary")], ("img.txt looks binary (NUL byte at offset 6)",)),
        "non-utf8": ([str(tmp / "latin1")], ("old.txt is not UTF-8 (byte 0xf6 at offset 7)", "replace")),
        "split too small": ([str(tmp / "tiny"), "-t", "char"], ("val split holds only", "tokens")),
        "vocab below bytes+specials": ([str(src), "--vocab-size", "256"], ("[257,",)),
        "unknown tokenizer": ([str(src), "-t", "wordpiece"], ("unknown tokenizer 'wordpiece'",)),
        "unknown scheme": (["s3://bucket/corpus"], ("unknown source scheme",)),
        "structured without field": ([str(tmp / "rows.jsonl")], ("pass --text-field",)),
        "hub offline": (["hf:someone/corpus"], ("HF_HUB_OFFLINE is set", "local path")),
        "gpt2 offline": ([str(src), "-t", "gpt2"], ("TIKTOKEN_CACHE_DIR", "--tokenizer bpe")),
        "vocab with char": ([str(src), "-t", "char", "--vocab-size", "500"], ("bpe tokenizer only",)),
        "bad max bytes": ([str(src), "--max-bytes", "lots"], ("--max-bytes expects a size",)),
        "bad val fraction": ([str(src), "--val-fraction", "1.5"], ("--val-fraction must be in (0, 1)",)),
        "bad encoding policy": ([str(src), "--encoding-errors", "ignore"], ("strict or replace",)),
        "bad name": ([str(src), "--name", "../escape"], ("--name must be",)),
        "hub bad spec": (["hf:"], ("hf:owner/name[:config]",)),
    }


CASE_NAMES = ["missing path", "empty after filtering", "no supported files", "binary", "non-utf8",
              "split too small", "vocab below bytes+specials", "unknown tokenizer", "unknown scheme",
              "structured without field", "hub offline", "gpt2 offline", "vocab with char", "bad max bytes",
              "bad val fraction", "bad encoding policy", "bad name", "hub bad spec"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(tmp_path, case):
    args, fragments = bad_cases(tmp_path)[case]
    data_root = tmp_path / "out" / "data"
    result = runner.invoke(app, ["prepare", "--source", *args, "--data-root", str(data_root)])
    one_line_error(result, *fragments)
    assert not (tmp_path / "out").exists()  # not even the data root it would have created


def test_unreachable_hub_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    probed = []
    monkeypatch.setattr(corpus, "host_reachable", lambda host, *a, **k: probed.append(host) or False)
    result = runner.invoke(app, ["prepare", "-s", "hf:someone/corpus", "--data-root", str(tmp_path / "d")])
    one_line_error(result, "huggingface.co did not answer within 3 s", "pass a local path")
    assert probed == ["huggingface.co"] and not (tmp_path / "d").exists()


def test_existing_output_is_untouched_without_force(tmp_path):
    src = text_folder(tmp_path / "src")
    args = ["prepare", "-s", str(src), "--data-root", str(tmp_path / "d"), "-t", "char"]
    assert runner.invoke(app, args).exit_code == 0
    out = tmp_path / "d" / "src-char"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    one_line_error(runner.invoke(app, [*args, "--seed", "5"]), "already exists", "--force")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert runner.invoke(app, [*args, "--seed", "5", "--force"]).exit_code == 0
    assert json.loads((out / "meta.json").read_text())["split"]["seed"] == 5
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["src-char"]  # no temp or old folders


def test_single_file_counts_and_next_command(tmp_path):
    from typer.testing import CliRunner

    from moegpt.cli.main import app

    source = tmp_path / "one.txt"
    source.write_text("".join(f"line {i} of the only document\n" for i in range(400)))
    result = CliRunner().invoke(app, ["prepare", "--source", str(source), "--tokenizer", "char",
                                      "--data-root", str(tmp_path / "d")], env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    total = next(line for line in result.stdout.splitlines() if "total" in line)
    assert total.split("│")[2].strip() == "1", total  # one document, not one per split
    assert "part of 1" in result.stdout and "cut at a line end" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"next: moegpt train --data one-char --data-root {tmp_path / 'd'}"
