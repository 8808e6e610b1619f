"""`moegpt train`: resolve the config, run the trainer, render progress and a summary."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from moegpt.cli import options as opt
from moegpt.cli.app import app
from moegpt.cli.params import human
from moegpt.errors import MoegptError, TrainingInterrupted
from moegpt.moe import is_causal_variant
from moegpt.presets import resolve_config
from moegpt.train import Trainer

Resume = Annotated[str | None, typer.Option(
    "--resume", metavar="[auto]",
    help="Continue the run from its latest checkpoint (error if none); `--resume auto` starts fresh when "
         "there is none.")]


class TrainRenderer:
    """Turns trainer events into a live progress bar (terminal) or plain log lines (pipes, CI)."""

    def __init__(self, console: Console, max_iters: int):
        self.console, self.max_iters = console, max_iters
        if not console.is_terminal:
            console.soft_wrap = True  # log lines stay whole in files and pipes
        self.interactive = console.is_terminal
        self.progress: Progress | None = None
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
        moe = "dense FFN" if e["variant"] == "dense" else (
            f"{e['variant']} E={e['n_expert']} k={e['top_k']} act={e['activation']} dispatch={e['dispatch']} "
            f"MoE layers={p['moe_layers']}")
        self.console.print(f"[bold]run[/] {p['run_dir']}  device={p['device']} precision={p['precision']}"
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
            self.progress = Progress(
                TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.max_iters, completed=p["start_step"], info="")

    def on_log(self, p: dict[str, Any]) -> None:
        aux = p["loss"] - p["loss_ce"]
        info = (f"loss {p['loss_ce']:.3f} aux {aux:.4f} lr {p['lr']:.2e} {p['tokens_per_s']:,.0f} tok/s"
                + (f" val {self.last_val:.3f}" if self.last_val is not None else ""))
        if self.progress is not None:
            self.progress.update(self.task, completed=p["step"], info=info)
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
) -> None:
    """Train a model and write runs/NAME/ (config.toml, metrics.jsonl, ckpt/).

    Config precedence: --preset, then --config FILE, then the flags you pass, then --set. With no
    arguments it trains the default CPU MoE (8 experts, top-2) on the built-in corpus, preparing it
    on first use. Ctrl-C saves a checkpoint; continue with --name NAME --resume.
    """
    flags = opt.model_flags(moe=moe, n_expert=n_expert, top_k=top_k, expert_hidden=expert_hidden,
                            activation=activation, capacity_factor=capacity_factor, dispatch=dispatch,
                            n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size)
    flags.update({"data.name": data, "data.data_root": data_root, "train.name": name,
                  "train.max_iters": max_iters, "train.batch_size": batch_size, "train.grad_accum": grad_accum,
                  "train.lr": lr, "train.warmup_iters": warmup_iters, "train.eval_interval": eval_interval,
                  "train.log_interval": log_interval, "train.ckpt_interval": ckpt_interval, "train.seed": seed,
                  "train.device": device, "train.precision": precision, "train.compile": compile_})
    if resume not in (None, "yes", "auto"):
        raise MoegptError(f"--resume takes no value or 'auto' (got {resume!r})")
    cfg = resolve_config(preset, config, flags, set_)
    console = Console()
    if not is_causal_variant(cfg.moe.variant):
        console.print(f"[yellow]warning:[/] {cfg.moe.variant} is not causal: position t sees later tokens of the "
                      "batch, so its training loss is optimistic and generation differs from training")
    renderer = TrainRenderer(console, cfg.train.max_iters)
    try:
        Trainer(cfg, resume=resume or "no", on_event=renderer).run()
    except TrainingInterrupted as stop:
        renderer.stop()
        where = f"checkpoint saved: {stop.checkpoint}; " if stop.checkpoint else ""
        print(f"moegpt: interrupted (signal {stop.signum}); {where}continue with "
              f"`moegpt train --name {cfg.train.name} --resume`", file=sys.stderr)
        raise typer.Exit(128 + stop.signum) from None
    finally:
        renderer.stop()
