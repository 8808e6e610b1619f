"""Thread policy: --threads N|auto, and OpenMP's passive wait policy set before torch loads (checked in
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
from moegpt.threads import resolve_threads, usable_cores

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
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**clean, "OMP_DISPLAY_ENV": "VERBOSE", **env})
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.mark.slow
def test_cli_makes_openmp_wait_passively():
    if "GOMP_SPINCOUNT" not in gomp_settings("import torch; torch.ones(2)"):
        pytest.skip("torch here is not built with GNU OpenMP")
    assert "GOMP_SPINCOUNT = '0'" not in gomp_settings("import torch; torch.ones(2)")  # spins by default
    assert "GOMP_SPINCOUNT = '0'" in gomp_settings(LOAD_TORCH)  # the CLI's passive policy reached libgomp
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in gomp_settings(LOAD_TORCH, OMP_WAIT_POLICY="active")  # a user's wins
