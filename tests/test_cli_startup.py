"""The CLI starts without torch: importing the app and rendering any command's help leaves torch
unimported (torch is imported inside the commands that need it)."""

from __future__ import annotations

import subprocess
import sys

from moegpt.cli import options

HELP_WITHOUT_TORCH = """
import sys
from typer.testing import CliRunner
from moegpt.cli.main import app
for args in ([], ["train"], ["sample"], ["inspect-routing"], ["prepare"], ["params"], ["bench"],
             ["bench", "layer"], ["bench", "model"], ["bench", "sample"], ["bench", "quality"]):
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, (args, result.output)
    assert "torch" not in sys.modules, args
print("ok")
"""


def test_help_never_imports_torch():
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_variants_command_lists_the_registry():
    import json

    from typer.testing import CliRunner

    from moegpt.cli.main import app
    from moegpt.moe import VARIANTS

    result = CliRunner().invoke(app, ["variants", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [row["name"] for row in json.loads(result.stdout)] == list(VARIANTS)
    assert "moegpt variants" in options.VARIANT_HELP


def test_inspect_routing_default_matches_the_library():
    import inspect

    from moegpt.cli.inspect_routing import inspect_routing_command
    from moegpt.inspect.run import DEFAULT_TOKENS

    default = inspect.signature(inspect_routing_command).parameters["tokens"].default
    assert default == DEFAULT_TOKENS
