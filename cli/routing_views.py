"""Rich rendering of an inspect-routing report dict (schema: moegpt/inspect/schema.py). No computation here."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moegpt.cli.palette import EXPERT_PALETTE, expert_style, token_style
from moegpt.inspect.history import sparkline

# Sequential scale (viridis) for load relative to the uniform share: 0 .. >= 2x fair share.
SCALE = ("#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b",
         "#fde725")
SCALE_MAX = 2.0
TABLE_TOKENS = 3  # tokens per expert in the table (the JSON keeps them all)


def _table(title: str | None = None) -> Table:
    """Compact tables: an 80-column terminal must fit a 10-column summary without truncated headers."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, title_style="bold",
                 collapse_padding=True, show_edge=False)


def scale_colour(relative: float) -> str:
    level = int(min(max(relative, 0.0), SCALE_MAX) / SCALE_MAX * (len(SCALE) - 1) + 0.5)
    return SCALE[level]


def _pct(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{100 * x:.{nd}f}"


def _num(x: float | None, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def render_header(console: Console, r: dict[str, Any]) -> None:
    run, data = r["run"], r["data"]
    best = f" (best eval CE {run['best_val_ce']:.4f} during training)" if run["best_val_ce"] is not None else ""
    console.print(f"[bold]{run['checkpoint']}[/]  step {run['step']}  {run['variant']} E={run['n_expert']} "
                  f"k={run['experts_per_token']:g}  MoE layers {run['moe_layers']}"
                  + ("" if run["causal"] else "  [yellow](non-causal variant)[/]"), highlight=False)
    console.print(f"{data['tokens']:,} {data['split']} tokens in {data['windows']} windows of {data['block_size']} "
                  + (f"({data['sampling']}) " if data.get("sampling") else "") +
                  f"(batch {data['batch_size']}), eval mode: val CE [bold]{r['val_ce']:.4f}[/]{best}", highlight=False)
    if not data.get("fingerprint_matches_run", True):
        Console(stderr=True).print(f"[yellow]warning:[/] {data['data_dir']} was re-prepared since this run was "
                                   "trained; its tokens may differ from the run's data", highlight=False)


def render_summary(console: Console, r: dict[str, Any]) -> None:
    layers = r["layers"]
    table = _table("routing per MoE layer")
    for name in ("layer", "max/mean", "CV", "dead", "drop%", "unrtd%", "entropy", "margin", "balance", "z"):
        table.add_column(name, justify="right", min_width=len(name))
    for x in layers:
        dead = ",".join(map(str, x["dead_experts"])) or "-"
        table.add_row(str(x["layer"]), f"{x['max_mean_load']:.2f}", f"{x['cv_load']:.2f}",
                      Text(dead, style="red" if x["dead_experts"] else ""), _pct(x["drop_rate"], 2),
                      _pct(x["unrouted_token_frac"], 2), _num(x["router_entropy"]), _num(x["top1_top2_margin"]),
                      _num(x["balance_loss"]), _num(x["z_loss"], 2))
    console.print(table)
    console.print(f"max/mean and CV of the load before drops; dead = load < {r['dead_threshold']:g} x uniform share; "
                  "unrtd = tokens with no expert; entropy = mean H(p)/log E; margin = mean p1 - p2",
                  style="dim", highlight=False)
    render_extras(console, r["run"]["variant"], layers)
    for note in layers[0]["notes"] if layers else []:
        console.print(f"note: {note}", style="dim", highlight=False)


def render_extras(console: Console, variant: str, layers: list[dict[str, Any]]) -> None:
    """The variant's declared statistics, on their own lines: extra columns would not fit 80 terminal columns."""
    from moegpt.moe import VARIANTS  # here, not at import: `--help` must not wait for torch

    declared = VARIANTS[variant].extra_stats if variant in VARIANTS else ()
    for extra in declared:
        values = [(x["layer"], x["extras"].get(extra.key)) for x in layers]
        if extra.kind == "token_mean" and any(v is not None for _, v in values):
            console.print(f"{extra.label}: " + ", ".join(f"L{layer} {_pct(v)}%" for layer, v in values),
                          highlight=False)
        elif extra.kind == "per_expert":
            for layer, v in values:
                if v is not None:
                    console.print(f"L{layer} {extra.label}: " + " ".join(f"{b:+.4f}" for b in v), highlight=False)


def render_heatmap(console: Console, r: dict[str, Any]) -> None:
    layers = r["layers"]
    E = layers[0]["n_expert"]
    console.print(Text("expert load (before drops) relative to the uniform share", style="bold"))
    head = Text("      ")
    for e in range(E):
        head.append(f"{e:>3}", style=expert_style(e))
    console.print(head)
    for x in layers:
        line = Text(f"  L{x['layer']:<3}")
        for e, load in enumerate(x["load_before_drops"]):
            mark = " ×" if e in x["dead_experts"] else "██"
            line.append(" " + mark, style=f"red on {scale_colour(0)}" if mark == " ×" else scale_colour(load * E))
        line.append(f"  max {max(x['load_before_drops']) * E:.2f}x", style="dim")
        console.print(line)
    legend = Text("  scale ")
    for i in range(len(SCALE)):
        legend.append("█", style=SCALE[i])
    legend.append(f"  0 .. 1 (uniform) .. >={SCALE_MAX:g}x;  × = dead", style="dim")
    console.print(legend)


def render_specialisation(console: Console, r: dict[str, Any]) -> None:
    for x in r["layers"]:
        table = _table(f"layer {x['layer']}: each expert's most over-represented tokens")
        table.add_column("expert", justify="right")
        table.add_column("load %", justify="right")
        table.add_column("top-1 %", justify="right")
        table.add_column("tokens: lift x / count")
        for spec in x["specialisation"]:
            e = spec["expert"]
            toks = Text()
            for i, t in enumerate(spec["tokens"][:TABLE_TOKENS]):
                if i:
                    toks.append("  ")
                toks.append(repr(t["text"]), style="bold")
                toks.append(f" {t['lift']:.1f}x/{t['count']}", style="dim")
            load = f"{100 * x['load_before_drops'][e]:.1f}"
            if x["dropped"]:
                load += f"→{100 * x['load_after_drops'][e]:.1f}"
            table.add_row(Text(str(e), style=expert_style(e)), load, f"{100 * x['top1_load'][e]:.1f}",
                          toks if spec["tokens"] else Text("(no token reaches the minimum count)", style="dim"))
        console.print(table)
        co = x["coactivation"]
        if co:
            pairs = ", ".join(f"({p['experts'][0]},{p['experts'][1]}) {100 * p['token_frac']:.1f}%"
                              + (f" x{p['lift']:.2f}" if p["lift"] is not None else "") for p in co["pairs"])
            console.print(f"  co-activated pairs (share of tokens, x vs independent): {pairs}", highlight=False)


def render_cross_layer(console: Console, r: dict[str, Any]) -> None:
    if not r["cross_layer"]:
        return
    table = _table("cross-layer: does a token's top-1 expert predict the next layer's?")
    for name in ("layers", "agreement", "baseline", "predictability (MI/H)"):
        table.add_column(name, justify="right")
    for c in r["cross_layer"]:
        table.add_row(f"{c['from_layer']} → {c['to_layer']}", _pct(c["agreement"]) + "%", _pct(c["baseline"]) + "%",
                      _num(c["predictability"]))
    console.print(table)


def render_history(console: Console, r: dict[str, Any]) -> None:
    h = r["history"]
    if not h or not h["steps"]:
        console.print("training history: no per-layer records in metrics.jsonl", style="dim")
        return
    table = _table(f"training history (metrics.jsonl): steps {h['steps'][0]}..{h['steps'][-1]}, "
                   f"{len(h['steps'])} log records")
    for name, justify in (("layer", "right"), ("max/mean load over steps", "left"), ("first", "right"),
                          ("last", "right"), ("peak", "right"), ("entropy over steps", "left")):
        table.add_column(name, justify=justify)
    for layer in h["layers"]:
        load = [v for v in layer["max_mean_load"] if v is not None]
        ent = layer["router_entropy"]
        table.add_row(str(layer["layer"]), sparkline(layer["max_mean_load"], 24, lo=1.0),
                      _num(load[0], 2) if load else "-", _num(load[-1], 2) if load else "-",
                      _num(max(load), 2) if load else "-", sparkline(ent, 16, lo=0.0, hi=1.0))
    console.print(table)
    if h["val"]:
        console.print("val CE over evals: " + " ".join(f"{v['val_ce']:.3f}@{v['step']}" for v in h["val"][-6:]),
                      highlight=False)


def render_causality(console: Console, r: dict[str, Any]) -> None:
    c = r["causality"]
    s, a = c["suffix_perturbation"], c["cached_agreement"]
    style = "bold green" if c["causal"] else "bold red"
    console.print(Text.assemble("causality (suffix perturbation, ", f"{s['sequences']} x {s['seq_len']} tokens, "
                                f"cuts {s['cuts']}): ", (c["verdict"], style)))
    table = _table()
    for name in ("layer type", "max |Δ| at positions ≤ t", "leak starts here"):
        table.add_column(name, justify="right")
    for kind, v in s["per_layer_type"].items():
        table.add_row(kind, f"{v['max_delta']:.3g}", "yes" if v["source"] else "-")
    table.add_row("logits", f"{s['max_delta_logits']:.3g}", "")
    console.print(table)
    agree = _table("routing: full forward vs cached generation")
    for name in ("layer", "top-1 same %", "chosen set same %", "kept set same %"):
        agree.add_column(name, justify="right")
    for x in a["layers"]:
        agree.add_row(str(x["layer"]), _pct(x["top1_agreement"]), _pct(x["set_agreement"]), _pct(x["kept_agreement"]))
    console.print(agree)
    why = []
    if not c["causal"]:
        why.append("routing that sees other tokens")
    if any(x["kept_agreement"] < x["set_agreement"] for x in a["layers"]):
        why.append("capacity drops in the full forward (a one-token step never overflows)")
    console.print(f"max |Δ logits| full vs cached: {a['max_delta_logits']:.3g} over {a['tokens']} tokens"
                  + (f"; differences come from {' and '.join(why)}" if why else ""), style="dim", highlight=False)


def render_text(console: Console, r: dict[str, Any]) -> None:
    t = r["text"]
    legend = Text("experts: ")
    E = r["run"]["n_expert"]
    for e in range(min(E, len(EXPERT_PALETTE))):
        legend.append(f" {e} ", style=token_style(e)).append(" ")
    if E > len(EXPERT_PALETTE):
        legend.append(f"(colours repeat every {len(EXPERT_PALETTE)})", style="dim")
    console.print(legend)
    for layer in t["top1"]:
        line = Text(f"L{layer['layer']}: ", style="bold")
        for tok, e in zip(t["tokens"], layer["experts"], strict=False):
            line.append(tok, style=token_style(e))
        console.print(line)


def render_compare(console: Console, r: dict[str, Any]) -> None:
    o = r["compare"]
    table = _table(f"compare: {r['run']['path']}  vs  {o['run']['path']}")
    table.add_column("metric")
    table.add_column(f"this ({r['run']['variant']})", justify="right")
    table.add_column(f"other ({o['run']['variant']})", justify="right")
    table.add_row("val CE (these tokens)", f"{r['val_ce']:.4f}", f"{o['val_ce']:.4f}")
    table.add_row("best eval CE (training)", _num(r["run"]["best_val_ce"], 4), _num(o["run"]["best_val_ce"], 4))
    table.add_row("tokens", f"{r['data']['tokens']:,}", f"{o['data']['tokens']:,}")
    mine = {x["layer"]: x for x in r["layers"]}
    theirs = {x["layer"]: x for x in o["layers"]}
    for layer in sorted(set(mine) | set(theirs)):
        a, b = mine.get(layer), theirs.get(layer)
        for label, key, fmt in (("balance", "balance_loss", lambda v: f"{v:.3f}"),
                                ("max/mean", "max_mean_load", lambda v: f"{v:.2f}"),
                                ("entropy", "router_entropy", lambda v: _num(v)),
                                ("dead", "dead_experts", lambda v: str(len(v))),
                                ("drop %", "drop_rate", lambda v: _pct(v, 2))):
            table.add_row(f"L{layer} {label}", fmt(a[key]) if a else "dense", fmt(b[key]) if b else "dense")
    console.print(table)


def render_report(console: Console, r: dict[str, Any]) -> None:
    render_header(console, r)
    render_summary(console, r)
    render_heatmap(console, r)
    render_specialisation(console, r)
    render_cross_layer(console, r)
    render_history(console, r)
    if r["causality"]:
        render_causality(console, r)
    if r["text"]:
        render_text(console, r)
    if r["compare"]:
        render_compare(console, r)
