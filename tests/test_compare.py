"""The leaderboard over runs: values worked out by hand, interpolation, ties, incomparable data, torn
files, non-runs, and reading checkpoint metadata without loading (or running) anything."""

from __future__ import annotations

import json
import pickle
import zipfile

import pytest
import torch
from compare_helpers import eval_record, log_record, three_runs, write_data_meta, write_run

from moegpt.checkpoint import CheckpointManager
from moegpt.checkpoint_peek import peek_checkpoint
from moegpt.compare import interpolate, leaderboard
from moegpt.config import RunConfig
from moegpt.model import GPT
from moegpt.moe import VARIANTS
from moegpt.presets import resolve_config
from moegpt.run_metrics import params_from_config, read_metrics, read_run, read_runs


def rows_by_name(board):
    return {row["run"]: row for row in board["rows"]}


def test_interpolate_is_piecewise_linear_inside_the_points_only():
    xs, ys = [10, 20, 40], [3.0, 2.0, 1.0]
    assert interpolate(xs, ys, 10) == 3.0
    assert interpolate(xs, ys, 15) == pytest.approx(2.5)
    assert interpolate(xs, ys, 30) == pytest.approx(1.5)
    assert interpolate(xs, ys, 40) == 1.0
    assert interpolate(xs, ys, 9.9) is None and interpolate(xs, ys, 40.1) is None
    assert interpolate([5], [2.0], 5) == 2.0 and interpolate([], [], 1) is None


def test_leaderboard_of_three_runs_matches_hand_computed_values(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    found, warnings = read_runs([], runs_root)
    assert warnings == [] and sorted(r.name for r in found) == ["dense", "switch", "topk"]
    board = leaderboard(found, sort="equal-steps")
    assert [g["equal_step"] for g in board["groups"]] == [25]  # switch's last evaluation
    assert board["groups"][0]["equal_train_s"] == 3.0  # dense's last evaluation (switch: 3.5, topk: 8.0)
    assert [row["run"] for row in board["rows"]] == ["topk", "switch", "dense"]
    assert [row["rank"] for row in board["rows"]] == [1, 2, 3] and not any(r["tied"] for r in board["rows"])
    rows = rows_by_name(board)
    # equal steps = 25: dense between (20, 2.5) and (30, 2.2); topk between (20, 2.4) and (30, 2.0)
    assert rows["dense"]["val_ce_at_equal_steps"] == pytest.approx(2.35)
    assert rows["topk"]["val_ce_at_equal_steps"] == pytest.approx(2.2)
    assert rows["switch"]["val_ce_at_equal_steps"] == pytest.approx(2.3)
    # equal time = 3.0 s: topk between (2.0 s, 2.9) and (4.0 s, 2.4); switch between (1.5 s, 2.95) and (3.5 s, 2.3)
    assert rows["dense"]["val_ce_at_equal_time"] == pytest.approx(2.2)
    assert rows["topk"]["val_ce_at_equal_time"] == pytest.approx(2.65)
    assert rows["switch"]["val_ce_at_equal_time"] == pytest.approx(2.4625)
    assert (rows["topk"]["best_val_ce"], rows["topk"]["final_val_ce"], rows["topk"]["steps"]) == (1.9, 1.9, 40)
    assert rows["topk"]["tokens"] == 4000 and rows["topk"]["tokens_per_s"] == pytest.approx(500.0)
    assert rows["switch"]["tokens_per_s"] == pytest.approx(2500 / 3.5)
    assert (rows["switch"]["max_mean_load"], rows["switch"]["drop_frac"]) == (1.8, pytest.approx(0.2))
    assert (rows["topk"]["max_mean_load"], rows["topk"]["drop_frac"]) == (2.5, 0.0)
    assert rows["dense"]["max_mean_load"] is None and rows["dense"]["n_expert"] is None
    assert (rows["switch"]["n_expert"], rows["switch"]["experts_per_token"]) == (4, 1.0)
    assert (rows["dense"]["train_s"], rows["dense"]["wall_s"]) == (3.0, 3.5)
    assert rows["topk"]["best_in"] == ["best_val_ce", "final_val_ce", "val_ce_at_equal_steps", "drop_frac"]
    assert rows["dense"]["best_in"] == ["val_ce_at_equal_time", "tokens_per_s", "wall_s"]
    assert rows["switch"]["best_in"] == ["max_mean_load"]
    json.dumps(board)  # the CLI's --format json is this object


def test_params_come_from_the_config_without_weights(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    for run in read_runs([], runs_root)[0]:
        cfg = RunConfig.load(run.path / "config.toml")
        assert run.params == GPT(cfg.model, cfg.moe).num_params()  # meta device agrees with a real build


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_device_counts_match_a_real_build(variant):
    cfg = resolve_config("tiny", sets=[f"moe.variant={variant}"])
    assert params_from_config(cfg) == GPT(cfg.model, cfg.moe).num_params()


def test_sort_keys_and_ties(tmp_path):
    runs_root, data_root = three_runs(tmp_path)
    board = leaderboard(read_runs([], runs_root)[0], sort="equal-time")
    assert [row["run"] for row in board["rows"]] == ["dense", "switch", "topk"]
    records = [log_record(10, 1.0, 3.0), eval_record(10, 1.0, 2.35004, 2.35004),
               log_record(30, 3.0, 2.0), eval_record(30, 3.0, 2.35004, 2.35004)]
    write_run(runs_root, "twin", "dense", records, data_root)
    rows = rows_by_name(leaderboard(read_runs([], runs_root)[0], sort="equal-steps"))
    # dense 2.35 and twin 2.35004 are equal at the 4 decimals shown: both rank 3 (after topk 2.2 and
    # switch 2.3), marked tied; a fifth run would rank 5
    assert [rows[n]["rank"] for n in ("topk", "switch", "dense", "twin")] == [1, 2, 3, 3]
    assert rows["dense"]["tied"] and rows["twin"]["tied"] and not rows["topk"]["tied"]


def test_runs_on_other_data_or_tokenizer_are_ranked_separately(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    other_data = tmp_path / "other-data"
    write_data_meta(other_data, source="x" * 64)
    write_data_meta(other_data, name="bpe", tokenizer="u" * 64, kind="bpe")
    records = [log_record(10, 0.5, 1.5), eval_record(10, 0.5, 1.0, 1.0)]
    write_run(runs_root, "elsewhere", "topk", records, other_data)  # other text, same tokenizer
    write_run(runs_root, "bpe", "topk", records, other_data, data_name="bpe")  # other tokenizer
    board = leaderboard(read_runs([], runs_root)[0])
    assert [(g["id"], g["runs"]) for g in board["groups"]] == [("A", 3), ("B", 1), ("C", 1)]
    rows = rows_by_name(board)
    assert {rows[n]["group"] for n in ("dense", "topk", "switch")} == {"A"}
    assert rows["elsewhere"]["rank"] == 1 and rows["bpe"]["rank"] == 1 and rows["topk"]["rank"] == 1
    # its 1.0 is not the best of group A, and A's equal step is still 25
    assert rows["topk"]["best_in"][:2] == ["best_val_ce", "final_val_ce"] and board["groups"][0]["equal_step"] == 25


def test_torn_last_line_is_ignored_and_bad_lines_skipped(tmp_path):
    runs_root, data_root = three_runs(tmp_path)
    run = runs_root / "dense"
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text("not json\n" + text + '{"step": 40, "tokens": 4000, "val_ce": 1.0')
    logs, evals, skipped, torn = read_metrics(run / "metrics.jsonl")
    assert (len(logs), len(evals), skipped, torn) == (3, 3, 1, True)
    row = rows_by_name(leaderboard(read_runs([], runs_root)[0]))["dense"]
    assert (row["steps"], row["final_val_ce"]) == (30, 2.2)
    assert any("incomplete" in note for note in row["notes"]) and any("1 unreadable" in n for n in row["notes"])


def test_runs_without_train_s_have_no_equal_time(tmp_path):
    runs_root, _ = three_runs(tmp_path, timed=False)
    board = leaderboard(read_runs([], runs_root)[0], sort="equal-time")
    assert board["groups"][0]["equal_train_s"] is None
    for row in board["rows"]:
        assert row["val_ce_at_equal_time"] is None and row["rank"] is None and row["wall_s"] is None
        assert any("equal-time unavailable" in note for note in row["notes"])
    # speed falls back to the mean of the logged windows
    assert rows_by_name(board)["dense"]["tokens_per_s"] == pytest.approx((500 + 750 + 250) / 3)


def test_non_runs_are_named_and_skipped(tmp_path):
    runs_root, _ = three_runs(tmp_path)
    (runs_root / "empty").mkdir()
    (runs_root / "fresh").mkdir()
    (runs_root / "fresh" / "config.toml").write_text((runs_root / "dense" / "config.toml").read_text())
    (runs_root / "fresh" / "metrics.jsonl").write_text('{"step": 5, "tok')  # only a torn line
    (runs_root / "notes.txt").write_text("not a folder")
    found, warnings = read_runs([], runs_root)
    assert sorted(r.name for r in found) == ["dense", "switch", "topk"]
    assert warnings == [f"{runs_root / 'empty'} is not a run (no config.toml); skipped",
                        f"{runs_root / 'fresh'}: metrics.jsonl holds no complete record yet; skipped"]
    found, warnings = read_runs([str(runs_root / "t*"), str(runs_root / "nothing*"), str(runs_root / "notes.txt")])
    assert [r.name for r in found] == ["topk"]
    assert warnings[0].endswith("nothing* matches nothing") and "is not a folder" in warnings[1]


def _checkpoint_state(data_ref):
    return {"model": {"w": torch.ones(3, 2)}, "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}},
            "step": 7, "data_ref": data_ref, "timing": {"train_s": 1.5, "wall_s": 2.0}}


def test_peek_reads_metadata_without_tensors(tmp_path):
    ref = {"data_dir": str(tmp_path / "d"), "name": "tiny", "fingerprint": "f" * 64}
    path = CheckpointManager(tmp_path / "run").save(7, _checkpoint_state(ref))
    assert peek_checkpoint(path) == {"step": 7, "data_ref": ref, "timing": {"train_s": 1.5, "wall_s": 2.0}}
    assert peek_checkpoint(path, keys=("model",)) == {"model": {"w": None}}  # tensors are never read
    path.write_bytes(path.read_bytes()[:200])
    assert peek_checkpoint(path) == {} and peek_checkpoint(tmp_path / "missing.pt") == {}


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch " + str(_RunsCode.marker),))


def test_peek_never_runs_code_from_the_file(tmp_path):
    _RunsCode.marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"step": 1, "data_ref": _RunsCode()}))
    assert peek_checkpoint(evil) == {"step": 1, "data_ref": None}
    assert not _RunsCode.marker.exists()


def test_data_identity_comes_from_the_checkpoint_reference(tmp_path):
    runs_root, data_root = three_runs(tmp_path)
    moved = write_data_meta(tmp_path / "moved", source="m" * 64)
    ref = {"data_dir": str(moved), "name": "tiny", "fingerprint": "q" * 64}
    CheckpointManager(runs_root / "topk").save(40, _checkpoint_state(ref))
    run = read_run(runs_root / "topk")
    assert run.data.source_sha256 == "q" * 64 and run.data.tokenizer == "char:" + "t" * 12
    assert len(leaderboard(read_runs([], runs_root)[0])["groups"]) == 2  # its text differs from the others'


def test_equal_time_before_a_runs_first_evaluation_is_empty_and_explained(tmp_path):
    runs_root, data_root = three_runs(tmp_path)
    write_run(runs_root, "late", "topk", [log_record(10, 5.0, 2.0), eval_record(10, 5.0, 1.5, 1.5)], data_root)
    board = leaderboard(read_runs([], runs_root)[0])
    row = rows_by_name(board)["late"]
    assert board["groups"][0]["equal_step"] == 10 and row["val_ce_at_equal_steps"] == 1.5
    assert board["groups"][0]["equal_train_s"] == 3.0 and row["val_ce_at_equal_time"] is None
    assert any("first evaluated after 5 s" in note for note in row["notes"])


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    runs_root, _ = three_runs(tmp_path / "a")
    other_root, _ = three_runs(tmp_path / "b")
    found, _ = read_runs([str(runs_root / "topk"), str(other_root / "topk"), str(runs_root / "dense")])
    assert [run.name for run in found] == [str(runs_root / "topk"), str(other_root / "topk"), "dense"]
