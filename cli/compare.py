"""`moegpt compare`: a leaderboard of runs (table, JSON or CSV), terminal curves and an optional PNG."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from moegpt.cli.app import app
from moegpt.cli.compare_charts import X_AXES, render_sparklines, require_matplotlib, write_compare_png
from moegpt.compare import DISPLAY_DIGITS, SORT_KEYS, leaderboard
from moegpt.errors import MoegptError

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


def seconds(value: float) -> str:
    if value < 10:
        return f"{value:.2f}s"
    return f"{value:.0f}s" if value < 1000 else f"{value / 60:.0f}min"


def _variant(row: dict[str, Any]) -> str:
    if row["n_expert"] is None:
        return row["variant"]
    return f"{row['variant']} {row['n_expert']}/{row['experts_per_token']:g}"


def _equal_headers(board: dict[str, Any]) -> tuple[str, str]:
    if len(board["groups"]) == 1:
        group = board["groups"][0]
        step = "-" if group["equal_step"] is None else f"{group['equal_step']:,}"
        at_time = "-" if group["equal_train_s"] is None else seconds(group["equal_train_s"])
        return f"val @\nstep {step}", f"val @\n{at_time}"
    return "val @\neq. steps", "val @\neq. time"


WIDE_ONLY = ("params\nact/tot", "tokens", "drop", "wall")  # left out below 100 columns (json/csv have all)


def leaderboard_table(board: dict[str, Any], width: int = 100) -> Table:
    at_steps, at_time = _equal_headers(board)
    sort_column = SORT_KEYS[board["sort"]][0]
    several_groups = len(board["groups"]) > 1
    n = len(board["rows"])
    title = f"moegpt compare: {n} run{'s' if n != 1 else ''}, ranked by {board['sort']}"
    table = Table(title=title, title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0), header_style="bold")
    # (header, the row column it can sort by, cell text of a row)
    columns: list[tuple[str, str | None, Any]] = [
        ("#", None, lambda r: "-" if r["rank"] is None else f"{r['rank']}{'=' if r['tied'] else ''}"),
        ("run", None, lambda r: escape(r["run"])), ("variant\nE/k", None, _variant),
        ("params\nact/tot", None, lambda r: f"{short(r['params_active'])}/{short(r['params_total'])}"),
        ("steps", None, lambda r: f"{r['steps']:,}"),
        ("tokens", None, lambda r: "-" if r["tokens"] is None else short(r["tokens"])),
        ("best\nval", "best_val_ce", lambda r: _cell(r, "best_val_ce")),
        ("final\nval", "final_val_ce", lambda r: _cell(r, "final_val_ce")),
        (at_steps, "val_ce_at_equal_steps", lambda r: _cell(r, "val_ce_at_equal_steps")),
        (at_time, "val_ce_at_equal_time", lambda r: _cell(r, "val_ce_at_equal_time")),
        ("tok/s", "tokens_per_s", lambda r: _cell(r, "tokens_per_s", _maybe(short, r["tokens_per_s"]))),
        ("max/\nmean", None, lambda r: _cell(r, "max_mean_load")),
        ("drop", None, lambda r: _cell(r, "drop_frac")),
        ("wall", "wall_s", lambda r: _cell(r, "wall_s", _maybe(seconds, r["wall_s"]))),
    ]
    if width < 100:
        columns = [c for c in columns if c[0] not in WIDE_ONLY]
    if several_groups:
        columns.insert(0, ("data", None, lambda r: r["group"]))
    for header, column, _ in columns:
        left = header in ("run", "variant\nE/k", "data")
        # only the variant may wrap: numbers cut short would mislead
        table.add_column(f"{header}*" if column == sort_column else header, justify="left" if left else "right",
                         no_wrap=not header.startswith("variant"))
    for row in board["rows"]:
        table.add_row(*(text(row) for _, _, text in columns))
    return table


def _maybe(fmt: Any, value: float | None) -> str | None:
    return None if value is None else fmt(value)


def render_notes(console: Console, board: dict[str, Any]) -> None:
    """Why some cells are empty, and which runs were not ranked together."""
    if len(board["groups"]) > 1:
        console.print("[yellow]incomparable:[/] these runs were trained on different data or tokenizers; each "
                      "group is ranked on its own:", highlight=False)
        for group in board["groups"]:
            where = f"equal step {group['equal_step']}" if group["equal_step"] is not None else "no evaluation"
            console.print(f"  {group['id']}: {group['data']}, {group['runs']} run(s), {where}", markup=False,
                          highlight=False)
    ties = [row["run"] for row in board["rows"] if row["tied"]]
    if ties:
        console.print(f"[yellow]tied[/] (equal at the precision shown): {escape(', '.join(ties))}", highlight=False)
    for row in board["rows"]:
        for note in row["notes"]:
            console.print(f"  {row['run']}: {note}", markup=False, highlight=False)
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
        metavar="RUN", help="Run folders or globs (e.g. 'runs/*'); default: every run under --runs-root.",
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
    """Rank runs by val CE, at equal steps and equal training time, with their cost and expert load.

    Reads each run's config.toml, metrics.jsonl and checkpoint metadata; never modifies a run.
    A run still training is read up to its last complete line.
    Runs on different data or tokenizers are ranked separately.
    """
    if sort not in SORT_KEYS:
        raise MoegptError(f"--sort must be one of {', '.join(SORT_KEYS)} (got {sort!r})")
    if format_ not in FORMATS:
        raise MoegptError(f"--format must be one of {', '.join(FORMATS)} (got {format_!r})")
    if x not in ("all", *X_AXES):
        raise MoegptError(f"--x must be all, {', '.join(X_AXES)} (got {x!r})")
    if png is not None:
        require_matplotlib()
    from moegpt.run_metrics import read_runs  # here, not at import: `--help` must not wait for torch

    found, warnings = read_runs(list(runs or []), runs_root)
    for message in warnings:
        warn(message)
    if not found:
        where = "" if runs else f" under {runs_root}/" + ("" if Path(runs_root).is_dir() else " (no such folder)")
        raise MoegptError("no runs to compare" + where)
    board = leaderboard(found, sort)
    if format_ == "json":
        sys.stdout.write(json.dumps(board, indent=2) + "\n")
    elif format_ == "csv":
        write_csv(board)
    else:
        console = Console()
        console.print(leaderboard_table(board, console.width))
        render_notes(console, board)
        if curves:
            render_sparklines(console, found, "steps" if x == "all" else x)
    if png is not None:
        written = write_compare_png(found, png, x)
        print(f"wrote {written}", file=sys.stderr if format_ != "table" else sys.stdout)
