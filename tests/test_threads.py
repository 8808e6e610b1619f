"""Thread policy: --threads N|auto, and OpenMP's short spin-then-sleep wait set before torch loads (checked in
libgomp's own report of its settings, not by timing)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error
from typer.testing import CliRunner

from moegpt.cli.main import app
from moegpt.errors import MoegptError
from moegpt.threads import SHORT_SPIN, WAIT_SETTINGS, prefer_short_spin, resolve_threads, usable_cores, wait_policy

runner = CliRunner()
LOAD_TORCH = "import moegpt.cli.main, torch; torch.ones(2)"


def test_auto_follows_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto") == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads("auto") == usable_cores() >= 1
    assert resolve_threads("5") == 5


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5"])
def test_bad_thread_counts(bad):
    with pytest.raises(MoegptError, match="threads"):
        resolve_threads(bad)


def test_cli_rejects_a_bad_thread_count(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path), "--threads", "0"])
    assert_one_line_error(result, "thread")


def gomp_settings(code: str, **env: str) -> str:
    """libgomp's report of the settings it read when torch loaded it (OMP_DISPLAY_ENV)."""
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.slow
def test_cli_makes_openmp_spin_briefly():
    if "GOMP_SPINCOUNT" not in gomp_settings("import torch; torch.ones(2)"):
        pytest.skip("torch here is not built with GNU OpenMP")
    short = f"GOMP_SPINCOUNT = '{SHORT_SPIN['GOMP_SPINCOUNT']}'"
    assert short not in gomp_settings("import torch; torch.ones(2)")  # libgomp's own default spins far longer
    assert short in gomp_settings(LOAD_TORCH)  # the CLI's short spin reached libgomp
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in gomp_settings(LOAD_TORCH, OMP_WAIT_POLICY="active")  # a user's wins
    assert short not in gomp_settings(LOAD_TORCH, OMP_WAIT_POLICY="passive")


def test_short_spin_only_where_the_user_set_nothing(monkeypatch):
    for name in WAIT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    prefer_short_spin()
    assert {name: os.environ.get(name) for name in SHORT_SPIN} == SHORT_SPIN and wait_policy() == "short spin"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.delenv("KMP_BLOCKTIME")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    prefer_short_spin()
    assert "GOMP_SPINCOUNT" not in os.environ and wait_policy() == "passive"


def test_one_thread_blocks_nest_and_remember_the_callers_threads():
    import torch

    from moegpt.runtime import caller_threads, one_thread

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert caller_threads() == 2  # outside any block: the current count
        with one_thread():
            assert torch.get_num_threads() == 1 and caller_threads() == 2
            with one_thread():
                assert torch.get_num_threads() == 1 and caller_threads() == 1
            assert caller_threads() == 2
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError), one_thread():
            raise ValueError
        assert torch.get_num_threads() == 2 and caller_threads() == 2  # restored after an error too
    finally:
        torch.set_num_threads(threads)


def test_each_python_thread_remembers_its_own_callers_threads():
    import threading

    import torch

    from moegpt.runtime import caller_threads, one_thread

    threads = torch.get_num_threads()
    inside, leave, seen = threading.Event(), threading.Event(), []

    def other():
        with one_thread():
            inside.set()
            leave.wait(10)
            seen.append(caller_threads())

    torch.set_num_threads(2)
    try:
        worker = threading.Thread(target=other)
        worker.start()
        inside.wait(10)
        with one_thread():
            pass  # this thread's block ends while the other's is still open
        leave.set()
        worker.join(10)
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]
