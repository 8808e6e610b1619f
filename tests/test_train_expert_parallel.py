"""`moegpt train --expert-parallel P`: refusals in one process, and torchrun runs (gloo) whose metrics,
checkpoints and resumes at another P match a one-process run on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, free_port
from typer.testing import CliRunner

from moegpt.checkpoint import load_checkpoint, resolve_checkpoint
from moegpt.cli.main import app
from moegpt.errors import MoegptError
from moegpt.parallel import check_expert_parallel_run
from moegpt.presets import resolve_config

runner = CliRunner()
# switch: capacity drops on the global batch go through the trainer too
RUN_FLAGS = ("--moe", "switch", "--batch-size", "8", "--max-iters", "6", "--log-interval", "1", "--eval-interval", "3",
             "--ckpt-interval", "3", "--device", "cpu", "--seed", "7")


def base_args(data_root: Path, runs_root: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(data_root),
            "--set", f"train.runs_root={runs_root}", *extra]


@pytest.mark.parametrize("args, fragment", [
    (["--moe", "soft"], "variant 'soft'"), (["--moe", "expert-choice"], "variant 'expert-choice'"),
    (["--moe", "basic"], "variant 'basic'"), (["--moe", "dense"], "variant 'dense'"),
    (["--n-expert", "3"], "n_expert (3) is not divisible"),
    ([], "does not divide the number of processes (1)"),
])
def test_bad_expert_parallel_config_is_one_line_before_data(tmp_path, args, fragment):
    # --data names a folder that does not exist: the refusal must come before any data is read
    result = runner.invoke(app, base_args(tmp_path / "no-data", tmp_path / "runs", "--expert-parallel", "2", *args))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists()


def test_expert_parallel_below_one_refused(tmp_path):
    result = runner.invoke(app, base_args(tmp_path, tmp_path / "runs", "--expert-parallel", "0"))
    assert_one_line_error(result, "train.expert_parallel")


def test_global_batch_must_split_over_processes():
    cfg = resolve_config("tiny", sets=["train.expert_parallel=2", "train.batch_size=5"])
    with pytest.raises(MoegptError, match="divisible by the number of processes"):
        check_expert_parallel_run(cfg, world_size=2)
    check_expert_parallel_run(resolve_config("tiny", sets=["train.expert_parallel=2"]), world_size=4)


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "moegpt.cli", *args, "--expert-parallel", "2"]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOEGPT_FAULT")}
    full_env.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=300)


def _metrics(run: Path) -> dict[tuple[int, bool], dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], "val_ce" in r): r for r in records}


def _assert_same_records(a: dict, b: dict, steps: range) -> None:
    keys = [k for k in a if k[0] in steps]
    assert keys and all(k in b for k in keys)
    for key in keys:
        for name, value in a[key].items():
            if name in ("tokens_per_s", "train_s", "wall_s"):  # timings, not results
                continue
            if name == "layers":
                for la, lb in zip(value, b[key][name], strict=True):
                    assert la == pytest.approx(lb, abs=2e-4), (key, la, lb)  # rounded to 4 places
            else:
                assert value == pytest.approx(b[key][name], abs=2e-5), (key, name, value, b[key][name])


def _max_weight_diff(a: Path, b: Path) -> float:
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _copy_through_step(src: Path, dst: Path, step: int) -> None:
    shutil.copytree(src, dst)
    for ckpt in (dst / "ckpt").glob("*.pt"):
        if ckpt.name != f"step_{step:06d}.pt":
            ckpt.unlink()


@pytest.mark.slow
def test_expert_parallel_run_matches_one_process_and_resumes_at_other_p(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    one = runner.invoke(app, base_args(tiny_data, runs, *RUN_FLAGS, "--name", "one"))
    assert one.exit_code == 0, one.output
    two = _torchrun(base_args(tiny_data, runs, *RUN_FLAGS, "--name", "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "ranks in sync" in two.stdout
    _assert_same_records(_metrics(runs / "one"), _metrics(runs / "two"), range(1, 7))
    assert _max_weight_diff(runs / "one" / "ckpt" / "step_000006.pt", runs / "two" / "ckpt" / "step_000006.pt") <= 1e-5

    # the file holds every expert: one process samples and inspects it as it is
    sampled = runner.invoke(app, ["sample", str(runs / "two"), "--prompt", "for ", "--max-new-tokens", "4"])
    assert sampled.exit_code == 0, sampled.output
    assert runner.invoke(app, ["inspect-routing", str(runs / "two"), "--tokens", "256"]).exit_code == 0

    # P=2 -> P=1: resume two's step-3 checkpoint in one process and land on one's step 6
    _copy_through_step(runs / "two", runs / "down", step=3)
    down = runner.invoke(app, base_args(tiny_data, runs, *RUN_FLAGS, "--name", "down", "--resume"))
    assert down.exit_code == 0, down.output
    _assert_same_records(_metrics(runs / "one"), _metrics(runs / "down"), range(4, 7))
    assert _max_weight_diff(runs / "one" / "ckpt" / "step_000006.pt", runs / "down" / "ckpt" / "step_000006.pt") <= 1e-5

    # P=1 -> P=2, with rank 0 killed while writing the step-6 checkpoint: the steps before it follow one's
    # trajectory, and the half-written file never appears (step 3 stays the newest, intact, checkpoint)
    _copy_through_step(runs / "one", runs / "up", step=3)
    up = _torchrun(base_args(tiny_data, runs, *RUN_FLAGS, "--name", "up", "--resume"),
                   MOEGPT_FAULT_KILL_DURING_CKPT="1")
    assert up.returncode != 0 and "SIGKILL" in up.stderr, up.stderr[-2000:]
    _assert_same_records(_metrics(runs / "one"), _metrics(runs / "up"), range(4, 7))
    assert not (runs / "up" / "ckpt" / "step_000006.pt").exists()
    newest = resolve_checkpoint(runs / "up")
    assert load_checkpoint(newest)["step"] == 3 and all(torch.isfinite(v).all() for v in
                                                        load_checkpoint(newest)["model"].values())
