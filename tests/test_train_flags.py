"""The common knobs have their own flags (not only --set), and land in the saved config."""

from __future__ import annotations

import tomllib

from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.moe import native

runner = CliRunner()


def test_common_knobs_as_flags(tiny_data, tmp_path):
    runs = tmp_path / "elsewhere"
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                                 "--runs-root", str(runs), "--name", "f", "--max-iters", "1", "--dropout", "0.1",
                                 "--weight-decay", "0.05", "--beta2", "0.99", "--grad-clip", "0.5",
                                 "--eval-iters", "2", "--lr-decay-iters", "30", "--min-lr-ratio", "0.2",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    saved = tomllib.loads((runs / "f" / "config.toml").read_text())
    assert saved["model"]["dropout"] == 0.1
    assert {k: saved["train"][k] for k in ("weight_decay", "beta2", "grad_clip", "eval_iters", "lr_decay_iters",
                                           "min_lr_ratio")} == {"weight_decay": 0.05, "beta2": 0.99, "grad_clip": 0.5,
                                                                "eval_iters": 2, "lr_decay_iters": 30,
                                                                "min_lr_ratio": 0.2}
    assert "threads=1" in result.stdout
    assert f"kernels={'native' if native.available() else 'python'}" in result.stdout


def test_help_says_what_the_dense_ffn_is():
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"}, terminal_width=300).output
    assert "--activation gelu is nanoGPT's MLP" in text and "the dense FFN" in text


def test_warnings_go_to_stderr(tiny_data, tmp_path):
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                                 "--runs-root", str(tmp_path), "--name", "ec", "--max-iters", "1",
                                 "--moe", "expert-choice"])
    assert result.exit_code == 0, result.output
    assert "not causal" in result.stderr and "not causal" not in result.stdout
    sample = runner.invoke(app, ["sample", str(tmp_path / "ec"), "--max-new-tokens", "2", "--seed", "0"])
    assert sample.exit_code == 0, sample.output
    assert "not causal" in sample.stderr and "not causal" not in sample.stdout


def test_greedy_with_several_samples_says_they_are_identical(tiny_data, tmp_path):
    assert runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                               "--runs-root", str(tmp_path), "--name", "g", "--max-iters", "1"]).exit_code == 0
    result = runner.invoke(app, ["sample", str(tmp_path / "g"), "--temperature", "0", "--num-samples", "2",
                                 "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert "the 2 samples will be identical" in result.stderr
    first, second = result.stdout.split("---------------\n")
    assert first.strip() == second.strip()
