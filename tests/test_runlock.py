"""One live trainer per run folder: a second trainer is refused naming the holder; a killed holder
leaves no stale lock; readers keep working on a run being trained."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.runlock import LOCK_NAME, RunBusy, RunLock

runner = CliRunner()
HOLDER = ("import sys, time\nfrom moegpt.runlock import RunLock\nRunLock.acquire(sys.argv[1])\n"
          "print('locked', flush=True)\ntime.sleep(120)\n")


@pytest.fixture
def holder():
    """Starts another process that holds a run folder's lock; yields a function run_dir -> process."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def train_args(data_root: Path, runs_root: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(data_root),
            "--set", f"train.runs_root={runs_root}", "--max-iters", "2", "--eval-interval", "2", *extra]


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    first = RunLock.acquire(tmp_path / "run")
    with pytest.raises(RunBusy, match="pid"):
        RunLock.acquire(tmp_path / "run")
    first.release()
    RunLock.acquire(tmp_path / "run").release()


def test_second_trainer_exits_2_naming_the_holder(tiny_data, tmp_path, holder):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss_ce": 3.0}) + "\n")
    proc = holder(run)
    result = runner.invoke(app, train_args(tiny_data, tmp_path / "runs", "--name", "x"))
    assert_one_line_error(result, f"pid {proc.pid}", str(run))
    assert (run / "metrics.jsonl").read_text() == json.dumps({"step": 1, "loss_ce": 3.0}) + "\n"
    assert not (run / "ckpt").exists()


def test_kill_9_leaves_no_stale_lock(tiny_data, tmp_path, holder):
    run = tmp_path / "runs" / "x"
    proc = holder(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock with the process
    result = runner.invoke(app, train_args(tiny_data, tmp_path / "runs", "--name", "x"))
    assert result.exit_code == 0, result.output
    assert (run / "ckpt" / "step_000002.pt").is_file()


def test_readers_work_on_a_run_being_trained(tiny_data, tmp_path, holder):
    runs = tmp_path / "runs"
    assert runner.invoke(app, train_args(tiny_data, runs, "--name", "x")).exit_code == 0
    holder(runs / "x")
    result = runner.invoke(app, ["sample", str(runs / "x"), "--max-new-tokens", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["inspect-routing", str(runs / "x"), "--tokens", "2048", "--format", "json"])
    assert result.exit_code == 0, result.output
