"""`moegpt train`: resolve the config, run the trainer, render progress and a summary."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from moegpt.cli import options as opt
from moegpt.cli.app import app
from moegpt.cli.load_view import MAX_WIDTH, LoadProgress
from moegpt.cli.params import human
from moegpt.errors import MoegptError, TrainingInterrupted
from moegpt.presets import resolve_config
from moegpt.resume import resume_config, saved_config_path
from moegpt.tensorboard_log import TensorBoardLogger, tensorboard_available

Resume = Annotated[str | None, typer.Option(
    "--resume", metavar="[auto]",
    help="Continue the run from its latest checkpoint (error if none); `--resume auto` starts fresh when "
         "there is none.")]


def training_progress(console: Console, n_expert: int = 1, **kwargs: Any) -> LoadProgress:
    """Step counter and ETA first, then a bar, then the figures: at 80 columns the figures are cut first.
    Per-layer load bars, when shown, are drawn below it."""
    return LoadProgress(TextColumn("[bold blue]train"), MofNCompleteColumn(), TimeRemainingColumn(),
                    BarColumn(bar_width=20), TextColumn("{task.fields[info]}", table_column=Column(
                        no_wrap=True, overflow="ellipsis", ratio=1)),
                    console=console, expand=True, n_expert=n_expert, **kwargs)


def progress_info(p: dict[str, Any], last_val: float | None) -> str:
    """The progress bar's figures, most important first (the end is cut on narrow terminals)."""
    return (f"loss {p['loss_ce']:.3f}" + (f" val {last_val:.3f}" if last_val is not None else "")
            + f" {p['tokens_per_s']:,.0f} tok/s lr {p['lr']:.2e} aux {p['loss'] - p['loss_ce']:.4f}")


class TrainRenderer:
    """Turns trainer events into a live progress bar (terminal) or plain log lines (pipes, CI)."""

    def __init__(self, console: Console, max_iters: int, show_load: bool | None = None, threads: int | None = None):
        self.console, self.max_iters, self.threads = console, max_iters, threads
        if not console.is_terminal:
            console.soft_wrap = True  # log lines stay whole in files and pipes
        self.interactive = console.is_terminal
        # per-layer load bars under the progress bar: asked for, or by default in a wide terminal
        self.show_load = self.interactive and (console.width >= MAX_WIDTH if show_load is None else show_load)
        self.progress: LoadProgress | None = None
        self.task = None
        self.last_val: float | None = None

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        getattr(self, f"on_{kind}", lambda p: None)(payload)

    def on_prepare(self, p: dict[str, Any]) -> None:
        self.console.print(f"preparing the built-in corpus into {p['data_dir']} (first run only) ...")

    def on_note(self, p: dict[str, Any]) -> None:
        self.console.print(p["message"])

    def on_start(self, p: dict[str, Any]) -> None:
        cfg, params = p["config"], p["params"]
        m, e, t = cfg["model"], cfg["moe"], cfg["train"]
        facts = p["moe_facts"]
        if not facts["causal"]:  # printed once the run starts: a refused configuration prints only its error
            Console(stderr=True).print(f"[yellow]warning:[/] {e['variant']} is not causal: position t sees later "
                                       "tokens of the batch, so its training loss is optimistic and generation "
                                       "differs from training")
        capacity = f" capacity={facts['capacity_factor']:g}" if facts["capacity_factor"] > 0 else ""
        moe = "dense FFN" if not p["moe_layers"] else (
            f"{e['variant']} E={facts['n_expert']} k={facts['experts_per_token']:g}{capacity} act={e['activation']} "
            f"dispatch={e['dispatch']} MoE layers={p['moe_layers']}")
        threads = f" threads={self.threads}" if self.threads and p["device"] == "cpu" else ""
        if p.get("native_kernel"):  # on CPU: whether the experts run on the native kernels (README, dispatch)
            threads += " kernels=" + ("native" if p["native_kernel"] == "on" else "python")
        self.console.print(f"[bold]run[/] {p['run_dir']}  device={p['device']}{threads} precision={p['precision']}"
                           + (f" ranks={p['world_size']}" if p["world_size"] > 1 else ""))
        trunk = f" {m['arch']}/{m['attention']}" if m.get("arch", "gpt2") != "gpt2" else ""
        self.console.print(f"model: L={m['n_layer']} d={m['n_embd']} heads={m['n_head']} T={m['block_size']} "
                           f"vocab={m['vocab_size']}{trunk} | {moe}")
        self.console.print(f"train: iters={t['max_iters']} batch={t['batch_size']}x{t['grad_accum']} lr={t['lr']} "
                           f"data={cfg['data']['name']} | params total {human(params['total'])}, "
                           f"active/token {human(params['active'])}")
        if p["resumed_from"]:
            self.console.print(f"resumed from {p['resumed_from']} at step {p['start_step']}")
        if self.interactive:
            self.progress = training_progress(self.console, n_expert=facts["n_expert"])
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.max_iters, completed=p["start_step"], info="")

    def on_step(self, p: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=p["step"])

    def on_log(self, p: dict[str, Any]) -> None:
        info = progress_info(p, self.last_val)
        if self.progress is not None:
            self.progress.update(self.task, completed=p["step"], info=info)
            if self.show_load:
                self.progress.show_layers(p["layers"])
        else:
            loads = " ".join(f"{layer['max_mean_load']:.2f}" for layer in p["layers"])
            self.console.print(f"step {p['step']:>6}/{self.max_iters} | {info}"
                               + (f" | max/mean load {loads}" if loads else ""), highlight=False)

    def on_eval(self, p: dict[str, Any]) -> None:
        self.last_val = p["val_ce"]
        if self.progress is None:
            self.console.print(f"step {p['step']:>6}/{self.max_iters} | val_ce {p['val_ce']:.4f} "
                               f"(best {p['best_val_ce']:.4f})", highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_end(self, p: dict[str, Any]) -> None:
        self.stop()
        table = Table(title="training summary", show_header=False)
        table.add_column("what", style="bold")
        table.add_column("value", justify="right")

        def fmt(value: float | None) -> str:
            return f"{value:.4f}" if value is not None else "-"

        table.add_row("best val CE", fmt(p["best_val_ce"]))
        table.add_row("final val CE", fmt(p["final_val_ce"]))
        table.add_row("steps / tokens seen", f"{p['steps']:,} / {p['tokens_seen']:,}")
        table.add_row("wall time", f"{p['wall_s']:.1f} s")
        table.add_row("tokens / s", f"{p['tokens_per_s']:,.0f}")
        table.add_row("params total / active", f"{human(p['params']['total'])} / {human(p['params']['active'])}")
        table.add_row("device / precision", f"{p['device']} / {p['precision']}")
        if p["world_size"] > 1:
            table.add_row("ranks in sync", f"{'yes' if p['ranks_in_sync'] else 'NO'} ({p['world_size']} ranks)")
        table.add_row("run", p["run_dir"])
        self.console.print(table)
        self.console.print(f"next: moegpt sample {p['run_dir']}   |   moegpt inspect-routing {p['run_dir']}")


@app.command("train")
def train_command(
    preset: opt.Preset = "cpu", config: opt.ConfigFile = None, set_: opt.Sets = None,
    moe: opt.Moe = None, n_expert: opt.NExpert = None, top_k: opt.TopK = None,
    expert_hidden: opt.ExpertHidden = None, activation: opt.Activation = None,
    capacity_factor: opt.CapacityFactor = None, dispatch: opt.Dispatch = None, n_layer: opt.NLayer = None,
    n_head: opt.NHead = None, n_embd: opt.NEmbd = None, block_size: opt.BlockSize = None,
    data: Annotated[str | None, typer.Option("--data", help="Prepared data folder name under --data-root "
                                                            "(default stdlib, prepared on first use).")] = None,
    data_root: Annotated[str | None, typer.Option("--data-root", help="Where prepared data lives.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Run name: writes runs/NAME/ (default: the variant, "
                                                            "made unique).")] = None,
    max_iters: Annotated[int | None, typer.Option("--max-iters", help="Optimizer steps.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per micro-batch.")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum", help="Micro-batches per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Peak learning rate.")] = None,
    warmup_iters: Annotated[int | None, typer.Option("--warmup-iters", help="Linear warmup steps.")] = None,
    eval_interval: Annotated[int | None, typer.Option("--eval-interval", help="Steps between evaluations.")] = None,
    log_interval: Annotated[int | None, typer.Option("--log-interval", help="Steps between log records.")] = None,
    ckpt_interval: Annotated[int | None, typer.Option("--ckpt-interval", help="Steps between checkpoints.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Random seed.")] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto (cuda > mps > cpu), cpu, cuda[:N], mps.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="auto, fp32 or bf16 (autocast; router "
                                                                      "and losses stay fp32).")] = None,
    compile_: Annotated[bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = None,
    resume: Resume = None,
    show_load: Annotated[bool | None, typer.Option(
        "--show-load/--no-show-load", show_default=False,
        help="Per-layer max/mean expert load bars under the progress bar, updated at log steps (default: on "
             "in a terminal of 100+ columns; never when output is not a terminal).")] = None,
    log: Annotated[str | None, typer.Option(
        "--log", metavar="tensorboard", help="Also log to TensorBoard under runs/NAME/tensorboard/ (needs the "
                                             "\\[tb] extra); metrics.jsonl is written either way.")] = None,
    threads: opt.Threads = "auto",
    runs_root: Annotated[str | None, typer.Option("--runs-root", help="Where run folders live (default runs).")] = None,
    dropout: Annotated[float | None, typer.Option("--dropout", help="Dropout probability (default 0).")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="AdamW weight decay of the "
                                                                              "matrices.")] = None,
    beta2: Annotated[float | None, typer.Option("--beta2", help="AdamW beta2.")] = None,
    grad_clip: Annotated[float | None, typer.Option("--grad-clip", help="Gradient norm clip; 0 = off.")] = None,
    eval_iters: Annotated[int | None, typer.Option("--eval-iters", help="Validation batches per "
                                                                        "evaluation.")] = None,
    lr_decay_iters: Annotated[int | None, typer.Option(
        "--lr-decay-iters", help="Step where the cosine decay reaches its floor (0 = max-iters).")] = None,
    min_lr_ratio: Annotated[float | None, typer.Option("--min-lr-ratio", help="Floor of the cosine decay, as a "
                                                                              "fraction of --lr.")] = None,
    expert_parallel: Annotated[int | None, typer.Option(
        "--expert-parallel", help="Split each MoE layer's experts over this many processes (launch with torchrun; "
                                  "must divide the process count and n_expert). --batch-size is then the global "
                                  "batch, split over all processes.")] = None,
) -> None:
    """Train a model and write runs/NAME/ (config.toml, metrics.jsonl, ckpt/).

    Config precedence: --preset, then --config FILE, then the flags you pass, then --set. With no
    arguments it trains the default CPU MoE (8 experts, top-2, aux-free routing) on the built-in corpus,
    preparing it on first use. Ctrl-C saves a checkpoint; continue with --name NAME --resume, which starts
    from the run's saved config (flags given with it change only what resuming allows).
    """
    from moegpt.threads import apply_threads  # here, not at import: `--help` must not wait for torch
    from moegpt.train import Trainer

    flags = opt.model_flags(moe=moe, n_expert=n_expert, top_k=top_k, expert_hidden=expert_hidden,
                            activation=activation, capacity_factor=capacity_factor, dispatch=dispatch,
                            n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
    flags.update({"data.name": data, "data.data_root": data_root, "train.name": name,
                  "train.max_iters": max_iters, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
                  "train.lr": lr, "train.warmup_iters": warmup_iters, "train.eval_interval": eval_interval,
                  "train.log_interval": log_interval, "train.ckpt_interval": ckpt_interval, "train.seed": seed,
                  "train.device": device, "train.precision": precision, "train.compile": compile_,
                  "train.runs_root": runs_root, "model.dropout": dropout, "train.weight_decay": weight_decay,
                  "train.beta2": beta2, "train.grad_clip": grad_clip, "train.eval_iters": eval_iters,
                  "train.lr_decay_iters": lr_decay_iters, "train.min_lr_ratio": min_lr_ratio,
                  "train.expert_parallel": expert_parallel})
    if resume not in (None, "yes", "auto"):
        raise MoegptError(f"--resume takes no value or 'auto' (got {resume!r})")
    if log not in (None, "tensorboard"):
        raise MoegptError(f"--log supports only tensorboard (got {log!r})")
    if log and not tensorboard_available():
        raise MoegptError("--log tensorboard needs the tensorboard package: pip install 'moegpt[tb]'")
    cfg = resolve_config(preset, config, flags, set_)
    if resume is not None and config is None and (saved := saved_config_path(cfg)) is not None:
        given = {key for key, value in flags.items() if value is not None} | \
            {s.split("=", 1)[0].strip() for s in set_ or []}
        cfg = resume_config(resolve_config(preset, str(saved), flags, set_), given)
    console = Console()
    renderer = TrainRenderer(console, cfg.train.max_iters, show_load, threads=apply_threads(threads))
    callbacks = [renderer] + ([TensorBoardLogger()] if log else [])

    def on_event(kind: str, payload: dict[str, Any]) -> None:
        for callback in callbacks:
            callback(kind, payload)

    try:
        Trainer(cfg, resume=resume or "no", on_event=on_event).run()
    except TrainingInterrupted as stop:
        renderer.stop()
        where = f"checkpoint saved: {stop.checkpoint}; " if stop.checkpoint else ""
        runs_root = "" if cfg.train.runs_root == "runs" else f" --runs-root {cfg.train.runs_root}"
        print(f"moegpt: interrupted (signal {stop.signum}); {where}continue with "
              f"`moegpt train --name {cfg.train.name}{runs_root} --resume`", file=sys.stderr)
        raise typer.Exit(128 + stop.signum) from None
    finally:
        renderer.stop()
        for callback in callbacks[1:]:
            callback.close()
