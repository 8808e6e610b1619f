"""`moegpt inspect-routing` end to end on tiny trained runs: views, JSON, read-only-ness, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.checkpoint import checkpoint_hash, resolve_checkpoint
from moegpt.cli.main import app
from moegpt.inspect.schema import SCHEMA_VERSION, validate_report

runner = CliRunner()

# name -> extra train flags. "topk" has MoE layers 0 and 2 (layer 1 dense) and a capacity that drops tokens.
RUNS = {
    "topk": ["--moe", "topk", "--n-layer", "3", "--set", "moe.moe_every=2", "--capacity-factor", "1.0"],
    "dense": ["--moe", "dense"],
    "shared": ["--moe", "shared"],
    "aux-free": ["--moe", "aux-free"],
    "expert-choice": ["--moe", "expert-choice"],
    "soft": ["--moe", "soft"],
}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inspect-runs")
    out = {}
    for name, flags in RUNS.items():
        result = runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                                     "--set", f"train.runs_root={root}", "--name", name, "--max-iters", "2",
                                     "--log-interval", "1", *flags])
        assert result.exit_code == 0, result.output
        out[name] = root / name
    return out


def inspect(*args: str):
    return runner.invoke(app, ["inspect-routing", *map(str, args)])




def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))}


def test_table_report_and_run_left_unchanged(runs):
    run = runs["topk"]
    before_hash, before_files = checkpoint_hash(resolve_checkpoint(run)), snapshot(run)
    result = inspect(run, "--device", "cpu", "--text", "def index(self):")
    assert result.exit_code == 0, result.output + result.stderr
    out = result.output
    for fragment in ("routing per MoE layer", "expert load (before drops)", "scale", "most over-represented",
                     "co-activated pairs", "cross-layer", "0 → 2", "training history", "val CE", "L0: def index",
                     "L2: def index"):
        assert fragment in out, fragment
    assert checkpoint_hash(resolve_checkpoint(run)) == before_hash
    assert snapshot(run) == before_files  # nothing written, nothing touched


def test_json_report_schema_and_numbers(runs):
    result = inspect(runs["topk"], "--format", "json", "--tokens", "1000")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["schema_version"] == SCHEMA_VERSION and validate_report(report) == []
    assert report["data"]["tokens"] == 1000 and report["run"]["moe_layers"] == [0, 2]
    assert report["run"]["checkpoint_sha256"] == checkpoint_hash(resolve_checkpoint(runs["topk"]))
    assert report["val_ce"] > 0 and report["run"]["best_val_ce"] > 0
    for layer in report["layers"]:
        assert layer["assignments"] == 1000 * 2  # tokens x k
        assert sum(layer["counts_after_drops"]) == 1000 * 2 - layer["dropped"]
        assert layer["dropped"] > 0 and layer["drop_rate"] > 0  # capacity factor 1.0
    assert [c["from_layer"] for c in report["cross_layer"]] == [0]
    assert report["history"]["steps"] == [1, 2] and report["history"]["layers"][0]["layer"] == 0
    assert report["causality"] is None and report["compare"] is None


def test_layer_filter_and_whole_val_split(runs, tiny_data):
    result = inspect(runs["topk"], "--format", "json", "--layer", "2", "--tokens", "10000000")
    report = json.loads(result.stdout)
    assert [x["layer"] for x in report["layers"]] == [2]
    val_tokens = json.loads((tiny_data / "tiny" / "meta.json").read_text())["splits"]["val"]["tokens"]
    assert report["data"]["tokens"] == val_tokens - 1  # all of val (the last token is only a target)


def test_train_split(runs):
    report = json.loads(inspect(runs["topk"], "--format", "json", "--split", "train", "--tokens", "500").stdout)
    assert report["data"]["split"] == "train" and report["data"]["tokens"] == 500


def test_variant_specific_numbers(runs):
    shared = json.loads(inspect(runs["shared"], "--format", "json", "--tokens", "512").stdout)
    assert all(0 < x["extras"]["shared_output_share"] < 1 for x in shared["layers"])
    assert "shared experts' share" in inspect(runs["shared"], "--tokens", "512").output
    aux = json.loads(inspect(runs["aux-free"], "--format", "json", "--tokens", "512").stdout)
    assert all(len(x["extras"]["expert_bias"]) == 4 for x in aux["layers"])
    table = inspect(runs["aux-free"], "--tokens", "512")
    assert table.exit_code == 0 and "expert bias (selection only)" in table.output
    ec = json.loads(inspect(runs["expert-choice"], "--format", "json", "--tokens", "512").stdout)
    assert ec["run"]["causal"] is False and all(x["dropped"] == 0 for x in ec["layers"])


def test_compare_side_by_side(runs):
    result = inspect(runs["topk"], "--tokens", "512", "--compare", runs["dense"])
    assert result.exit_code == 0, result.stderr
    assert "compare:" in result.output and "val CE (these tokens)" in result.output
    assert "L0 balance" in result.output and "dense" in result.output
    report = json.loads(inspect(runs["topk"], "--tokens", "512", "--format", "json", "--compare",
                                runs["shared"]).stdout)
    assert report["compare"]["run"]["variant"] == "shared" and validate_report(report) == []


def test_png(runs, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "heat.png"
    result = inspect(runs["topk"], "--tokens", "512", "--png", png)
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    result = inspect(runs["topk"], "--png", tmp_path / "x.png")
    assert_one_line_error(result, "matplotlib", "moegpt[plot]")
    assert not (tmp_path / "x.png").exists()


def test_dense_run_says_nothing_to_route_with_val_ce(runs):
    result = inspect(runs["dense"], "--tokens", "256")
    assert_one_line_error(result, "dense", "nothing to route", "val CE ")
    value = result.stderr.split("val CE ")[1].split()[0]
    assert float(value) > 0


@pytest.mark.parametrize("args,fragments", [
    (["--tokens", "0"], ["--tokens must be > 0"]),
    (["--tokens", "-5"], ["--tokens must be > 0"]),
    (["--layer", "7"], ["--layer 7 is out of range"]),
    (["--layer", "-1"], ["out of range"]),
    (["--layer", "1"], ["--layer 1 is not a MoE layer", "[0, 2]"]),
    (["--split", "test"], ["--split must be val or train"]),
    (["--format", "xml"], ["--format must be table or json"]),
    (["--dead-threshold", "2"], ["--dead-threshold"]),
])
def test_bad_options(runs, args, fragments):
    assert_one_line_error(inspect(runs["topk"], *args), *fragments)


def test_missing_and_corrupt_runs(runs, tmp_path):
    assert_one_line_error(inspect(tmp_path / "nope"), "not found")
    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert_one_line_error(inspect(empty), "no checkpoint")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert_one_line_error(inspect(garbage))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(resolve_checkpoint(runs["topk"]).read_bytes()[:5000])
    assert_one_line_error(inspect(truncated))
    assert_one_line_error(inspect(runs["topk"], "--compare", tmp_path / "nope"), "not found")
