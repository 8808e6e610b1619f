"""A leaderboard over training runs: one row per run, ranked by a chosen column, best cells marked.

Runs are compared only with runs on the same data and tokenizer (`DataIdentity.key`); each such group
is ranked on its own and the leaderboard says so. Within a group two columns put runs on an equal
footing, by linear interpolation of the evaluation records:
  - equal steps: val CE at the last evaluated step of the group's shortest run;
  - equal time: val CE at the training time (train_s: seconds of optimizer steps, evaluation and
    checkpoints excluded) of the group's shortest run's last evaluation. Runs whose records lack
    train_s have no value there.
Two values tie when they are equal at the precision the table shows (DISPLAY_DIGITS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from moegpt.errors import MoegptError

if TYPE_CHECKING:  # run_metrics and the registry import torch; `moegpt compare --help` must not
    from moegpt.run_metrics import RunRecord

SCHEMA = "moegpt.compare-leaderboard v1"

# sort key -> (row column, True when larger is better)
SORT_KEYS: dict[str, tuple[str, bool]] = {
    "equal-steps": ("val_ce_at_equal_steps", False),
    "equal-time": ("val_ce_at_equal_time", False),
    "best": ("best_val_ce", False),
    "final": ("final_val_ce", False),
    "tokens-per-s": ("tokens_per_s", True),
    "wall": ("wall_s", False),
}
# columns with a "best" cell, and whether larger is better
RANKED_COLUMNS: dict[str, bool] = {
    "best_val_ce": False, "final_val_ce": False, "val_ce_at_equal_steps": False, "val_ce_at_equal_time": False,
    "tokens_per_s": True, "max_mean_load": False, "drop_frac": False, "wall_s": False,
}
DISPLAY_DIGITS: dict[str, int] = {
    "best_val_ce": 4, "final_val_ce": 4, "val_ce_at_equal_steps": 4, "val_ce_at_equal_time": 4,
    "tokens_per_s": 0, "max_mean_load": 2, "drop_frac": 3, "wall_s": 1, "train_s": 1,
}


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float | None:
    """Piecewise-linear y at x through the points (xs ascending); None outside [xs[0], xs[-1]]."""
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y1 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return float(ys[0])  # a single point, exactly at x


def val_curve(run: RunRecord, axis: str) -> tuple[list[float], list[float]]:
    """(x, val CE) of the run's evaluations, x = "step", "tokens" or "train_s" (records lacking it dropped)."""
    points = [(float(r[axis]), float(r["val_ce"])) for r in run.evals if axis in r]
    return [p[0] for p in points], [p[1] for p in points]


def equal_points(runs: list[RunRecord]) -> tuple[int | None, float | None]:
    """(step, train_s) where the group's shortest run had its last evaluation."""
    ends = [run.evals[-1] for run in runs if run.evals]
    step = min((int(e["step"]) for e in ends), default=None)
    timed = [float(run.evals[-1]["train_s"]) for run in runs if run.evals and run.has_train_s]
    return step, min(timed, default=None)


def _end_of_training(run: RunRecord) -> dict[str, Any]:
    """Load, drops, speed and time from the last log record."""
    last_log = run.logs[-1] if run.logs else {}
    layers = last_log.get("layers") or []
    loads = [float(entry["max_mean_load"]) for entry in layers if "max_mean_load" in entry]
    drops = [float(entry["drop_frac"]) for entry in layers if "drop_frac" in entry]
    last = run.last
    if run.has_train_s and float(last["train_s"]) > 0:
        speed = float(last["tokens"]) / float(last["train_s"])
    else:  # older runs: the mean of the logged windows
        windows = [float(r["tokens_per_s"]) for r in run.logs if "tokens_per_s" in r]
        speed = sum(windows) / len(windows) if windows else None
    return {"max_mean_load": max(loads) if loads else None, "drop_frac": sum(drops) / len(drops) if drops else None,
            "tokens_per_s": speed, "train_s": last.get("train_s"), "wall_s": last.get("wall_s")}


def leaderboard_row(run: RunRecord, equal_step: int | None, equal_train_s: float | None) -> dict[str, Any]:
    """Every column of one run's row (None = not available); notes say why a value is missing."""
    from moegpt.moe import experts_per_token, moe_layer_indices

    moe, last = run.config.moe, run.last
    routed = bool(moe_layer_indices(moe, run.config.model.n_layer))
    steps, vals = val_curve(run, "step")
    row: dict[str, Any] = {
        "run": run.name, "path": str(run.path), "variant": moe.variant,
        "n_expert": moe.n_expert if routed else None,
        "experts_per_token": experts_per_token(moe, run.config.model.block_size) if routed else None,
        "params_active": run.params["active"], "params_total": run.params["total"],
        "steps": int(last["step"]), "tokens": int(last["tokens"]) if "tokens" in last else None,
        "best_val_ce": min(vals) if vals else None, "final_val_ce": vals[-1] if vals else None,
        "val_ce_at_equal_steps": None if equal_step is None else interpolate(steps, vals, equal_step),
        "val_ce_at_equal_time": None, **_end_of_training(run), "notes": [],
    }
    if run.has_train_s and equal_train_s is not None:
        row["val_ce_at_equal_time"] = interpolate(*val_curve(run, "train_s"), equal_train_s)
        if row["val_ce_at_equal_time"] is None and run.evals:
            row["notes"].append(f"first evaluated after {run.evals[0]['train_s']:.3g} s of training: "
                                "nothing to interpolate at equal time")
    elif not run.has_train_s:
        row["notes"].append("no train_s in its metrics (trained before moegpt recorded it): equal-time unavailable")
    if not vals:
        row["notes"].append("no evaluation yet")
    if run.torn_tail:
        row["notes"].append("last line incomplete (still training?): ignored")
    if run.skipped_lines:
        row["notes"].append(f"{run.skipped_lines} unreadable line(s) skipped")
    return row


def _display_value(column: str, value: float | None) -> float | None:
    return None if value is None else round(float(value), DISPLAY_DIGITS.get(column, 4))


def rank_rows(rows: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    """Sort by the sort key's column (missing values last), then set rank (shared by ties), tied, best."""
    column, larger_better = SORT_KEYS[sort]

    def key(row: dict[str, Any]) -> tuple[bool, float, str]:
        value = _display_value(column, row[column])
        return (value is None, 0.0 if value is None else (-value if larger_better else value), row["run"])

    rows = sorted(rows, key=key)
    shown = [key(row) for row in rows]
    for row, (missing, value, _) in zip(rows, shown, strict=True):
        # competition ranking: 1 + the rows strictly better; equal shown values share a rank
        row["rank"] = None if missing else 1 + sum(1 for m, v, _ in shown if not m and v < value)
        row["tied"] = not missing and sum(1 for m, v, _ in shown if not m and v == value) > 1
    for col, col_larger_better in RANKED_COLUMNS.items():
        shown = [_display_value(col, r[col]) for r in rows]
        known = [v for v in shown if v is not None]
        best = (max if col_larger_better else min)(known) if known else None
        for row, value in zip(rows, shown, strict=True):
            if best is not None and value == best and len(known) > 1:
                row.setdefault("best_in", []).append(col)
    for row in rows:
        row.setdefault("best_in", [])
    return rows


def group_runs(runs: list[RunRecord]) -> list[list[RunRecord]]:
    """Runs grouped by data identity: the largest group first, then by first appearance."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.data.key, []).append(run)
    order = list(groups)
    return sorted(groups.values(), key=lambda g: (-len(g), order.index(g[0].data.key)))


def leaderboard(runs: list[RunRecord], sort: str = "equal-steps") -> dict[str, Any]:
    """{"schema", "sort", "groups": [{id, data, runs, equal_step, equal_train_s}], "rows": [...]}.

    Rows are ordered group by group; `rank`, `tied` and `best_in` hold within the row's group only.
    """
    if sort not in SORT_KEYS:
        raise MoegptError(f"unknown sort key {sort!r}; valid: {', '.join(SORT_KEYS)}")
    groups_out, rows_out = [], []
    for i, members in enumerate(group_runs(runs)):
        group_id = _group_letter(i)
        equal_step, equal_train_s = equal_points(members)
        rows = [leaderboard_row(run, equal_step, equal_train_s) for run in members]
        for row in rows:
            row["group"] = group_id
        rows_out += rank_rows(rows, sort)
        groups_out.append({"id": group_id, "data": members[0].data.describe(), "runs": len(members),
                           "equal_step": equal_step, "equal_train_s": equal_train_s})
    return {"schema": SCHEMA, "sort": sort, "groups": groups_out, "rows": rows_out}


def _group_letter(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < len(letters) else f"G{i + 1}"
