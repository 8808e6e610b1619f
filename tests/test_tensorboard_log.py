"""`moegpt train --log tensorboard`: events mirror metrics.jsonl; a clear error without the package."""

from __future__ import annotations

import json
import sys

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.errors import MoegptError
from moegpt.tensorboard_log import TensorBoardLogger

runner = CliRunner()


def train_args(tiny_data, runs, *extra):
    return ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(tiny_data),
            "--set", f"train.runs_root={runs}", *extra]


def read_events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_logger_writes_scalars_and_layer_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    log = {"step": 5, "tokens": 640, "loss_ce": 3.25, "train_s": 0.5,
           "layers": [{"layer": 0, "max_mean_load": 1.5, "drop_frac": 0.0},
                      {"layer": 2, "max_mean_load": 2.5, "drop_frac": 0.25}]}
    logger = TensorBoardLogger()
    logger("start", {"run_dir": str(tmp_path), "start_step": 0})
    logger("log", log)
    logger("eval", {"step": 5, "tokens": 640, "val_ce": 3.0, "best_val_ce": 3.0})
    logger("end", {})
    events = read_events(tmp_path / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("train/loss_ce")] == [(5, 3.25)]
    assert [e.value for e in events.Scalars("train/tokens")] == [640.0]
    assert [e.value for e in events.Scalars("layer2/max_mean_load")] == [2.5]
    assert [e.value for e in events.Scalars("val/val_ce")] == [3.0]
    histogram = events.Histograms("load/max_mean_load")[0].histogram_value
    assert (histogram.num, histogram.min, histogram.max, histogram.sum) == (2, 1.5, 2.5, 4.0)


def test_train_logs_to_tensorboard_under_the_run(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    result = runner.invoke(app, train_args(tiny_data, tmp_path, "--name", "tb", "--max-iters", "10",
                                           "--log", "tensorboard"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["loss_ce"]) for r in records if "loss_ce" in r]
    events = read_events(tmp_path / "tb" / "tensorboard")
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("train/loss_ce")] == logged
    assert [e.step for e in events.Scalars("val/val_ce")] == [r["step"] for r in records if "val_ce" in r]


def test_missing_tensorboard_is_one_line_with_the_install_command(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    result = runner.invoke(app, train_args(tiny_data, tmp_path, "--name", "x", "--log", "tensorboard"))
    assert_one_line_error(result, "pip install 'moegpt[tb]'")
    assert not (tmp_path / "x").exists()
    with pytest.raises(MoegptError, match="tensorboard package"):
        TensorBoardLogger()
    assert_one_line_error(runner.invoke(app, train_args(tiny_data, tmp_path, "--log", "wandb")), "only tensorboard")
