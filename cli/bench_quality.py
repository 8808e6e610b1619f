"""`moegpt bench quality`: named configurations trained alike, val CE at equal steps and equal time."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console

from moegpt.cli import options as opt
from moegpt.cli.bench import Format, Wide, bench_app, check_format, name_list, registered_variants, render
from moegpt.errors import MoegptError
from moegpt.presets import resolve_config
from moegpt.threads import apply_threads

CASE_HELP = ("A named configuration to compare (repeatable; not with --variants): the preset and every --set, "
             "then the case's own comma-separated assignments, e.g. e8k1:moe.top_k=1,moe.expert_hidden=512. The "
             "first case is the baseline of the minus-first columns.")


@bench_app.command("quality")
def bench_quality_command(
    preset: Annotated[str, typer.Option("--preset", help="Model and training preset.")] = "cpu",
    variants: Annotated[str | None, typer.Option("--variants", help="Comma-separated variants, each a case named "
                                                 "after it (default: dense,topk).")] = None,
    cases: Annotated[list[str] | None, typer.Option("--case", metavar="NAME:KEY=VALUE,...",
                                                               help=CASE_HELP)] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps per case.")] = 500,
    evals: Annotated[int, typer.Option("--evals", min=1, help="Evaluations per run, evenly spaced: the points "
                                       "between which the equal-time val CE is interpolated.")] = 10,
    sets: Annotated[list[str] | None, typer.Option("--set", help="Config overrides section.key=value, common "
                                                   "to every case (repeatable).")] = None,
    fmt: Format = "table", threads: opt.Threads = "auto", wide: Wide = False,
) -> None:
    """Train each case (by default the variants dense and topk, at equal active params) for the same steps on
    the same data with the same seed and evaluation schedule: val CE, speed, load.

    val_ce is at equal steps (the last step); val_ce_at_equal_time at equal training time: the training
    seconds (optimizer steps only, evaluation and checkpoints excluded) of the run that finished first (the
    table's title names it), each run's val CE there interpolated linearly between its evaluations (none
    before a run's first). The "minus first" columns are each value minus the first case's: negative is better.

    A sweep of named configurations, e.g. a dense baseline vs MoE layouts: moegpt bench quality --steps 1400
    --case dense:moe.variant=dense --case e8k1:moe.top_k=1,moe.expert_hidden=512 --case
    shared16k4:moe.variant=shared,moe.n_expert=16,moe.top_k=4. A case may not change what every case shares
    (data, seed, batch and block size, steps, evaluations): give those with --set. Every case is checked
    before the first one trains."""
    from moegpt.bench_quality import CaseError, bench_quality

    check_format(fmt)
    apply_threads(threads)
    named = _quality_cases(variants, cases)
    cfg = resolve_config(preset, sets=sets, validate=not cases)  # with --case, each case is validated whole
    try:
        result = bench_quality(cfg, named, steps, on_event=_progress_printer(steps), evals=evals)
    except CaseError as err:  # raised before any training
        raise MoegptError(f"{'--case' if cases else '--variants'}: {err}") from None
    render(result, fmt, f"moegpt bench quality ({steps} steps; equal time: {result['equal_time_s']} s of "
                        f"training, {result['equal_time_case']}'s)",
           [*(["case"] if cases else []), "variant", "val_ce", "val_ce_minus_first", "val_ce_at_equal_time",
            "val_ce_at_equal_time_minus_first", "train_s", "tokens_per_s", "active_params", "total_params",
            "max_mean_load"], wide=wide, compact=True)


def _quality_cases(variants: str | None, cases: list[str] | None) -> dict[str, list[str]]:
    """{case name: its assignments} from --case, or one case per --variants name (moe.variant=NAME)."""
    from moegpt.bench_quality import CaseError, parse_cases

    if cases and variants is not None:
        raise MoegptError("--case and --variants do not combine: give each variant as a case, e.g. "
                          "--case dense:moe.variant=dense")
    if cases:
        try:
            return parse_cases(cases)
        except CaseError as err:
            raise MoegptError(f"--case: {err}") from None
    names = name_list(variants or "dense,topk", list(registered_variants()), "variant")
    return {name: [f"moe.variant={name}"] for name in dict.fromkeys(names)}


def _progress_printer(steps: int):
    """on_event for bench_quality: every tenth step's loss and speed, and every evaluation, on stderr."""
    console = Console(stderr=True)
    every = max(1, steps // 10)

    def progress(kind: str, payload: dict[str, Any]) -> None:
        if kind == "log" and payload["step"] % every == 0:
            console.print(f"{payload['case']}: step {payload['step']}/{steps} loss {payload['loss_ce']:.3f} "
                          f"{payload['tokens_per_s']:,.0f} tok/s", highlight=False)
        elif kind == "eval":
            console.print(f"{payload['case']}: step {payload['step']} val_ce {payload['val_ce']:.4f}",
                          highlight=False)
    return progress
