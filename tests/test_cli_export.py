"""`moegpt export`: --check, refusals (exit 2, nothing written), destinations, a failing check (exit 1)."""

from __future__ import annotations

import shutil
import sys

import pytest
from cli_helpers import assert_one_line_error
from export_helpers import train_run
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.export.gpt2 import GPT2Mapping

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {"gelu": train_run(tiny_data, "tiny", root, "gelu", "--moe", "dense", "--activation", "gelu"),
            "mixtral": train_run(tiny_data, "tiny", root, "mixtral", "--set", "model.arch=llama"),
            "topk": train_run(tiny_data, "tiny", root, "topk", noise=0.0)}


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("run, architecture", [("gelu", "GPT2LMHeadModel"), ("mixtral", "MixtralForCausalLM")])
def test_export_with_check(runs, tmp_path, run, architecture):
    pytest.importorskip("transformers")
    out = tmp_path / "hf" / run
    result = runner.invoke(app, ["export", str(runs[run]), str(out), "--check"])
    assert result.exit_code == 0, result.output
    assert f"as {architecture}" in result.stdout and "check passed: max |logit difference|" in result.stdout
    assert "greedy 32 tokens identical" in result.stdout and "tokenizer on" in result.stdout
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md"} <= set(leftovers(out))
    assert leftovers(out.parent) == [run]  # no temp folder left beside it


def test_moe_run_is_refused_and_nothing_written(runs, tmp_path):
    out = tmp_path / "topk"
    result = runner.invoke(app, ["export", str(runs["topk"]), str(out)])
    assert_one_line_error(result, "cannot export", "topk MoE layers on the gpt2 trunk",
                          "nearest exportable", "--activation gelu")
    assert leftovers(tmp_path) == []


def test_destinations(runs, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert_one_line_error(runner.invoke(app, ["export", str(runs["gelu"]), str(busy), "--force"]), "holds no export")
    assert leftovers(busy) == ["notes.txt"]

    out = tmp_path / "out"
    assert runner.invoke(app, ["export", str(runs["gelu"]), str(out)]).exit_code == 0
    (out / "README.md").write_text("old")
    again = runner.invoke(app, ["export", str(runs["gelu"]), str(out)])
    assert_one_line_error(again, "already holds an export", "--force")
    assert (out / "README.md").read_text() == "old"
    assert runner.invoke(app, ["export", str(runs["gelu"]), str(out), "--force"]).exit_code == 0
    assert (out / "README.md").read_text() != "old" and leftovers(tmp_path) == ["busy", "out"]


def test_failing_check_writes_nothing(runs, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    real = GPT2Mapping.hf_config

    def tanh_gelu(self, model, eot_id):  # GPT-2's default GELU is the tanh approximation: close, not exact
        return {**real(self, model, eot_id), "activation_function": "gelu_new"}

    monkeypatch.setattr(GPT2Mapping, "hf_config", tanh_gelu)
    result = runner.invoke(app, ["export", str(runs["gelu"]), str(tmp_path / "out"), "--check"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error: check failed, nothing written: max |logit")
    assert leftovers(tmp_path) == []


def test_check_without_transformers(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    result = runner.invoke(app, ["export", str(runs["gelu"]), str(tmp_path / "out"), "--check"])
    assert_one_line_error(result, "needs transformers", "moegpt[hf]")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("args, fragment", [
    (["--format", "onnx"], "unknown format 'onnx'"),
])
def test_bad_flags(runs, tmp_path, args, fragment):
    assert_one_line_error(runner.invoke(app, ["export", str(runs["gelu"]), str(tmp_path / "o"), *args]), fragment)
    assert leftovers(tmp_path) == []


def test_missing_run(tmp_path):
    assert_one_line_error(runner.invoke(app, ["export", str(tmp_path / "nope"), str(tmp_path / "o")]),
                          "checkpoint not found")


def test_error_while_writing_leaves_nothing(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    run = train_run(data, "tiny", tmp_path / "runs", "gelu", "--moe", "dense", "--activation", "gelu", noise=0.0)
    shutil.rmtree(data)  # the tokenizer is read from the run's data folder once the temporary folder exists
    out = tmp_path / "exports" / "gelu"
    assert_one_line_error(runner.invoke(app, ["export", str(run), str(out)]), "data folder", "is gone")
    assert leftovers(out.parent) == []
