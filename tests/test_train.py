"""Training: end-to-end runs (CliRunner and real subprocesses), config precedence, exact resume,
signals, faults, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_one_line_error, free_port
from typer.testing import CliRunner

from moegpt.checkpoint import load_checkpoint, resolve_checkpoint
from moegpt.cli.main import app
from moegpt.optim import lr_at
from moegpt.presets import resolve_config
from moegpt.train import Trainer

runner = CliRunner()


def base_args(data_root: Path, runs_root: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(data_root),
            "--set", f"train.runs_root={runs_root}", *extra]


def tiny_cfg(data_root: Path, runs_root: Path, **train):
    sets = [f"train.runs_root={runs_root}", f"data.data_root={data_root}", "data.name=tiny"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return resolve_config("tiny", sets=sets)




def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEGPT_FAULT")}
    env.update(extra)
    return env


def test_train_cli_end_to_end_writes_run(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, base_args(tiny_data, runs, "--name", "e2e", "--max-iters", "6",
                                          "--log-interval", "2", "--eval-interval", "3", "--ckpt-interval", "3"))
    assert result.exit_code == 0, result.output
    run = runs / "e2e"
    assert (run / "config.toml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "loss_ce" in r]
    evals = [r for r in records if "val_ce" in r]
    assert [r["step"] for r in logs] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    for key in ("tokens", "lr", "loss", "balance", "z", "grad_norm", "tokens_per_s", "layers"):
        assert key in logs[-1]
    assert {"layer", "max_mean_load", "drop_frac", "router_entropy", "balance"} <= set(logs[-1]["layers"][0])
    assert (run / "ckpt" / "step_000006.pt").is_file() and (run / "ckpt" / "best.pt").is_file()
    state = load_checkpoint(resolve_checkpoint(run))
    assert state["config"]["moe"]["variant"] == "topk" and state["data_ref"]["name"] == "tiny"
    assert "training summary" in result.output and "best val CE" in result.output


def test_saved_config_reproduces_run(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, base_args(tiny_data, runs, "--name", "a", "--max-iters", "3",
                                        "--n-layer", "3")).exit_code == 0
    result = runner.invoke(app, ["train", "--config", str(runs / "a" / "config.toml"), "--name", "b"])
    assert result.exit_code == 0, result.output
    a = load_checkpoint(resolve_checkpoint(runs / "a"))
    b = load_checkpoint(resolve_checkpoint(runs / "b"))
    assert a["config"]["model"] == b["config"]["model"] and a["config"]["moe"] == b["config"]["moe"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_config_precedence(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model]\nn_layer = 3\nn_embd = 64\n[train]\nlr = 0.005\n")
    cfg = resolve_config("tiny", str(path), {"model.n_layer": None, "model.n_embd": 48}, ["model.n_embd=96"])
    assert cfg.model.n_layer == 3  # from the file: the flag was not passed
    assert cfg.model.n_embd == 96  # --set beats the flag, which beat the file
    assert cfg.train.lr == 0.005 and cfg.model.n_head == 2  # file, then preset


def test_lr_schedule_warmup_and_cosine(tmp_path):
    cfg = resolve_config("tiny", sets=["train.warmup_iters=2", "train.max_iters=10", "train.lr=0.01"])
    assert lr_at(0, cfg) == pytest.approx(0.005) and lr_at(1, cfg) == pytest.approx(0.01)
    assert lr_at(2, cfg) == pytest.approx(0.01)
    assert lr_at(10, cfg) == pytest.approx(0.01 * cfg.train.min_lr_ratio)
    assert lr_at(5, cfg) < lr_at(3, cfg)


def _resume_pair(tiny_data, tmp_path, restore_rng: bool):
    # noisy-topk + dropout consume the global RNG every step, so the RNG restore matters
    common = dict(max_iters=8, lr_decay_iters=8, eval_interval=4, ckpt_interval=4, log_interval=4)
    full = tiny_cfg(tiny_data, tmp_path / "runs", name="full", **common)
    half = tiny_cfg(tiny_data, tmp_path / "runs", name="half", **{**common, "max_iters": 4})
    for cfg in (full, half):
        cfg.moe.variant, cfg.model.dropout = "noisy-topk", 0.1
    Trainer(full).run()
    Trainer(half).run()
    half.train.max_iters = 8
    Trainer(half, resume="yes", restore_rng=restore_rng).run()
    a = load_checkpoint(tmp_path / "runs" / "full" / "ckpt" / "step_000008.pt")
    b = load_checkpoint(tmp_path / "runs" / "half" / "ckpt" / "step_000008.pt")
    return a, b


def test_resume_is_bit_identical(tiny_data, tmp_path):
    a, b = _resume_pair(tiny_data, tmp_path, restore_rng=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["best_val"] == b["best_val"]


def test_resume_without_rng_restore_differs(tiny_data, tmp_path):
    a, b = _resume_pair(tiny_data, tmp_path, restore_rng=False)
    assert not all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_refuses_changed_model_config(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, base_args(tiny_data, runs, "--name", "r", "--max-iters", "2")).exit_code == 0
    result = runner.invoke(app, base_args(tiny_data, runs, "--name", "r", "--max-iters", "4", "--n-expert", "8",
                                          "--lr", "0.01", "--resume"))
    assert_one_line_error(result, "moe.n_expert", "train.lr")
    ok = runner.invoke(app, base_args(tiny_data, runs, "--name", "r", "--max-iters", "4", "--resume"))
    assert ok.exit_code == 0, ok.output


def test_resume_flags(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert_one_line_error(runner.invoke(app, base_args(tiny_data, runs, "--name", "x", "--resume")),
                          "no checkpoint")
    auto = runner.invoke(app, base_args(tiny_data, runs, "--name", "x", "--max-iters", "2", "--resume", "auto"))
    assert auto.exit_code == 0 and "starting a fresh run" in auto.output
    again = runner.invoke(app, base_args(tiny_data, runs, "--name", "x", "--max-iters", "2"))
    assert_one_line_error(again, "already has checkpoints")


def test_default_names_never_reuse_a_run(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    for _ in range(2):
        assert runner.invoke(app, base_args(tiny_data, runs, "--max-iters", "1")).exit_code == 0
    assert sorted(p.name for p in runs.iterdir()) == ["topk", "topk-2"]


@pytest.mark.parametrize("args, fragment", [
    (["--lr", "0"], "train.lr"), (["--lr", "nan"], "train.lr"), (["--batch-size", "0"], "train.batch_size"),
    (["--max-iters", "0"], "train.max_iters"), (["--block-size", "100000"], "block_size"),
    (["--set", "train.bogus=1"], "train.bogus"), (["--set", "model.n_layer=two"], "model.n_layer"),
    (["--data", "missing"], "moegpt prepare"), (["--moe", "nope"], "valid"),
])
def test_bad_input_is_one_line(tiny_data, tmp_path, args, fragment):
    result = runner.invoke(app, base_args(tiny_data, tmp_path / "runs", *args))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_malformed_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[model\nn_layer = 3\n")
    assert_one_line_error(runner.invoke(app, ["train", "--config", str(path)]), "malformed TOML")


def test_inconsistent_data_refused(tiny_data, tmp_path):
    broken = tmp_path / "data"
    (broken / "tiny").mkdir(parents=True)
    for f in (tiny_data / "tiny").iterdir():
        (broken / "tiny" / f.name).write_bytes(f.read_bytes())
    with open(broken / "tiny" / "train.bin", "ab") as f:
        f.write(b"\x01")  # one stray byte: size no longer matches meta.json
    result = runner.invoke(app, base_args(broken, tmp_path / "runs"))
    assert result.exit_code == 2 and result.stderr.startswith("moegpt: error:"), result.output


def test_corrupt_checkpoint_on_resume(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, base_args(tiny_data, runs, "--name", "c", "--max-iters", "2")).exit_code == 0
    for ckpt in (runs / "c" / "ckpt").glob("*.pt"):
        ckpt.write_bytes(ckpt.read_bytes()[:-100])
    result = runner.invoke(app, base_args(tiny_data, runs, "--name", "c", "--max-iters", "4", "--resume"))
    assert_one_line_error(result, "checkpoint corrupt")


def test_nan_loss_stops_before_optimizer_step(tiny_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setenv("MOEGPT_FAULT_NAN_AT_STEP", "3")
    result = runner.invoke(app, base_args(tiny_data, runs, "--name", "n", "--max-iters", "6",
                                          "--ckpt-interval", "2", "--eval-interval", "100"))
    assert result.exit_code == 3, result.output
    assert "step 3" in result.stderr and result.stderr.startswith("moegpt: error:")
    state = load_checkpoint(runs / "n" / "ckpt" / "step_000002.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (runs / "n" / "ckpt" / "step_000003.pt").exists()


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "moegpt.cli", *base_args(tiny_data, runs, "--name", "k", "--ckpt-interval", "2",
                                                          "--eval-interval", "100")]
    assert subprocess.run(cmd + ["--max-iters", "2"], env=subprocess_env(), capture_output=True).returncode == 0
    killed = subprocess.run(cmd + ["--max-iters", "4", "--resume"], capture_output=True,
                            env=subprocess_env(MOEGPT_FAULT_KILL_DURING_CKPT="1"))
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(resolve_checkpoint(runs / "k"))["step"] == 2
    resumed = subprocess.run(cmd + ["--max-iters", "4", "--resume"], env=subprocess_env(), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(runs / "k" / "ckpt" / "step_000004.pt")["step"] == 4


@pytest.mark.slow
def test_sigint_saves_and_exits_130(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "moegpt.cli", *base_args(tiny_data, runs, "--name", "s", "--max-iters", "100000",
                                                          "--log-interval", "1", "--eval-interval", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "--resume" in err
    state = load_checkpoint(resolve_checkpoint(runs / "s"))
    step = state["step"]
    resumed = subprocess.run([*cmd[:-6], "--max-iters", str(step + 2), "--resume"], capture_output=True,
                             text=True, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(resolve_checkpoint(runs / "s"))["step"] == step + 2


@pytest.mark.slow
def test_torchrun_two_processes(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "moegpt.cli", *base_args(tiny_data, runs, "--name", "ddp", "--max-iters", "4",
                                          "--log-interval", "2", "--device", "cpu")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-3000:]}"
    records = [json.loads(line) for line in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss_ce" in r] == [2, 4]  # one writer, not two
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    assert sorted(p.name for p in runs.iterdir()) == ["ddp"]
    state = load_checkpoint(resolve_checkpoint(runs / "ddp"))
    assert state["data_state"]["world_size"] == 2
    assert "ranks in sync" in done.stdout
