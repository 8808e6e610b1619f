"""The run folder (moegpt/run_dir.py): naming, refusal to overwrite, metrics cut back on resume."""

from __future__ import annotations

import json

import pytest

from moegpt.config import RunConfig, TrainConfig
from moegpt.errors import MoegptError
from moegpt.run_dir import has_checkpoints, resolve_run_dir, truncate_metrics


def test_unnamed_runs_take_the_variant_and_never_reuse_a_folder(tmp_path):
    cfg = RunConfig(train=TrainConfig(runs_root=str(tmp_path)))
    assert resolve_run_dir(cfg, "no") == tmp_path / "topk"
    (tmp_path / "topk").mkdir()
    (tmp_path / "topk" / "metrics.jsonl").write_text("{}\n")
    assert resolve_run_dir(cfg, "no") == tmp_path / "topk-2"
    assert resolve_run_dir(cfg, "yes") == tmp_path / "topk"  # a resume continues the variant's folder


def test_a_named_run_with_checkpoints_needs_resume(tmp_path):
    cfg = RunConfig(train=TrainConfig(runs_root=str(tmp_path), name="mine"))
    (tmp_path / "mine" / "ckpt").mkdir(parents=True)
    (tmp_path / "mine" / "ckpt" / "step_000001.pt").write_bytes(b"x")
    assert has_checkpoints(tmp_path / "mine")
    with pytest.raises(MoegptError, match="already has checkpoints"):
        resolve_run_dir(cfg, "no")
    assert resolve_run_dir(cfg, "yes") == tmp_path / "mine"


def test_truncate_keeps_records_through_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    truncate_metrics(path, keep_through_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    truncate_metrics(path, keep_through_step=0)
    assert not path.exists()
