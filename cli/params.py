"""`moegpt params`: build a model from flags or a config and print its size and cost."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from moegpt.cli import options as opt
from moegpt.cli.app import app
from moegpt.presets import resolve_config


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


@app.command("params")
def params_command(
    preset: opt.Preset = "cpu", config: opt.ConfigFile = None, set_: opt.Sets = None,
    moe: opt.Moe = None, n_expert: opt.NExpert = None, top_k: opt.TopK = None,
    expert_hidden: opt.ExpertHidden = None, activation: opt.Activation = None,
    capacity_factor: opt.CapacityFactor = None, n_layer: opt.NLayer = None, n_head: opt.NHead = None,
    n_embd: opt.NEmbd = None, block_size: opt.BlockSize = None, vocab_size: opt.VocabSize = None,
) -> None:
    """Print total and active (per-token) parameters, MoE layers, FLOPs per token, weight memory and the
    KV cache per token with MHA and with MLA (this model's dimensions; the one it uses is marked)."""
    from moegpt.mla import kv_cache_values_per_token  # here, not at import: `--help` must not wait for torch
    from moegpt.model import GPT
    from moegpt.moe import layer_facts

    cfg = resolve_config(preset, config, opt.model_flags(
        moe=moe, n_expert=n_expert, top_k=top_k, expert_hidden=expert_hidden, activation=activation,
        capacity_factor=capacity_factor, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
        block_size=block_size, vocab_size=vocab_size), set_)
    model = GPT(cfg.model, cfg.moe)
    counts = model.num_params()
    m, e = cfg.model, cfg.moe
    table = Table(title=f"moegpt model: {e.variant}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_row("layers x width x heads", f"{m.n_layer} x {m.n_embd} x {m.n_head}")
    table.add_row("context / vocab", f"{m.block_size} / {m.vocab_size}")
    table.add_row("trunk / attention", f"{m.arch} / {m.attention}")
    if model.moe_layers:
        facts = layer_facts(m, e)
        moe_layers = model.moe_layers
        table.add_row("MoE layers", f"{len(moe_layers)} of {m.n_layer} ({', '.join(map(str, moe_layers)) or '-'})")
        table.add_row("experts / per token", f"{facts['n_expert']} / {facts['experts_per_token']:g}")
        table.add_row("expert hidden", str(facts["expert_hidden"]))
        if facts["capacity_factor"] > 0:
            table.add_row("capacity factor", f"{facts['capacity_factor']:g}")
    table.add_row("total params", f"{counts['total']:,} ({human(counts['total'])})")
    table.add_row("active params / token", f"{counts['active']:,} ({human(counts['active'])})")
    table.add_row("  of which embeddings", f"{counts['embedding']:,}")
    table.add_row("training FLOPs / token", human(model.flops_per_token()))
    table.add_row("weights fp32 / bf16", f"{human(counts['total'] * 4)}B / {human(counts['total'] * 2)}B")
    for attention in ("mha", "mla"):
        per_token = kv_cache_values_per_token(m, attention)
        used = " (this model)" if attention == m.attention else ""
        table.add_row(f"KV cache / token, {attention.upper()}{used}",
                      f"{per_token * 4:,} B fp32 / {per_token * 2:,} B bf16")
    Console().print(table)
