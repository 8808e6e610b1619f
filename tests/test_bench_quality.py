"""`moegpt bench quality`: named cases (`--case NAME:section.key=value,...`) over the preset and the common
`--set`s, checked before anything trains, and val CE at equal steps and equal time minus the first case's.

Most tests swap the trainer for a stand-in that records the configs it is given and reports made-up
evaluation curves: what reaches training, and what the table makes of the curves, without training.
"""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.bench_quality import (
    CaseError,
    differences_to_first,
    equal_time_val_ce,
    parse_case,
    parse_cases,
    quality_columns,
)
from moegpt.cli.main import app

runner = CliRunner()


class RecordingTrainer:
    """Stands in for moegpt.train.Trainer: keeps each config, evaluates at every eval_interval with a made-up
    val CE of 3 - 0.1 * top_k (dense: 3.0) after `seconds_per_step` * top_k of training per step."""

    trained: list = []
    seconds_per_step = 0.5

    def __init__(self, cfg, on_event=None, **_):
        self.cfg, self.on_event = cfg, on_event

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        RecordingTrainer.trained.append(cfg)
        k = 0 if cfg.moe.variant == "dense" else cfg.moe.top_k
        final = 3.0 - 0.1 * k
        for step in range(t.eval_interval, t.max_iters + 1, t.eval_interval):
            self.on_event("log", {"step": step, "loss_ce": 4.0, "tokens_per_s": 100.0,
                                  "layers": [{"max_mean_load": 1.5}] if k else []})
            self.on_event("eval", {"step": step, "train_s": step * self.seconds_per_step * (1 + k),
                                   "val_ce": final + (t.max_iters - step) * 0.01})
        return {"final_val_ce": final, "tokens_per_s": 100.0, "wall_s": 1.0, "params": {"active": 10, "total": 10}}


@pytest.fixture
def recording_trainer(monkeypatch):
    RecordingTrainer.trained = []
    monkeypatch.setattr("moegpt.train.Trainer", RecordingTrainer)
    return RecordingTrainer


def quality(*args: str):
    return runner.invoke(app, ["bench", "quality", "--preset", "tiny", "--steps", "4", "--evals", "2", *args])


def quality_json(*args: str) -> dict:
    result = quality(*args, "--format", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_parse_case_splits_name_and_assignments():
    assert parse_case("e8k1:moe.top_k=1, moe.expert_hidden=512") == ("e8k1", ["moe.top_k=1", "moe.expert_hidden=512"])
    assert parse_case("base:") == ("base", [])
    assert parse_case("k2:train.name=a=b") == ("k2", ["train.name=a=b"])
    assert list(parse_cases(["b:moe.top_k=1", "a:"])) == ["b", "a"]  # order kept: the first is the baseline


@pytest.mark.parametrize("text", ["e8k1", ":moe.top_k=1", "moe.top_k=1", "a b:moe.top_k=1", "a:moe.top_k=1,"])
def test_parse_case_rejects_bad_syntax(text):
    with pytest.raises(CaseError):
        parse_case(text)


def test_cases_reach_the_trained_configs_over_the_common_sets(recording_trainer):
    out = quality_json("--set", "moe.n_expert=8", "--set", "train.lr=0.005",
                       "--case", "dense:moe.variant=dense",
                       "--case", "e8k1:moe.top_k=1,moe.expert_hidden=64",
                       "--case", "shared8k4:moe.variant=shared,moe.top_k=4")
    trained = {cfg.train.name: cfg for cfg in recording_trainer.trained}
    assert list(trained) == ["dense", "e8k1", "shared8k4"]
    assert trained["dense"].moe.variant == "dense"
    e8k1 = trained["e8k1"].moe
    assert (e8k1.variant, e8k1.top_k, e8k1.expert_hidden) == ("topk", 1, 64)
    assert (trained["shared8k4"].moe.variant, trained["shared8k4"].moe.top_k) == ("shared", 4)
    for cfg in trained.values():  # the common --set, and the same schedule, data and seed for every case
        assert cfg.moe.n_expert == 8 and cfg.train.lr == 0.005
        assert (cfg.train.max_iters, cfg.train.eval_interval, cfg.train.seed) == (4, 2, 1337)
    rows = {row["case"]: row for row in out["rows"]}
    assert rows["e8k1"]["overrides"] == ["moe.top_k=1", "moe.expert_hidden=64"]
    assert rows["shared8k4"]["overrides"] == ["moe.variant=shared", "moe.top_k=4"]
    assert [row["variant"] for row in out["rows"]] == ["dense", "topk", "shared"]


def test_differences_are_to_the_first_case_at_equal_steps_and_equal_time(recording_trainer):
    # val CE at step 4 (equal steps): 3 - 0.1 k; at step 2: 0.02 higher. Training takes 0.5 (1 + k) s a step,
    # so dense (4 steps in 2 s) sets the budget: top-1 reached step 2 at 2 s, top-2 only at 3 s.
    out = quality_json("--case", "k1:moe.top_k=1", "--case", "dense:moe.variant=dense", "--case", "k2:")
    rows = {row["case"]: row for row in out["rows"]}
    assert out["equal_time_s"] == 2.0 and out["equal_time_case"] == "dense"
    assert [rows[c]["val_ce"] for c in ("k1", "dense", "k2")] == [2.9, 3.0, 2.8]
    assert [rows[c]["val_ce_minus_first"] for c in ("k1", "dense", "k2")] == [0.0, 0.1, -0.1]
    assert [rows[c]["val_ce_at_equal_time"] for c in ("k1", "dense", "k2")] == [2.92, 3.0, None]
    assert [rows[c]["val_ce_at_equal_time_minus_first"] for c in ("k1", "dense", "k2")] == [0.0, 0.08, None]


def test_variants_are_cases_named_after_them(recording_trainer):
    out = quality_json("--variants", "topk,dense")
    assert [(row["case"], row["variant"], row["overrides"]) for row in out["rows"]] == [
        ("topk", "topk", ["moe.variant=topk"]), ("dense", "dense", ["moe.variant=dense"])]
    assert out["rows"][0]["val_ce_minus_first"] == 0.0 and out["rows"][1]["val_ce_minus_first"] == 0.2  # top-2 first


def test_table_shows_cases_differences_and_the_time_budget(recording_trainer):
    result = quality("--case", "dense:moe.variant=dense", "--case", "k1:moe.top_k=1")
    assert result.exit_code == 0, result.output
    assert "equal time: 2.0 s of training, dense's" in result.stdout
    assert "minus" in result.stdout and "-0.1" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert "k1: step 4 val_ce 2.9000" in result.stderr  # progress names the case


@pytest.mark.parametrize("args,fragments", [
    (["--case", "a:moe.top_k"], ["--case", "case 'a'", "section.key=value"]),
    (["--case", "a:moe.topk=1"], ["--case", "case 'a'", "unknown key 'moe.topk'"]),
    (["--case", "a:moe.top_k=x"], ["case 'a'", "moe.top_k must be of type int"]),
    (["--case", "moe.top_k=1"], ["--case", "NAME:section.key=value"]),
    (["--case", "a:moe.top_k=1", "--case", "a:moe.top_k=2"], ["--case", "duplicate case name 'a'"]),
    (["--case", "a:moe.top_k=1", "--variants", "dense"], ["--case and --variants"]),
    (["--case", "ok:moe.top_k=1", "--case", "big:moe.top_k=9"], ["case 'big'", "moe.top_k must be in"]),
    (["--case", "ok:", "--case", "seeded:train.seed=3"], ["case 'seeded'", "train.seed", "every case shares"]),
    (["--case", "a:moe.variant=nope"], ["case 'a'", "unknown MoE variant 'nope'"]),
    (["--set", "moe.nope=1", "--case", "a:"], ["unknown key 'moe.nope' in --set"]),
])
def test_bad_cases_are_one_line_errors_before_anything_trains(recording_trainer, args, fragments):
    assert_one_line_error(quality(*args), *fragments)
    assert recording_trainer.trained == []


def test_common_sets_are_validated_only_as_part_of_each_case(recording_trainer):
    # top_k=8 alone exceeds the tiny preset's 4 experts; every case makes it valid again
    out = quality_json("--set", "moe.top_k=8", "--case", "e8:moe.n_expert=8", "--case", "e16:moe.n_expert=16")
    assert [cfg.moe.n_expert for cfg in recording_trainer.trained] == [8, 16]
    assert [row["case"] for row in out["rows"]] == ["e8", "e16"]


def test_differences_to_first():
    assert differences_to_first([3.0, 2.9, 3.25, None]) == [0.0, -0.1, 0.25, None]
    assert differences_to_first([None, 2.0]) == [None, None]


def test_quality_columns_compare_every_case_to_the_first_at_equal_steps_and_time():
    first = [(1.0, 4.0), (3.0, 3.0)]
    faster = [(0.5, 3.8), (2.0, 2.6)]  # sets the 2.0 s budget
    slower = [(1.5, 4.4), (4.5, 2.4)]  # at 2.0 s: a sixth of the way from 4.4 to 2.4
    columns = quality_columns([3.0, 2.6, 2.4], [first, faster, slower])
    assert columns["equal_time_s"] == 2.0 and columns["budget_case"] == 1
    assert [row["val_ce_minus_first"] for row in columns["rows"]] == [0.0, -0.4, -0.6]
    assert [row["val_ce_at_equal_time"] for row in columns["rows"]] == [3.5, 2.6, 4.0667]
    assert [row["val_ce_at_equal_time_minus_first"] for row in columns["rows"]] == [0.0, -0.9, 0.5667]


def test_equal_time_val_ce_interpolates_each_curve_at_the_shortest_runs_end():
    fast = [(1.0, 4.0), (2.0, 3.0)]
    slow = [(1.5, 4.5), (3.5, 2.5)]  # at 2.0 s: a quarter of the way from 4.5 to 2.5
    late = [(2.5, 3.9), (5.0, 2.0)]  # first evaluated after the budget: no value
    budget, values = equal_time_val_ce([fast, slow, late])
    assert budget == 2.0
    assert values == [3.0, 4.0, None]


def test_bench_quality_json(tiny_data):
    out = quality_json("--steps", "2", "--variants", "dense,topk",
                       "--set", f"data.data_root={tiny_data}", "--set", "data.name=tiny")
    rows = {row["variant"]: row for row in out["rows"]}
    assert set(rows) == {"dense", "topk"}
    assert rows["dense"]["max_mean_load"] is None and rows["topk"]["max_mean_load"] >= 1.0
    assert all(row["val_ce"] > 0 for row in rows.values())
    # the run that finished training first set the budget: its equal-time value is its last evaluation
    # (named by the result: train_s is rounded, so two runs can tie in it)
    first = rows[out["equal_time_case"]]
    assert out["equal_time_s"] == first["train_s"] == min(row["train_s"] for row in rows.values())
    assert abs(first["val_ce_at_equal_time"] - first["val_ce"]) <= 1e-4
    assert all(row["val_ce_at_equal_time"] is None or row["val_ce_at_equal_time"] > 0 for row in rows.values())


def test_bench_quality_trains_named_cases(tiny_data):
    out = quality_json("--steps", "2", "--set", f"data.data_root={tiny_data}", "--set", "data.name=tiny",
                       "--case", "dense:moe.variant=dense", "--case", "e4k1:moe.top_k=1,moe.expert_hidden=16")
    dense, e4k1 = out["rows"]
    assert (dense["case"], dense["variant"], e4k1["case"], e4k1["variant"]) == ("dense", "dense", "e4k1", "topk")
    assert e4k1["overrides"] == ["moe.top_k=1", "moe.expert_hidden=16"] and e4k1["max_mean_load"] >= 1.0
    assert e4k1["active_params"] < dense["active_params"]  # one narrow expert instead of the dense FFN
    assert dense["val_ce_minus_first"] == 0.0
    assert e4k1["val_ce_minus_first"] == pytest.approx(e4k1["val_ce"] - dense["val_ce"], abs=1e-4)
