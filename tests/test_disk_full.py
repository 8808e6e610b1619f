"""Full disks and failing writes on every write path: one line `moegpt: error: ...`, exit 1, earlier
output intact; `--resume` tolerates a metrics file whose last line was torn."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from cli_helpers import assert_one_line_failure
from test_safe_io import failing_writer
from typer.testing import CliRunner

from moegpt import checkpoint, prepare, safe_io
from moegpt.cli.main import app

runner = CliRunner()
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def train_args(data_root: Path, runs: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(data_root), "--name", "x",
            "--set", f"train.runs_root={runs}", "--log-interval", "1", "--eval-interval", "2",
            "--ckpt-interval", "2", *extra]


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_full_disk_during_metrics_write_then_resume(tiny_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    monkeypatch.setattr(safe_io, "_write", failing_writer(lambda b: b'"step": 3,' in b and b"loss_ce" in b))
    result = runner.invoke(app, train_args(tiny_data, runs, "--max-iters", "4"))
    assert_one_line_failure(result, "No space left on device", "metrics.jsonl", "earlier records are intact")
    assert [r["step"] for r in metrics(runs / "x")] == [1, 2, 2]  # whole lines only
    monkeypatch.undo()
    result = runner.invoke(app, train_args(tiny_data, runs, "--max-iters", "4", "--resume"))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(runs / "x") if "loss_ce" in r] == [1, 2, 3, 4]


def test_resume_drops_a_torn_last_metrics_line(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    assert runner.invoke(app, train_args(tiny_data, runs, "--max-iters", "2")).exit_code == 0
    with open(runs / "x" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 1')  # a writer killed mid-line
    result = runner.invoke(app, train_args(tiny_data, runs, "--max-iters", "3", "--resume"))
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in metrics(runs / "x") if "loss_ce" in r] == [1, 2, 3]


def test_full_disk_during_checkpoint_keeps_earlier_ones(tiny_data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    real = checkpoint._write_payload

    def fail_at_step_4(f, header, payload):
        if "step_000004" in f.name:
            raise ENOSPC
        return real(f, header, payload)

    monkeypatch.setattr(checkpoint, "_write_payload", fail_at_step_4)
    result = runner.invoke(app, train_args(tiny_data, runs, "--max-iters", "4"))
    assert_one_line_failure(result, "No space left on device", "step_000004.pt", "earlier checkpoints are intact")
    assert sorted(p.name for p in (runs / "x" / "ckpt").iterdir()) == ["best.pt", "step_000002.pt"]
    assert checkpoint.load_checkpoint(runs / "x" / "ckpt" / "step_000002.pt")["step"] == 2


def test_full_disk_during_prepare_installs_nothing(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world\n" * 200)

    def no_space(*args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(prepare, "write_bin", no_space)
    result = runner.invoke(app, ["prepare", "--source", str(corpus), "--tokenizer", "char",
                                 "--data-root", str(tmp_path / "data")])
    assert_one_line_failure(result, "No space left on device", "nothing was installed")
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert runner.invoke(app, train_args(tiny_data, runs, "--max-iters", "2")).exit_code == 0
    return runs / "x"


def test_full_disk_for_reports(trained):
    # /dev/full answers every write with ENOSPC: a real full device, no injection
    result = runner.invoke(app, ["sample", str(trained), "--max-new-tokens", "2", "--routing-json", "/dev/full"])
    assert_one_line_failure(result, "No space left on device")
    result = runner.invoke(app, ["inspect-routing", str(trained), "--tokens", "1024", "--png", "/dev/full"])
    assert_one_line_failure(result, "No space left on device")


def test_unwrapped_write_failures_become_one_line(trained, monkeypatch):
    from moegpt.inspect import run as command

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(command, "inspect_routing", eio)
    result = runner.invoke(app, ["inspect-routing", str(trained), "--tokens", "1024"])
    assert_one_line_failure(result, "Input/output error (errno 5)")


@pytest.mark.slow
def test_stdout_on_a_full_device_is_one_line(tmp_path):
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "moegpt.cli", "params", "--preset", "tiny"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines() == ["moegpt: error: cannot write: No space left on device (errno 28)"]
