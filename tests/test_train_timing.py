"""Training time in metrics records: train_s excludes evaluation, wall_s does not, both survive resume."""

from __future__ import annotations

import json

import pytest

import moegpt.train as train_module
from moegpt.checkpoint import load_checkpoint
from moegpt.presets import resolve_config
from moegpt.train import Trainer

EVAL_COST = 1000.0  # fake seconds one evaluation takes


def tiny_cfg(tiny_data, runs, **train):
    sets = [f"train.runs_root={runs}", f"data.data_root={tiny_data}", "data.name=tiny"]
    return resolve_config("tiny", sets=sets + [f"train.{k}={v}" for k, v in train.items()])


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def fake_clock(monkeypatch):
    """perf_counter advances 1 ms per call, and each evaluation costs EVAL_COST: no real time involved."""
    now = [0.0]

    def perf_counter() -> float:
        now[0] += 0.001
        return now[0]

    real_evaluate = Trainer.evaluate

    def slow_evaluate(self, model, ds):
        now[0] += EVAL_COST
        return real_evaluate(self, model, ds)

    monkeypatch.setattr(train_module.time, "perf_counter", perf_counter)
    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    return now


def test_train_s_excludes_evaluation_and_wall_s_includes_it(tiny_data, tmp_path, fake_clock, single_thread):
    common = dict(max_iters=8, eval_interval=4, log_interval=2, ckpt_interval=4)
    Trainer(tiny_cfg(tiny_data, tmp_path, name="t", **common)).run()
    recs = records(tmp_path / "t")
    assert all("train_s" in r and "wall_s" in r for r in recs)
    train_s = [r["train_s"] for r in recs]
    assert train_s == sorted(train_s) and train_s[-1] < EVAL_COST  # the two evaluations are not in it
    evals = [r for r in recs if "val_ce" in r]
    assert [r["wall_s"] > (i + 1) * EVAL_COST for i, r in enumerate(evals)] == [True, True]
    logs = {r["step"]: r["train_s"] for r in recs if "loss_ce" in r}
    assert all(r["train_s"] == logs[r["step"]] for r in evals)  # evaluating adds no training time


def test_timing_is_carried_across_resume(tiny_data, tmp_path, fake_clock, single_thread):
    common = dict(max_iters=4, eval_interval=4, log_interval=2, ckpt_interval=4)
    cfg = tiny_cfg(tiny_data, tmp_path, name="r", **common)
    Trainer(cfg).run()
    saved = load_checkpoint(tmp_path / "r" / "ckpt" / "step_000004.pt")["timing"]
    assert saved["train_s"] == pytest.approx(records(tmp_path / "r")[-1]["train_s"], abs=1e-3)
    assert saved["wall_s"] > EVAL_COST
    cfg.train.max_iters = 8
    Trainer(cfg, resume="yes").run()
    resumed = [r for r in records(tmp_path / "r") if r["step"] > 4]
    assert resumed and all(r["train_s"] > saved["train_s"] and r["wall_s"] > saved["wall_s"] for r in resumed)
