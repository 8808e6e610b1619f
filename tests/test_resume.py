"""Resuming takes the run's saved config as its base, so the printed resume command works for a run on
any corpus; a changed max_iters keeps the saved cosine horizon (and says so)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moegpt.checkpoint import load_checkpoint
from moegpt.cli.main import app
from moegpt.optim import lr_at
from moegpt.presets import resolve_config
from moegpt.resume import keep_decay_horizon

runner = CliRunner()


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Run from an empty folder: a resume that fell back to the default corpus would prepare data/stdlib here."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_printed_resume_command_works_for_a_non_default_corpus(tiny_data, tmp_path, elsewhere):
    runs = str(tmp_path / "runs")
    first = runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                                "--runs-root", runs, "--name", "x", "--max-iters", "4", "--eval-interval", "2"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", "--name", "x", "--runs-root", runs, "--resume", "--max-iters", "6"])
    assert again.exit_code == 0, again.output
    assert not (elsewhere / "data").exists()
    assert "keeps its cosine decay to step 4" in again.output
    state = load_checkpoint(tmp_path / "runs" / "x" / "ckpt" / "step_000006.pt")
    assert state["config"]["data"]["name"] == "tiny" and state["config"]["train"]["lr_decay_iters"] == 4
    records = [json.loads(line) for line in (tmp_path / "runs" / "x" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "lr" in r][-1]
    tiny = resolve_config("tiny")
    assert last["step"] == 6 and last["lr"] == pytest.approx(tiny.train.lr * tiny.train.min_lr_ratio)
    assert last["lr"] != pytest.approx(lr_at(5, resolve_config("tiny", sets=["train.max_iters=6"])))


def test_resume_flags_still_refuse_what_resuming_does_not_allow(tiny_data, tmp_path, elsewhere):
    runs = str(tmp_path / "runs")
    assert runner.invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
                               "--runs-root", runs, "--name", "x", "--max-iters", "2"]).exit_code == 0
    result = runner.invoke(app, ["train", "--name", "x", "--runs-root", runs, "--resume", "--n-embd", "64"])
    assert result.exit_code == 2 and "model.n_embd" in result.stderr


def test_decay_horizon_rules():
    saved = resolve_config("tiny", sets=["train.max_iters=100"]).to_dict()
    longer = resolve_config("tiny", sets=["train.max_iters=150"])
    assert "keeps its cosine decay to step 100" in keep_decay_horizon(longer, saved)
    assert longer.train.lr_decay_iters == 100
    explicit = resolve_config("tiny", sets=["train.max_iters=150", "train.lr_decay_iters=150"])
    assert "now ends at step 150" in keep_decay_horizon(explicit, saved)
    assert explicit.train.lr_decay_iters == 150
    same = resolve_config("tiny", sets=["train.max_iters=100"])
    assert keep_decay_horizon(same, saved) is None and same.train.lr_decay_iters == 0
