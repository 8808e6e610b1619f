"""`moegpt compare`: table, JSON, CSV, sparklines, the PNG, warnings and errors; it never modifies a run."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import struct
import sys

import pytest
from cli_helpers import assert_one_line_error
from compare_helpers import eval_record, log_record, three_runs, write_data_meta, write_run
from typer.testing import CliRunner

from moegpt.cli.compare_charts import png_size_px
from moegpt.cli.main import app

runner = CliRunner()


def compare(*args: str):
    return runner.invoke(app, ["compare", *args])


def tree_digest(root) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_table_ranks_runs_and_draws_curves(tmp_path, monkeypatch):
    runs_root, _ = three_runs(tmp_path)
    monkeypatch.setenv("COLUMNS", "100")
    result = compare("--runs-root", str(runs_root))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    ranked = [line.split()[1] for line in lines if line[:1] in "123" and len(line.split()) > 3]
    assert ranked == ["topk", "switch", "dense"]
    assert "step 25*" in result.stdout and "3.00s" in result.stdout
    assert "curves against optimizer steps" in result.stdout
    assert max(len(line) for line in lines) <= 100


def test_json_and_csv_hold_the_leaderboard(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    board = json.loads(compare("--runs-root", str(runs_root), "--format", "json", "--sort", "equal-time").stdout)
    assert board["sort"] == "equal-time" and [r["run"] for r in board["rows"]] == ["dense", "switch", "topk"]
    assert board["rows"][1]["val_ce_at_equal_time"] == pytest.approx(2.4625)
    rows = list(csv.DictReader(io.StringIO(compare(str(runs_root / "*"), "--format", "csv").stdout)))
    assert [r["run"] for r in rows] == ["topk", "switch", "dense"]
    assert float(rows[2]["val_ce_at_equal_steps"]) == pytest.approx(2.35) and rows[2]["max_mean_load"] == ""


def test_compare_never_modifies_runs(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    before = tree_digest(tmp_path)
    png = ["--png", str(tmp_path / "c.png")] if importlib.util.find_spec("matplotlib") else []
    assert compare("--runs-root", str(runs_root), *png).exit_code == 0
    after = tree_digest(tmp_path)
    after.pop(str(tmp_path / "c.png"), None)
    assert after == before


def test_non_runs_warn_and_nothing_left_is_an_error(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    (tmp_path / "notarun").mkdir()
    result = compare(str(runs_root / "dense"), str(tmp_path / "notarun"), "--format", "json")
    assert result.exit_code == 0
    assert result.stderr.strip() == f"moegpt: warning: {tmp_path / 'notarun'} is not a run (no config.toml); skipped"
    assert [r["run"] for r in json.loads(result.stdout)["rows"]] == ["dense"]
    result = compare(str(tmp_path / "notarun"))
    assert result.exit_code == 2 and result.stderr.splitlines()[-1] == "moegpt: error: no runs to compare"
    assert_one_line_error(compare("--runs-root", str(tmp_path / "none")), "no runs to compare under")


@pytest.mark.parametrize("args, fragment", [(["--sort", "speed"], "--sort must be one of"),
                                            (["--format", "xml"], "--format must be one of"),
                                            (["--x", "epochs"], "--x must be all")])
def test_bad_options_are_one_line(tmp_path, args, fragment):
    assert_one_line_error(compare(*args), fragment)


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_png_is_written_at_the_expected_size(tmp_path):
    pytest.importorskip("matplotlib")
    runs_root, _ = three_runs(tmp_path)
    out = tmp_path / "curves.png"
    result = compare("--runs-root", str(runs_root), "--png", str(out), "--no-curves")
    assert result.exit_code == 0, result.output
    assert png_size(out) == png_size_px(2) == (1500, 750)  # topk and switch have load panels
    assert compare("--runs-root", str(runs_root), "--png", str(out), "--x", "time").exit_code == 0
    assert png_size(out) == (1500, 750)


def test_png_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    runs_root, _ = three_runs(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = compare("--runs-root", str(runs_root), "--png", str(tmp_path / "c.png"))
    assert_one_line_error(result, "pip install 'moegpt[plot]'")
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_compare_real_tiny_runs(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    for variant in ("dense", "topk", "switch"):
        result = runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                                     "--moe", variant, "--name", variant, "--max-iters", "10" if variant == "switch"
                                     else "20", "--set", f"train.runs_root={runs}"])
        assert result.exit_code == 0, result.output
    board = json.loads(compare(str(runs / "*"), "--format", "json").stdout)
    assert len(board["groups"]) == 1 and board["groups"][0]["equal_step"] == 10  # same data, read from checkpoints
    assert board["groups"][0]["data"].startswith("tiny (char")
    rows = {row["run"]: row for row in board["rows"]}
    records = [json.loads(line) for line in (runs / "topk" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_ce"] for r in records if "val_ce" in r}
    assert rows["topk"]["val_ce_at_equal_steps"] == evals[10] and rows["topk"]["final_val_ce"] == evals[20]
    assert rows["switch"]["steps"] == 10 and rows["switch"]["drop_frac"] is not None
    equal_s = board["groups"][0]["equal_train_s"]
    for name, row in rows.items():  # known from the run's first evaluation on
        lines = (runs / name / "metrics.jsonl").read_text().splitlines()
        first_eval_s = next(r["train_s"] for r in map(json.loads, lines) if "val_ce" in r)
        assert (row["val_ce_at_equal_time"] is None) == (first_eval_s > equal_s)


def test_table_flags_incomparable_runs_and_prints_names_literally(tmp_path, monkeypatch):
    runs_root, _ = three_runs(tmp_path)
    other = tmp_path / "other"
    write_data_meta(other, tokenizer="u" * 64, kind="bpe")
    write_run(runs_root, "[b]odd", "topk", [log_record(10, 9.0, 1.5), eval_record(10, 9.0, 1.0, 1.0)], other)
    monkeypatch.setenv("COLUMNS", "100")
    result = compare("--runs-root", str(runs_root), "--no-curves")
    assert result.exit_code == 0, result.output
    assert "incomparable:" in result.stdout and "  B: tiny (bpe, vocab 28, ssssssss), 1 run(s)" in result.stdout
    odd = next(line for line in result.stdout.splitlines() if "[b]odd" in line)
    assert odd.split()[:2] == ["B", "1"]  # ranked first, but only within its own group
