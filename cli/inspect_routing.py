"""`moegpt inspect-routing`: expert-usage report of a run (tables, heatmaps, JSON, causality audit)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from moegpt.cli import options as opt
from moegpt.cli.app import app
from moegpt.cli.routing_views import render_report
from moegpt.errors import MoegptError
from moegpt.inspect.plot import require_matplotlib, write_heatmap_png
from moegpt.inspect.schema import SCHEMA_VERSION, report_to_json


@app.command("inspect-routing")
def inspect_routing_command(
    run: Annotated[str, typer.Argument(metavar="RUN_OR_CHECKPOINT",
                                       help="A run folder (uses its best, else latest checkpoint) or a .pt file.")],
    tokens: Annotated[int, typer.Option("--tokens", help="Held-out tokens to route and score, in windows at random "
                                                         "positions spread over the whole split (seed 0), as "
                                                         "training evaluates; the whole split, in order, if it "
                                                         "holds no more.")]
    = 65_536,
    split: Annotated[str, typer.Option("--split", help="Which split to read: val or train.")] = "val",
    layer: Annotated[int | None, typer.Option("--layer", help="Report only this MoE layer.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Also print TEXT coloured by each token's top-1 "
                                                            "expert, one line per layer.")] = None,
    format_: Annotated[str, typer.Option("--format", help=f"table (rich) or json (schema_version {SCHEMA_VERSION}, "
                                                          "documented in moegpt/inspect/schema.py).")] = "table",
    png: Annotated[str | None, typer.Option("--png", help="Write a layer x expert load heatmap to FILE "
                                                          "(needs the \\[plot] extra: matplotlib).")] = None,
    causality: Annotated[bool, typer.Option("--causality", help="Run the suffix-perturbation causality probe and "
                                                                "compare full-forward with cached routing.")] = False,
    compare: Annotated[str | None, typer.Option("--compare", metavar="OTHER_RUN",
                                                help="Show another run side by side.")] = None,
    dead_threshold: Annotated[float, typer.Option(
        "--dead-threshold", help="An expert is dead when its load is below this fraction of the uniform share.")] = 0.1,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per forward (default: the run's "
                                                                        "training batch size; capacity depends on "
                                                                        "it).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda[:N], mps.")] = "auto",
    threads: opt.Threads = "auto",
) -> None:
    """Report how a run uses its experts, on held-out tokens, without modifying the run.

    Per MoE layer: load before/after capacity drops, max/mean, CV,
    dead experts, drop rate, router entropy, top-1/top-2 margin,
    balance and z losses. Per expert: the tokens most over-represented
    relative to their corpus frequency. Also: co-activated expert pairs,
    cross-layer agreement, the load history from metrics.jsonl.
    """
    from moegpt.inspect.run import InspectOptions, inspect_routing  # here: `--help` needs no torch
    from moegpt.threads import apply_threads

    if format_ not in ("table", "json"):
        raise MoegptError(f"--format must be table or json (got {format_!r})")
    if png is not None:
        require_matplotlib()  # before minutes of work, not after
    apply_threads(threads)
    report = inspect_routing(run, InspectOptions(tokens=tokens, split=split, layer=layer, text=text,
                                                 causality=causality, compare=compare, dead_threshold=dead_threshold,
                                                 device=device, batch_size=batch_size))
    if png is not None:
        written = write_heatmap_png(report, png)
    if format_ == "json":
        sys.stdout.write(report_to_json(report) + "\n")
        if png is not None:
            print(f"wrote {written}", file=sys.stderr)
        return
    console = Console()
    render_report(console, report)
    if png is not None:
        console.print(f"wrote {written}", highlight=False)
