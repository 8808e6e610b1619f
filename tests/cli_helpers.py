"""Assertions shared by the CLI tests."""

from __future__ import annotations


def assert_one_line_error(result, *fragments: str) -> None:
    """A user error: exit 2, exactly one stderr line `moegpt: error: ...` holding each fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def assert_one_line_failure(result, *fragments: str) -> None:
    """A runtime failure (full disk, non-finite model): exit 1, one stderr line holding each fragment."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moegpt: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
