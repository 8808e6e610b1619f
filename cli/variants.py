"""`moegpt variants`: the routing variants the registry holds (built-in and registered), from their specs."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from moegpt.cli.app import app
from moegpt.errors import MoegptError


@app.command("variants")
def variants_command(
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """List every routing variant `--moe` accepts: what it does, its reference, whether it is causal, its
    default capacity factor and the statistics it adds to reports."""
    from moegpt.moe import VARIANTS  # here, not at import: `--help` must not wait for torch

    if fmt not in ("table", "json"):
        raise MoegptError(f"--format must be table or json (got {fmt!r})")
    rows = [{"name": spec.name, "description": spec.description, "reference": spec.reference,
             "causal": spec.causal, "default_capacity_factor": spec.default_capacity_factor if spec.uses_capacity
             else None, "extra_stats": [extra.key for extra in spec.extra_stats]} for spec in VARIANTS.values()]
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="moegpt routing variants (--moe)")
    table.add_column("name", no_wrap=True)
    table.add_column("what (reference)", ratio=1)
    for column in ("causal", "capacity", "extra stats"):
        table.add_column(column)
    for row in rows:
        capacity = "-" if row["default_capacity_factor"] is None else \
            "dropless" if row["default_capacity_factor"] == 0 else f"{row['default_capacity_factor']:g}"
        table.add_row(row["name"], f"{row['description']} ({row['reference']})",
                      "yes" if row["causal"] else "[red]no[/]", capacity, "\n".join(row["extra_stats"]) or "-")
    Console().print(table)
