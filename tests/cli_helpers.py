"""Assertions and runs shared by the CLI tests."""

from __future__ import annotations

import socket
from pathlib import Path

from typer.testing import CliRunner


def assert_one_line_error(result, *fragments: str) -> None:
    """A user error: exit 2, exactly one stderr line `moegpt: error: ...` holding each fragment, no traceback."""
    _assert_one_line(result, 2, fragments)


def assert_one_line_failure(result, *fragments: str) -> None:
    """A runtime failure (full disk, non-finite model): exit 1, one stderr line holding each fragment."""
    _assert_one_line(result, 1, fragments)


def _assert_one_line(result, exit_code: int, fragments: tuple[str, ...]) -> None:
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def train_tiny(data_root: Path, runs_root: Path, name: str, *flags: str, steps: int = 2):
    """`moegpt train` of the tiny preset on the test corpus into runs_root/name (CliRunner result)."""
    from moegpt.cli.main import app

    return CliRunner().invoke(app, ["train", "--preset", "tiny", "--data", "tiny", "--data-root", str(data_root),
                                    "--set", f"train.runs_root={runs_root}", "--name", name,
                                    "--max-iters", str(steps), *flags])


def free_port() -> int:
    """A port nothing listens on now, for a torchrun rendezvous (a fixed one can collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
