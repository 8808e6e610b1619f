"""`--help` reads well: paragraphs wrap (no hard breaks mid-sentence), on/off flags show no value type,
required arguments appear plainly in the usage line."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from moegpt.cli.help_format import reflow
from moegpt.cli.main import app

runner = CliRunner()
COMMANDS = [["train"], ["sample"], ["inspect-routing"], ["prepare"], ["params"], ["bench", "layer"],
            ["bench", "model"], ["bench", "sample"], ["bench", "quality"]]


def help_text(args: list[str], width: int = 200) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": str(width)}, terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.output


def test_reflow_joins_lines_within_paragraphs():
    text = "First line\n    goes on.\n\n    Second\n    paragraph.\n"
    assert reflow(text) == "First line goes on.\n\nSecond paragraph."


def test_docstring_paragraphs_are_not_broken_mid_sentence():
    text = help_text(["inspect-routing"])
    assert any("max/mean, CV, dead experts, drop rate" in line for line in text.splitlines())


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_flags_show_no_value_type(args):
    for line in help_text(args).splitlines():
        assert "<bool>" not in line, line


def test_required_argument_is_plain_in_usage():
    usage = next(line for line in help_text(["inspect-routing"]).splitlines() if "Usage:" in line)
    assert "RUN_OR_CHECKPOINT" in usage and "{" not in usage
    usage = next(line for line in help_text(["sample"]).splitlines() if "Usage:" in line)
    assert "{" not in usage
