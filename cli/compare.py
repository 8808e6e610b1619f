"""`moegpt compare`: a leaderboard of runs (table, JSON or CSV), terminal curves and an optional PNG."""

from __future__ import annotations

import csv
import json
import sys
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from moegpt.cli.app import app
from moegpt.cli.compare_charts import X_AXES, render_sparklines, require_matplotlib, write_compare_png
from moegpt.compare import DISPLAY_DIGITS, SORT_KEYS, leaderboard
from moegpt.errors import MoegptError
from moegpt.run_metrics import read_runs

FORMATS = ("table", "json", "csv")
CSV_COLUMNS = ("group", "rank", "tied", "run", "variant", "n_expert", "experts_per_token", "params_active",
               "params_total", "steps", "tokens", "best_val_ce", "final_val_ce", "val_ce_at_equal_steps",
               "val_ce_at_equal_time", "tokens_per_s", "max_mean_load", "drop_frac", "train_s", "wall_s", "path")


def warn(message: str) -> None:
    print(f"moegpt: warning: {message}", file=sys.stderr)


def _cell(row: dict[str, Any], column: str, text: str | None = None) -> str:
    value = row[column]
    if value is None:
        return "-"
    shown = text if text is not None else f"{value:,.{DISPLAY_DIGITS.get(column, 4)}f}"
    return f"[bold green]{shown}[/]" if column in row["best_in"] else shown


def short(n: float) -> str:
    """Three significant digits with a k/M/G suffix: the table must fit a 100-column terminal."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _variant(row: dict[str, Any]) -> str:
    if row["n_expert"] is None:
        return row["variant"]
    return f"{row['variant']} {row['n_expert']}/{row['experts_per_token']:g}"


def _equal_headers(board: dict[str, Any]) -> tuple[str, str]:
    if len(board["groups"]) == 1:
        group = board["groups"][0]
        step = "-" if group["equal_step"] is None else f"{group['equal_step']:,}"
        seconds = "-" if group["equal_train_s"] is None else f"{group['equal_train_s']:.1f}s"
        return f"val @\nstep {step}", f"val @\n{seconds}"
    return "val @\neq. steps", "val @\neq. time"


def leaderboard_table(board: dict[str, Any]) -> Table:
    at_steps, at_time = _equal_headers(board)
    sort_column = SORT_KEYS[board["sort"]][0]
    several_groups = len(board["groups"]) > 1
    table = Table(title=f"moegpt compare: {len(board['rows'])} runs, ranked by {board['sort']}", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), header_style="bold")
    # (header, the row column it shows when it can be the sort column)
    columns = [("#", None), ("run", None), ("variant\nE/k", None), ("params\nact/tot", None),
               ("steps", None), ("tokens", None), ("best\nval", "best_val_ce"), ("final\nval", "final_val_ce"),
               (at_steps, "val_ce_at_equal_steps"), (at_time, "val_ce_at_equal_time"), ("tok/s", "tokens_per_s"),
               ("max/mean\nload", None), ("drop", None), ("wall", "wall_s")]
    if several_groups:
        columns.insert(0, ("data", None))
    for header, column in columns:
        left = header in ("run", "variant\nE/k", "data")
        table.add_column(f"{header}*" if column == sort_column else header, justify="left" if left else "right",
                         no_wrap=header == "run")
    for row in board["rows"]:
        rank = "-" if row["rank"] is None else f"{row['rank']}{'=' if row['tied'] else ''}"
        cells = [rank, row["run"], _variant(row), f"{short(row['params_active'])}/{short(row['params_total'])}",
                 f"{row['steps']:,}", "-" if row["tokens"] is None else short(row["tokens"]),
                 _cell(row, "best_val_ce"), _cell(row, "final_val_ce"), _cell(row, "val_ce_at_equal_steps"),
                 _cell(row, "val_ce_at_equal_time"),
                 _cell(row, "tokens_per_s", None if row["tokens_per_s"] is None else short(row["tokens_per_s"])),
                 _cell(row, "max_mean_load"), _cell(row, "drop_frac"),
                 _cell(row, "wall_s", None if row["wall_s"] is None else f"{row['wall_s']:.1f}s")]
        table.add_row(*([row["group"]] if several_groups else []), *cells)
    return table


def render_notes(console: Console, board: dict[str, Any]) -> None:
    """Why some cells are empty, and which runs were not ranked together."""
    if len(board["groups"]) > 1:
        console.print("[yellow]incomparable:[/] these runs were trained on different data or tokenizers; each "
                      "group is ranked on its own:", highlight=False)
        for group in board["groups"]:
            where = f"equal step {group['equal_step']}" if group["equal_step"] is not None else "no evaluation"
            console.print(f"  {group['id']}: {group['data']}, {group['runs']} run(s), {where}", highlight=False)
    ties = [row["run"] for row in board["rows"] if row["tied"]]
    if ties:
        console.print(f"[yellow]tied[/] (equal at the precision shown): {', '.join(ties)}", highlight=False)
    for row in board["rows"]:
        for note in row["notes"]:
            console.print(f"  {row['run']}: {note}", highlight=False)
    console.print("val CE interpolated linearly between evaluations; equal time = training seconds without "
                  "evaluation and checkpoints; * = sort column; bold green = best of its column", style="dim",
                  highlight=False)


def write_csv(board: dict[str, Any]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in board["rows"]:
        writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])


@app.command("compare")
def compare_command(
    runs: Annotated[list[str] | None, typer.Argument(
        metavar="[RUN]...", help="Run folders or globs (e.g. 'runs/*'); default: every run under --runs-root.",
        show_default=False)] = None,
    sort: Annotated[str, typer.Option("--sort", help="Rank by: " + ", ".join(SORT_KEYS) + ". equal-steps = val CE "
                                                     "at the shortest run's last evaluated step.")] = "equal-steps",
    format_: Annotated[str, typer.Option("--format", help="table (with terminal curves), json or csv.")] = "table",
    png: Annotated[str | None, typer.Option("--png", help="Also write curves to FILE: val CE and train loss against "
                                                          "steps, tokens and time, and per-layer max/mean load "
                                                          "(needs the \\[plot] extra: matplotlib).")] = None,
    x: Annotated[str, typer.Option("--x", help="X axis of the curves: all (three PNG panels; steps in the "
                                                "terminal), steps, tokens or time (training seconds).")] = "all",
    curves: Annotated[bool, typer.Option("--curves/--no-curves", help="Sparklines under the table.")] = True,
    runs_root: Annotated[str, typer.Option("--runs-root", help="Where to look when no RUN is given.")] = "runs",
) -> None:
    """Rank training runs by validation loss, at equal steps and equal training time, with cost and load.

    Reads config.toml and metrics.jsonl (and a checkpoint's small metadata) of each run; never modifies
    a run; a run still training is read up to its last complete line. Runs on different data or
    tokenizers are ranked separately.
    """
    if sort not in SORT_KEYS:
        raise MoegptError(f"--sort must be one of {', '.join(SORT_KEYS)} (got {sort!r})")
    if format_ not in FORMATS:
        raise MoegptError(f"--format must be one of {', '.join(FORMATS)} (got {format_!r})")
    if x not in ("all", *X_AXES):
        raise MoegptError(f"--x must be all, {', '.join(X_AXES)} (got {x!r})")
    if png is not None:
        require_matplotlib()
    found, warnings = read_runs(list(runs or []), runs_root)
    for message in warnings:
        warn(message)
    if not found:
        raise MoegptError("no runs to compare" + (f" under {runs_root}/" if not runs else ""))
    board = leaderboard(found, sort)
    if format_ == "json":
        sys.stdout.write(json.dumps(board, indent=2) + "\n")
    elif format_ == "csv":
        write_csv(board)
    else:
        console = Console()
        console.print(leaderboard_table(board))
        render_notes(console, board)
        if curves:
            render_sparklines(console, found, "steps" if x == "all" else x)
    if png is not None:
        written = write_compare_png(found, png, x)
        print(f"wrote {written}", file=sys.stderr if format_ != "table" else sys.stdout)
