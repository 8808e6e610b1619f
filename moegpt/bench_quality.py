"""`moegpt bench quality`: train named configurations ("cases") on the same data, seed, steps and evaluation
schedule, and compare their validation cross-entropy at equal steps and at equal training time, each as a
difference to the first case."""

from __future__ import annotations

import re
import tempfile
from typing import Any

from moegpt.bench import machine_info
from moegpt.compare import interpolate
from moegpt.config import RunConfig, apply_override
from moegpt.errors import MoegptError

CASE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
CASE_SYNTAX = "NAME:section.key=value[,section.key=value...]"
# What makes the comparison fair: every case sees the same batches in the same order (data, seed, batch
# shape) for the same steps, evaluated on the same held-out windows at the same steps.
SHARED_KEYS = ("data.name", "data.data_root", "train.seed", "train.batch_size", "train.grad_accum",
               "model.block_size", "model.vocab_size", "train.max_iters", "train.eval_interval", "train.eval_iters")


class CaseError(MoegptError):
    """A case that cannot be built: bad syntax or assignments, a duplicate name, an invalid config."""


def parse_case(text: str) -> tuple[str, list[str]]:
    """`NAME:section.key=value,...` -> (NAME, its assignments). `NAME:` alone is the base config unchanged."""
    name, colon, assignments = text.partition(":")
    name = name.strip()
    if not colon or not CASE_NAME.fullmatch(name):
        raise CaseError(f"case {text!r} must look like {CASE_SYNTAX} (NAME: letters, digits, _ . + -)")
    items = [item.strip() for item in assignments.split(",")] if assignments.strip() else []
    if any(not item for item in items):
        raise CaseError(f"case {name!r} has an empty assignment in {text!r}; expected {CASE_SYNTAX}")
    return name, items


def parse_cases(texts: list[str]) -> dict[str, list[str]]:
    """Several `parse_case` texts -> {name: assignments}, in order; a name given twice is an error."""
    cases: dict[str, list[str]] = {}
    for text in texts:
        name, assignments = parse_case(text)
        if name in cases:
            raise CaseError(f"duplicate case name {name!r}: each case needs its own name")
        cases[name] = assignments
    return cases


def _shared(cfg: RunConfig, dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return getattr(getattr(cfg, section), key)


def case_config(base: RunConfig, name: str, assignments: list[str], steps: int, evals: int) -> RunConfig:
    """The base config with the case's assignments applied (parsed and checked like `--set`) and the benchmark's
    schedule (`steps` steps, `evals` evaluations), validated; errors name the case."""
    from moegpt.moe import validate_run_config  # the registry imports torch

    cfg = RunConfig.from_dict(base.to_dict())
    try:
        for assignment in assignments:
            apply_override(cfg, assignment, origin="override")
        changed = [key for key in SHARED_KEYS if _shared(cfg, key) != _shared(base, key)]
        if changed:
            raise MoegptError(f"sets {', '.join(changed)}, which every case shares (the same data, seed, batches, "
                              "steps and evaluations); set it for all cases instead")
        cfg.train.max_iters = steps
        cfg.train.eval_interval = max(1, steps // max(1, evals))
        cfg.train.ckpt_interval = steps
        cfg.train.name = name
        return validate_run_config(cfg)
    except MoegptError as err:
        raise CaseError(f"case {name!r}: {err}") from None


def differences_to_first(values: list[float | None]) -> list[float | None]:
    """Each value minus the first (negative: lower val CE than the first case); None where either is None."""
    first = values[0]
    return [None if value is None or first is None else round(value - first, 4) for value in values]


def equal_time_val_ce(curves: list[list[tuple[float, float]]]) -> tuple[float, list[float | None]]:
    """The training-time budget every run reached (the shortest run's last evaluation, in train_s: seconds of
    optimizer steps, evaluation and checkpoints excluded) and each run's val CE there, interpolated linearly
    between its evaluations; None for a run whose first evaluation came after the budget."""
    budget = min(curve[-1][0] for curve in curves)
    values = [interpolate([t for t, _ in curve], [ce for _, ce in curve], budget) for curve in curves]
    return budget, values


def quality_columns(final_val_ce: list[float], curves: list[list[tuple[float, float]]]) -> dict[str, Any]:
    """From each case's final val CE (equal steps) and (train_s, val CE) evaluation curve: the equal-time budget,
    the index of the case that set it, and per case its val CE at equal steps and at equal time, each also
    minus the first case's. Differences are of the rounded values, so that a table's columns agree."""
    budget, at_budget = equal_time_val_ce(curves)
    at_steps = [round(value, 4) for value in final_val_ce]
    at_time = [None if value is None else round(value, 4) for value in at_budget]
    columns = zip(at_steps, differences_to_first(at_steps), at_time, differences_to_first(at_time), strict=True)
    return {"equal_time_s": budget, "budget_case": min(range(len(curves)), key=lambda i: curves[i][-1][0]),
            "rows": [{"val_ce": s, "val_ce_minus_first": ds, "val_ce_at_equal_time": t,
                      "val_ce_at_equal_time_minus_first": dt} for s, ds, t, dt in columns]}


def _train_case(cfg: RunConfig, name: str, on_event) -> tuple[dict[str, Any], list[tuple[float, float]], float]:
    """Train one case: (its row of speed, size and load, its (train_s, val CE) evaluation curve, its final val CE)."""
    from moegpt.train import Trainer

    last_log: dict[str, Any] = {}
    curve: list[tuple[float, float]] = []

    def capture(kind: str, payload: dict[str, Any]) -> None:
        if kind == "log":
            last_log.update(payload)
        elif kind == "eval":
            curve.append((float(payload["train_s"]), float(payload["val_ce"])))
        if on_event:
            on_event(kind, {**payload, "case": name})
    summary = Trainer(cfg, on_event=capture).run()
    row = {"case": name, "variant": cfg.moe.variant, "train_s": round(curve[-1][0], 1),
           "tokens_per_s": round(summary["tokens_per_s"], 1),
           "wall_s": round(summary["wall_s"], 1), "active_params": summary["params"]["active"],
           "total_params": summary["params"]["total"],
           "max_mean_load": max((lay["max_mean_load"] for lay in last_log.get("layers", [])), default=None)}
    return row, curve, summary["final_val_ce"]


def bench_quality(base_cfg: RunConfig, cases: dict[str, list[str]], steps: int, on_event=None,
                  evals: int = 10) -> dict[str, Any]:
    """Train each case (base_cfg with the case's `section.key=value` assignments) for the same steps on the same
    data with the same seed, evaluating `evals` times; val CE at equal steps and at equal training time (see
    `equal_time_val_ce`), each minus the first case's, speed, size and load. Every case's config is built and
    validated before the first one trains. on_event(kind, payload) sees the trainer's events, with "case"."""
    if not cases:
        raise MoegptError("no cases to compare")
    configs = {name: case_config(base_cfg, name, assignments, steps, evals) for name, assignments in cases.items()}
    rows, curves, final_val_ce = [], [], []
    with tempfile.TemporaryDirectory(prefix="moegpt-quality-") as runs_root:
        for name, cfg in configs.items():
            cfg.train.runs_root = runs_root
            row, curve, final = _train_case(cfg, name, on_event)
            rows.append({**row, "overrides": cases[name]})
            curves.append(curve)
            final_val_ce.append(final)
    quality = quality_columns(final_val_ce, curves)
    rows = [{**row, **columns} for row, columns in zip(rows, quality["rows"], strict=True)]
    return {"machine": machine_info(), "steps": steps, "equal_time_s": round(quality["equal_time_s"], 1),
            "equal_time_case": rows[quality["budget_case"]]["case"], "rows": rows}
