"""Routing over training: per-layer load imbalance, drops and entropy from a run's metrics.jsonl.

The trainer writes one record per log step with "layers": [{"layer", "balance", "z", "max_mean_load",
"drop_frac", "router_entropy"}] (see moegpt/train.py) and one per evaluation with "val_ce". Those are
single training batches, so the series are noisy; they are meant to show trends such as collapse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moegpt.safe_io import read_step_records

SERIES_KEYS = ("max_mean_load", "drop_frac", "router_entropy", "balance")
SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def training_history(run_dir: str | Path) -> dict[str, Any] | None:
    """{"steps": [...], "layers": [{"layer", "max_mean_load": [...], ...}], "val": [{"step", "val_ce"}]},
    or None when the run has no metrics.jsonl. Unreadable lines are skipped (a run killed mid-write)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None
    steps: list[int] = []
    per_layer: dict[int, dict[str, list[float | None]]] = {}
    val: list[dict[str, float]] = []
    for record in read_step_records(path)[0]:
        if "val_ce" in record:
            val.append({"step": int(record["step"]), "val_ce": float(record["val_ce"])})
        if "loss_ce" not in record:
            continue
        i = len(steps)
        steps.append(int(record["step"]))
        for entry in record.get("layers", []):
            series = per_layer.setdefault(int(entry["layer"]), {k: [] for k in SERIES_KEYS})
            for key in SERIES_KEYS:
                values = series[key]
                values.extend([None] * (i - len(values)))  # a layer missing from earlier records
                value = entry.get(key)
                values.append(None if value is None else float(value))
    for series in per_layer.values():
        for values in series.values():
            values.extend([None] * (len(steps) - len(values)))
    layers = [{"layer": layer, **series} for layer, series in sorted(per_layer.items())]
    return {"steps": steps, "layers": layers, "val": val}


def sparkline(values: list[float | None], width: int = 40, lo: float | None = None,
              hi: float | None = None) -> str:
    """Unicode block sparkline of at most `width` characters (values averaged into buckets; gaps = space)."""
    if not values:
        return ""
    buckets: list[float | None] = []
    n = len(values)
    for b in range(min(width, n)):
        chunk = [v for v in values[b * n // min(width, n):(b + 1) * n // min(width, n)] if v is not None]
        buckets.append(sum(chunk) / len(chunk) if chunk else None)
    known = [v for v in buckets if v is not None]
    if not known:
        return " " * len(buckets)
    lo = min(known) if lo is None else lo
    hi = max(known) if hi is None else hi
    span = hi - lo
    out = []
    for v in buckets:
        if v is None:
            out.append(" ")
        else:
            level = 0 if span <= 0 else int(round((min(max(v, lo), hi) - lo) / span * (len(SPARK_BLOCKS) - 1)))
            out.append(SPARK_BLOCKS[level])
    return "".join(out)
