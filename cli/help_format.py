"""How `--help` reads: paragraphs that wrap to the terminal, on/off flags without a value type, and
required arguments shown plainly in the usage line.

Typer keeps a docstring's hard line breaks, labels every flag `<bool>` as if it took a value, and writes a
required argument as `{NAME}`. The two display tweaks patch typer's own methods when they exist (a typer
that renamed them just renders its defaults; tests/test_cli_help.py notices).
"""

from __future__ import annotations

from typing import Any

from typer import core as typer_core


def reflow(text: str | None) -> str | None:
    """Join the lines of each paragraph (blank-line separated), so the help formatter can wrap them."""
    if not text:
        return text
    paragraphs = [" ".join(line.strip() for line in block.strip().splitlines())
                  for block in text.strip().split("\n\n") if block.strip()]
    return "\n\n".join(paragraphs)


def reflow_tree(command: Any) -> None:
    """Reflow the help of a click command and of every subcommand below it."""
    command.help = reflow(command.help)
    for sub in getattr(command, "commands", {}).values():
        reflow_tree(sub)


def _flag_type(self: Any, ctx: Any) -> str | None:
    if getattr(self, "is_flag", False) and getattr(self, "is_bool_flag", True):
        return None  # `--cache/--no-cache` takes no value: no type column
    return _typer_display_type(self, ctx)


def _plain_usage_name(self: Any) -> str:
    name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
    return name + ("..." if self.nargs != 1 else "")


_typer_display_type = getattr(typer_core.TyperOption, "display_type_rich", None)
if _typer_display_type is not None:
    typer_core.TyperOption.display_type_rich = _flag_type
if hasattr(typer_core.TyperArgument, "_usage_display_name"):
    typer_core.TyperArgument._usage_display_name = _plain_usage_name
