"""The Typer application object and its error handling: every user error is one line, exit 2."""

from __future__ import annotations

import os
import sys
from typing import Any

import typer
from typer import core as typer_core
from typer.core import TyperGroup

from moegpt.cli.help_format import reflow_tree
from moegpt.errors import MoegptError
from moegpt.safe_io import describe, is_write_failure

USAGE_ERROR_EXIT = 2
RUNTIME_FAILURE_EXIT = 1

# Typer >= 0.29 vendors click as typer._click; older releases use the click package.
click = getattr(typer_core, "_click", None) or __import__("click")


def fail(message: str, exit_code: int = USAGE_ERROR_EXIT) -> None:
    """Print `moegpt: error: <message>` on stderr (first line only) and exit (2 by default)."""
    first_line = " ".join(str(message).strip().splitlines()[:1]) or "unknown error"
    print(f"moegpt: error: {first_line}", file=sys.stderr)
    sys.exit(exit_code)


# Options whose value may be left out (`--resume` alone means `--resume yes`; `--resume auto` also works).
# Typer has no optional-value options, so the bare form is completed before parsing.
OPTIONAL_VALUE_OPTIONS = {"--resume": "yes"}


def complete_optional_values(args: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in OPTIONAL_VALUE_OPTIONS and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUE_OPTIONS[arg])
    return out


class MoegptGroup(TyperGroup):
    """A command group whose usage errors and MoegptErrors become one line on stderr and exit 2.

    Typer's default renders a multi-line rich box; scripts and users want one greppable line.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        args = complete_optional_values(list(sys.argv[1:] if args is None else args))
        reflow_tree(self)
        try:
            rv = super().main(args=args, prog_name=prog_name or "moegpt", complete_var=complete_var,
                              standalone_mode=False, **extra)
            if standalone_mode:
                sys.stdout.flush()  # a full disk under `> file` fails here, not in the interpreter's exit
        except click.exceptions.UsageError as err:
            if not standalone_mode:
                raise
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx and err.ctx.parent else ""
            fail(f"{err.format_message()}{hint}")
        except MoegptError as err:
            if not standalone_mode:
                raise
            fail(str(err), err.exit_code)
        except OSError as err:  # a full disk, EIO or EACCES on a write path not wrapped more precisely
            if standalone_mode and is_write_failure(err):
                fail(f"cannot write: {describe(err)}", RUNTIME_FAILURE_EXIT)
            raise
        except typer.Abort:
            if not standalone_mode:
                raise
            print("moegpt: aborted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:
            # `moegpt ... | head`: the reader left; exit quietly like other Unix tools
            sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - suppress the flush error at exit
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    cls=MoegptGroup,
    name="moegpt",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """Train small GPT-style language models with Mixture-of-Experts layers, and see how experts are used.

    Start with `moegpt train` (prepares the built-in corpus if needed), then `moegpt sample RUN` and
    `moegpt inspect-routing RUN`.
    """
