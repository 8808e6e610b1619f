"""Curves of `moegpt compare`: sparklines in the terminal, a PNG through matplotlib (the `[plot]` extra)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console

from moegpt.compare import interpolate
from moegpt.errors import MoegptError
from moegpt.inspect.plot import require_matplotlib

if TYPE_CHECKING:  # run_metrics imports torch; `moegpt compare --help` must not
    from moegpt.run_metrics import RunRecord

X_AXES = ("steps", "tokens", "time")
AXIS_KEYS = {"steps": "step", "tokens": "tokens", "time": "train_s"}
AXIS_LABELS = {"steps": "optimizer steps", "tokens": "tokens seen", "time": "training time (s, without evaluation)"}
BLOCKS = "▁▂▃▄▅▆▇█"
# PNG geometry: one row of curve panels, then rows of three per-run load panels
FIG_WIDTH_IN, CURVES_HEIGHT_IN, LOAD_ROW_HEIGHT_IN, DPI, LOAD_PANELS_PER_ROW = 15.0, 4.5, 3.0, 100, 3


def series(run: RunRecord, what: str, axis: str) -> tuple[list[float], list[float]]:
    """(x, y) of "val_ce" (evaluations), "loss_ce" (log records) or "max_mean_load" (worst layer, log records)."""
    key = AXIS_KEYS[axis]
    records = run.evals if what == "val_ce" else run.logs
    points = []
    for r in records:
        if key not in r:
            continue
        if what == "max_mean_load":
            loads = [float(e["max_mean_load"]) for e in r.get("layers") or [] if "max_mean_load" in e]
            if loads:
                points.append((float(r[key]), max(loads)))
        elif what in r:
            points.append((float(r[key]), float(r[what])))
    return [p[0] for p in points], [p[1] for p in points]


def resample(xs: list[float], ys: list[float], x_max: float, width: int) -> list[float | None]:
    """One value per of `width` equal x buckets over [0, x_max]: the mean of the points in the bucket,
    else the interpolation at its centre (sparse evaluations), else None (before or after the run)."""
    out: list[float | None] = []
    for b in range(width):
        lo, hi = x_max * b / width, x_max * (b + 1) / width
        inside = [y for x, y in zip(xs, ys, strict=True) if lo < x <= hi or (b == 0 and x == 0)]
        out.append(sum(inside) / len(inside) if inside else interpolate(xs, ys, (lo + hi) / 2))
    return out


def blocks(values: list[float | None], lo: float, hi: float) -> str:
    span = hi - lo
    return "".join(" " if v is None else BLOCKS[0 if span <= 0 else round((v - lo) / span * (len(BLOCKS) - 1))]
                   for v in values)


def render_sparklines(console: Console, runs: list[RunRecord], axis: str) -> None:
    """One line per run: val CE, train loss and the worst layer's max/mean load over a shared x axis,
    each kind on one scale for all runs (so heights compare across runs), within 100 columns."""
    kinds = {"val_ce": "val CE", "loss_ce": "train loss", "max_mean_load": "max/mean load"}
    data = {run.name: {k: series(run, k, axis) for k in kinds} for run in runs}
    x_max = max((xs[-1] for per_run in data.values() for xs, _ in per_run.values() if xs), default=0.0)
    if x_max <= 0:
        return
    name_width = min(16, max(len(run.name) for run in runs))
    width = max(8, min(26, (min(console.width, 100) - name_width) // len(kinds) - 1))
    header = [" " * name_width]
    scales = {}
    for kind, label in kinds.items():
        values = [y for per_run in data.values() for y in per_run[kind][1]]
        scales[kind] = (min(values), max(values)) if values else (0.0, 0.0)
        scale = f"{label} {scales[kind][0]:.2f}-{scales[kind][1]:.2f}" if values else f"{label} -"
        header.append(f"{scale[:width]:<{width}}")
    console.print(f"curves against {AXIS_LABELS[axis]} (0 to {x_max:,.4g}); lower is better:", highlight=False)
    console.print(" ".join(header), style="dim", highlight=False)
    for run in runs:
        cells = [f"{run.name[:name_width]:<{name_width}}"]
        for kind in kinds:
            xs, ys = data[run.name][kind]
            cells.append(blocks(resample(xs, ys, x_max, width), *scales[kind]) if xs
                         else f"{'-' if axis != 'time' or run.has_train_s else 'no train_s':<{width}}")
        console.print(" ".join(cells), markup=False, highlight=False)


def png_size_px(n_moe_runs: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for this many runs with MoE layers."""
    rows = math.ceil(n_moe_runs / LOAD_PANELS_PER_ROW)
    return round(FIG_WIDTH_IN * DPI), round((CURVES_HEIGHT_IN + rows * LOAD_ROW_HEIGHT_IN) * DPI)


def write_compare_png(runs: list[RunRecord], path: str | Path, x: str = "all") -> Path:
    """Val CE (solid) and train loss (faint) against each x axis, then each MoE run's per-layer max/mean load."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    moe_runs = [run for run in runs if any(r.get("layers") for r in run.logs)]
    width_px, height_px = png_size_px(len(moe_runs))
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    rows = 1 + math.ceil(len(moe_runs) / LOAD_PANELS_PER_ROW)
    grid = fig.add_gridspec(rows, LOAD_PANELS_PER_ROW,
                            height_ratios=[CURVES_HEIGHT_IN] + [LOAD_ROW_HEIGHT_IN] * (rows - 1))
    axes = X_AXES if x == "all" else (x,)
    colors = {run.name: f"C{i % 10}" for i, run in enumerate(runs)}
    for i, axis in enumerate(axes):
        ax = fig.add_subplot(grid[0, i] if len(axes) > 1 else grid[0, :])
        _plot_losses(ax, runs, axis, colors, legend=i == 0)
    top_load = max((y for run in moe_runs for y in series(run, "max_mean_load", "steps")[1]), default=2.0)
    for i, run in enumerate(moe_runs):
        ax = fig.add_subplot(grid[1 + i // LOAD_PANELS_PER_ROW, i % LOAD_PANELS_PER_ROW])
        _plot_layer_loads(ax, run, "steps" if x == "all" else x, matplotlib.colormaps["viridis"])
        ax.set_ylim(0.9, max(2.0, top_load * 1.05))  # one scale for all runs: loads compare across panels
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=DPI)
    except OSError as exc:
        raise MoegptError(f"--png: cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out


def _plot_losses(ax, runs: list[RunRecord], axis: str, colors: dict[str, str], legend: bool) -> None:
    missing = []
    for run in runs:
        val_x, val_y = series(run, "val_ce", axis)
        loss_x, loss_y = series(run, "loss_ce", axis)
        if not val_x and not loss_x:
            missing.append(run.name)
            continue
        ax.plot(loss_x, loss_y, color=colors[run.name], alpha=0.3, linewidth=0.8)
        ax.plot(val_x, val_y, color=colors[run.name], marker="o", markersize=3, linewidth=1.6, label=run.name)
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.set_ylabel("cross-entropy (nats)")
    title = "val CE (solid) and train loss (faint)"
    ax.set_title(title + (f"\nno train_s: {', '.join(missing)}" if missing else ""), fontsize=9)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _plot_layer_loads(ax, run: RunRecord, axis: str, colormap) -> None:
    key = AXIS_KEYS[axis]
    layers = sorted({int(e["layer"]) for r in run.logs for e in r.get("layers") or []})
    for j, layer in enumerate(layers):
        points = [(float(r[key]), float(e["max_mean_load"])) for r in run.logs if key in r
                  for e in r.get("layers") or [] if int(e["layer"]) == layer and "max_mean_load" in e]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1.0, label=f"L{layer}",
                color=colormap(j / max(1, len(layers) - 1) * 0.9))
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(f"{run.name}: max/mean expert load per layer (1 = balanced)", fontsize=9)
    ax.set_xlabel(AXIS_LABELS[axis])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=max(1, len(layers) // 4))
