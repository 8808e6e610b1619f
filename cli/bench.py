"""`moegpt bench layer|model|sample|quality`: measured on this machine, ratios from one process."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from moegpt.cli import options as opt
from moegpt.cli.app import app
from moegpt.config import DISPATCH_BACKENDS, precision_problem
from moegpt.errors import MoegptError
from moegpt.presets import resolve_config
from moegpt.threads import apply_threads

if TYPE_CHECKING:
    import torch

bench_app = typer.Typer(help="Benchmarks measured on this machine: MoE layer vs dense, model training throughput, "
                             "KV-cache generation, equal-steps quality, expert-parallel scaling.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

Format = Annotated[str, typer.Option("--format", help="table (default) or json.")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda[:N], mps.")]
Wide = Annotated[bool, typer.Option("--wide", help="Full column names and no width limit (tables fit 100 "
                                                   "columns otherwise; --format json has every field).")]


def int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MoegptError(f"{what} must be comma-separated integers (got {text!r})") from None
    if not values or any(v <= 0 for v in values):
        raise MoegptError(f"{what} must be positive integers (got {text!r})")
    return values


def registered_variants() -> dict:
    from moegpt.moe import VARIANTS  # here, not at import: `--help` must not wait for torch

    return VARIANTS


def name_list(text: str, valid: tuple[str, ...] | list[str], what: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        raise MoegptError(f"unknown {what}: {', '.join(bad) or '(none)'}; valid: {', '.join(valid)}")
    return names


def check_format(fmt: str) -> None:
    if fmt not in ("table", "json"):
        raise MoegptError(f"--format must be table or json (got {fmt!r})")


# Short table headings, so that the tables fit 100 columns; --wide and JSON keep the full names.
SHORT_HEADINGS = {"n_tokens": "N", "d_model": "d", "n_expert": "E", "top_k": "k", "ratio_to_dense": "x dense",
                  "gflops": "GF/s", "frac_of_peak": "of peak", "memory_ratio_to_dense": "mem x dense",
                  "ms_per_step": "ms/step", "tokens_per_s": "tokens/s", "ratio_to_first": "x first",
                  "total_params": "total params", "active_params": "active params",
                  "kv_cache_speedup": "KV speedup", "max_mean_load": "max/mean load",
                  "fixed_ms_per_moe_layer": "fixed ms/MoE layer", "val_ce_at_equal_time": "val CE equal time",
                  "train_s": "train s", "val_ce_minus_first": "minus\nfirst",
                  "val_ce_at_equal_time_minus_first": "minus\nfirst"}
TABLE_WIDTH = 100


def render(result: dict[str, Any], fmt: str, title: str, columns: list[str], wide: bool = False,
           compact: bool = False) -> None:
    """A table of result["rows"] (or JSON of the whole result); compact: rules only under the header, for
    tables with too many columns for the boxed style to fit 100 columns."""
    if fmt == "json":
        print(json.dumps(result, indent=2))
        return
    m = result["machine"]
    header = (f"{m['cpu']} | {m.get('gpu', 'no GPU')} | torch {m['torch']} | {m['threads']} threads"
              + (f" ({m['omp_wait_policy']} wait)" if m.get("omp_wait_policy") else "")
              + (f" | native kernel {m['native_kernel']}" if m.get("native_kernel") else ""))
    extra = {k: v for k, v in result.items() if k not in ("machine", "rows")}
    style = {"box": box.SIMPLE_HEAD, "show_edge": False, "padding": (0, 0)} if compact else {}
    table = Table(title=title, caption=header + (" | " + " ".join(f"{k}={v}" for k, v in extra.items())
                                                  if extra else ""), **style)
    for col in columns:
        table.add_column(col if wide else SHORT_HEADINGS.get(col, col),
                         justify="left" if col in ("impl", "model", "variant", "mode", "case") else "right")
    for row in result["rows"]:
        table.add_row(*("-" if row.get(c) is None else f"{row[c]:,}" if isinstance(row.get(c), int) else str(row[c])
                        for c in columns))
    # pipes and files get 100 columns (no limit with --wide) instead of rich's 80-column default
    terminal = Console().width if sys.stdout.isatty() else None
    if wide:
        width = terminal or 1000
    else:
        width = min(TABLE_WIDTH, terminal or TABLE_WIDTH)
    Console(width=width).print(table)


@bench_app.command("layer")
def bench_layer_command(
    tokens: Annotated[str, typer.Option("--tokens", help="Token counts N (comma-separated).")] = "8192",
    d_model: Annotated[str, typer.Option("--d-model", help="Model widths d (comma-separated).")] = "256",
    grid: Annotated[str, typer.Option("--grid", help="Expert/top-k pairs ExK, e.g. 8x2,64x8.")] = "8x2,64x8",
    backends: Annotated[str, typer.Option("--backends", help="Dispatch backends to time.")] = "sorted,padded,loop",
    precision: Annotated[str, typer.Option("--precision", help="fp32 or bf16 (autocast).")] = "fp32",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats (median).")] = 7,
    fmt: Format = "table", device: Device = "auto", threads: opt.Threads = "auto", wide: Wide = False,
) -> None:
    """One MoE layer (topk, SwiGLU) fwd+bwd per dispatch backend vs a dense FFN of equal active FLOPs.

    Prints the median ms, the ratio to dense (median over rounds of the ratio within a round: cases run
    interleaved), GF/s, fraction of the matmul peak measured in the same run, and the activation memory
    autograd keeps for backward relative to dense.
    """
    from moegpt.bench import LayerCase, bench_layer
    from moegpt.runtime import resolve_device

    check_format(fmt)
    apply_threads(threads)
    pairs = []
    for item in grid.split(","):
        try:
            e, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise MoegptError(f"--grid items look like 8x2 (experts x top-k); got {item!r}") from None
        if not 1 <= k <= e:
            raise MoegptError(f"--grid {item}: top-k must be in [1, experts]")
        pairs.append((e, k))
    if problem := precision_problem(precision, "--precision", ("fp32", "bf16")):
        raise MoegptError(problem)
    cases = [LayerCase(n, d, e, k) for n in int_list(tokens, "--tokens") for d in int_list(d_model, "--d-model")
             for e, k in pairs]
    chosen = name_list(backends, [b for b in DISPATCH_BACKENDS], "backend")
    result = bench_layer(cases, chosen, resolve_device(device), precision=precision, repeats=repeats)
    render(result, fmt, "moegpt bench layer (fwd+bwd, median)",
           ["n_tokens", "d_model", "n_expert", "top_k", "impl", "ms", "ratio_to_dense", "gflops", "frac_of_peak",
            "memory_ratio_to_dense"], wide=wide)


def _training_tokens(preset_data: Path, limit: int = 2_000_000) -> torch.Tensor | None:
    """Real tokens of the built-in corpus when it is prepared (same data for every model), else None."""
    import torch

    from moegpt.data import TokenDataset

    if not (preset_data / "meta.json").exists():
        return None
    ds = TokenDataset(preset_data)
    x, _ = ds.get_batch("train", 1, min(limit, ds.num_tokens("train") - 1), torch.Generator().manual_seed(0))
    return x[0]


@bench_app.command("model")
def bench_model_command(
    preset: Annotated[str, typer.Option("--preset", help="Model preset (cpu, deepseek, tiny, gpu-small).")] = "cpu",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated variants; the first is the "
                                                             "baseline.")] = "dense,topk",
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16, or both.")] = "fp32",
    dispatch: Annotated[str, typer.Option("--dispatch", help="Dispatch backends for MoE rows.")] = "sorted",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed training steps per model.")] = 10,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Sequences per step (default: "
                                                   "the preset's).")] = None,
    block_size: Annotated[int | None, typer.Option("--block-size", min=1, help="Tokens per sequence (default: "
                                                   "the preset's).")] = None,
    activation: Annotated[str | None, typer.Option("--activation", help="FFN activation of every model: swiglu, "
                                                   "gelu, relu, linear (default: the preset's).")] = None,
    fixed_cost: Annotated[bool, typer.Option("--fixed-cost/--no-fixed-cost", help="Also time every model at "
                                             "16 tokens per step and report each MoE model's extra ms per step "
                                             "per MoE layer over the dense model.")] = True,
    fmt: Format = "table", device: Device = "auto", threads: opt.Threads = "auto", wide: Wide = False,
) -> None:
    """Training tokens/s (fwd+bwd+clip+AdamW, as `moegpt train` steps) of the preset's model, MoE vs dense at
    equal active params.

    Models step in turn on the same batches; ratio_to_first is the median over rounds of the first model's
    step time over this model's (with --precision both: the ratio of the medians). fixed ms/MoE layer: the
    median over rounds of (MoE step - dense step) at 16 tokens per step, divided by the MoE layers: the cost a
    MoE layer adds per step whatever the batch (router, sort, expert blocks, stats, losses, and clip + AdamW
    over the extra expert weights). nanoGPT's Shakespeare size: --batch-size 12 --block-size 64
    --activation gelu."""
    from moegpt.bench import bench_model
    from moegpt.moe import validate_run_config
    from moegpt.runtime import resolve_device

    check_format(fmt)
    apply_threads(threads)
    names = name_list(variants, list(registered_variants()), "variant")
    precisions = ["fp32", "bf16"] if precision == "both" else [precision]
    if any(precision_problem(p, choices=("fp32", "bf16")) for p in precisions):
        raise MoegptError(precision_problem(precision, "--precision", ("fp32", "bf16", "both")))
    backends = name_list(dispatch, list(DISPATCH_BACKENDS), "backend")
    try:
        cfg = validate_run_config(resolve_config(preset, flags={
            "train.batch_size": batch_size, "model.block_size": block_size, "moe.activation": activation}))
    except MoegptError as err:
        raise MoegptError(f"--batch-size/--block-size/--activation: {err}") from None
    dev = resolve_device(device)
    tokens = _training_tokens(Path(cfg.data.data_root) / cfg.data.name)
    rows, result = [], {}
    for prec in precisions:
        moe_cfgs = {}
        for name in names:
            routed = registered_variants()[name].routed  # the dense baseline has no dispatch to vary
            for backend in (backends if routed else backends[:1]):
                label = f"{name}/{backend}" if routed and len(backends) > 1 else name
                moe_cfgs[f"{label} {prec}"] = dataclasses.replace(cfg.moe, variant=name, dispatch=backend)
        result = bench_model(cfg.model, moe_cfgs, dev, batch_size=cfg.train.batch_size, steps=steps,
                             precision=prec, tokens=tokens, fixed_cost=fixed_cost)
        rows += result["rows"]
    if len(precisions) > 1:  # rows of separate runs: no paired ratio across them, so medians' ratio
        baseline = rows[0]["tokens_per_s"]
        for row in rows:
            row["ratio_to_first"] = round(row["tokens_per_s"] / baseline, 3)
    render({**result, "precision": precision, "data": "stdlib" if tokens is not None else "random", "rows": rows},
           fmt, "moegpt bench model (training step, median)",
           ["model", "ms_per_step", "tokens_per_s", "ratio_to_first", "fixed_ms_per_moe_layer", "total_params",
            "active_params"], wide=wide)


@bench_app.command("sample")
def bench_sample_command(
    preset: Annotated[str, typer.Option("--preset", help="Model preset (cpu, deepseek, tiny, gpu-small).")] = "cpu",
    moe: Annotated[str, typer.Option("--moe", help="Variant of the model.")] = "topk",
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Tokens to generate.")] = 256,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed rounds (each runs every mode once): "
                                         "tokens/s is the best run per mode, speedup the median of the "
                                         "rounds' ratios.")] = 5,
    attention: Annotated[str | None, typer.Option(
        "--attention", help="Compare KV-cached sampling across attentions instead, e.g. mha,mla (on the llama "
        "trunk; mla runs both its absorbed and its plain decode): tokens/s and cache memory.")] = None,
    fmt: Format = "table", device: Device = "auto", threads: opt.Threads = "auto", wide: Wide = False,
) -> None:
    """Greedy generation tokens/s with the KV cache vs full recomputation (untrained weights: speed only).

    Modes, alternated round by round: kv-cache; recompute (the same window, so the same tokens);
    recompute-crop (nanoGPT's way: always the last block_size tokens, a longer window past block_size).
    `speedup` is kv-cache over recompute: the median over rounds of the ratio within a round.
    decode_ops_per_token: aten ops per token of steady KV-cached generation (decode steps, with the pass that
    refills the cache after a window slide amortised over the tokens it serves).
    With --attention: KV-cached tokens/s, cache bytes per token and a full cache's bytes per attention."""
    import torch

    from moegpt.bench import machine_info
    from moegpt.generate import benchmark_generation
    from moegpt.model import GPT
    from moegpt.op_count import decode_ops_per_token
    from moegpt.runtime import resolve_device

    check_format(fmt)
    apply_threads(threads)
    cfg = resolve_config(preset, sets=[f"moe.variant={moe}"])
    dev = resolve_device(device)
    if attention is not None:
        _bench_sample_attention(cfg, attention, new_tokens, repeats, fmt, dev)
        return
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe).to(dev).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)
    stats = benchmark_generation(model, prompt, new_tokens, repeats)
    ops = decode_ops_per_token(model, prompt)
    speedups = {"cached": 1.0, "recompute": stats["speedup"], "recompute_crop": stats["speedup_vs_crop"]}
    rows = [{"mode": mode, "tokens_per_s": round(stats[f"{key}_tokens_per_s"], 1),
             "kv_cache_speedup": round(speedups[key], 2)}
            for mode, key in (("kv-cache", "cached"), ("recompute", "recompute"), ("recompute-crop", "recompute_crop"))]
    render({"machine": machine_info(dev), "new_tokens": new_tokens, "prompt_tokens": stats["prompt_tokens"],
            "context_keep": stats["context_keep"], "repeats": repeats, "speedup": round(stats["speedup"], 2),
            "speedup_best": round(stats["speedup_best"], 2), "same_tokens": stats["same_tokens"],
            "decode_ops_per_token": round(sum(ops.values()), 1), "rows": rows},
           fmt, "moegpt bench sample (greedy; tokens/s of the best run, speedup: median of rounds)",
           ["mode", "tokens_per_s", "kv_cache_speedup"], wide=wide)


def _bench_sample_attention(cfg, attention: str, new_tokens: int, repeats: int, fmt: str, dev) -> None:
    from moegpt.bench import machine_info
    from moegpt.bench_attention import ATTENTION_CASES, bench_cached_sampling

    try:
        names = name_list(attention, list(ATTENTION_CASES), "attention")
        result = bench_cached_sampling(cfg.model, cfg.moe, names, dev, new_tokens, repeats)
    except MoegptError as err:
        raise MoegptError(f"--attention: {err}") from None
    render({"machine": machine_info(dev), **result}, fmt,
           "moegpt bench sample --attention (greedy, KV cache; tokens/s of the best run, ratio: median of rounds)",
           ["attention", "tokens_per_s", "ratio_to_first", "cache_bytes_per_token", "cache_bytes_full_context",
            "active_params"])


@bench_app.command("ep")
def bench_ep_command(
    preset: Annotated[str, typer.Option("--preset", help="Model preset (cpu, tiny, gpu-small).")] = "cpu",
    moe: Annotated[str, typer.Option("--moe", help="Variant of the model (token-choice).")] = "topk",
    sizes: Annotated[str, typer.Option("--sizes", help="Comma-separated expert-parallel sizes P; the first is "
                                                       "the baseline.")] = "1,2",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Global batch (default: the "
                                                   "preset's); must be divisible by every P.")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed training steps per run.")] = 5,
    rounds: Annotated[int, typer.Option("--rounds", min=1, help="Runs per size, sizes alternating; medians "
                                        "reported.")] = 2,
    fmt: Format = "table", device: Device = "cpu",
) -> None:
    """Training tokens/s at each expert-parallel size P (P processes on this machine), bytes the all-to-alls
    send between processes per step (forward and backward), and their share of step time.

    Every P trains on the same global batch with the same total threads (cores // P per process). The
    exchange share includes time a rank waits in the all-to-all for slower ranks."""
    from moegpt.bench_ep import bench_expert_parallel
    from moegpt.runtime import resolve_device

    check_format(fmt)
    ps = int_list(sizes, "--sizes")
    sets = [f"moe.variant={moe}"] + ([f"train.batch_size={batch_size}"] if batch_size else [])
    cfg = resolve_config(preset, sets=sets)
    dev = resolve_device(device)
    result = bench_expert_parallel(cfg, ps, steps, rounds, device=dev.type)
    render(result, fmt, "moegpt bench ep (training step, median over rounds)",
           ["P", "threads_per_process", "ms_per_step", "ms_per_step_range", "tokens_per_s", "ratio_to_first",
            "exchange_share",
            "bytes_per_step"])
