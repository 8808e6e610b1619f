"""`inspect-routing` as a library call: open a run read-only, route held-out tokens, build the JSON report.

Nothing here writes to the run: the checkpoint is only read (load_run), the data bins are memory-mapped
read-only, and the model stays in eval mode. The CLI (cli/inspect_routing.py) only renders the dict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moegpt.checkpoint import checkpoint_hash
from moegpt.data import TokenDataset
from moegpt.errors import MoegptError
from moegpt.finite import check_evaluation
from moegpt.inspect.causality import probe_causality
from moegpt.inspect.heldout import route_held_out
from moegpt.inspect.history import training_history
from moegpt.inspect.report import build_layer_reports, route_text
from moegpt.inspect.schema import SCHEMA_NAME, SCHEMA_VERSION
from moegpt.moe import layer_facts, variant_spec
from moegpt.runs import LoadedRun, load_run
from moegpt.runtime import resolve_device

DEFAULT_TOKENS = 65_536


class DenseRunError(MoegptError):
    """The run has no MoE layer; the message still carries the val CE it measured."""


@dataclass
class InspectOptions:
    tokens: int = DEFAULT_TOKENS
    split: str = "val"
    layer: int | None = None
    text: str | None = None
    causality: bool = False
    compare: str | None = None
    dead_threshold: float = 0.1
    device: str = "auto"
    batch_size: int | None = None  # default: the run's training batch size (capacity depends on it)
    top_tokens: int = 5
    min_count: int = 5
    top_pairs: int = 5


def check_options(opts: InspectOptions) -> None:
    """Bad input that needs no run: fail before loading anything."""
    if opts.tokens <= 0:
        raise MoegptError(f"--tokens must be > 0 (got {opts.tokens})")
    if opts.split not in ("val", "train"):
        raise MoegptError(f"--split must be val or train (got {opts.split!r})")
    if not 0 <= opts.dead_threshold <= 1 or not math.isfinite(opts.dead_threshold):
        raise MoegptError(f"--dead-threshold must be in [0, 1] (got {opts.dead_threshold})")
    if opts.batch_size is not None and opts.batch_size <= 0:
        raise MoegptError(f"--batch-size must be > 0 (got {opts.batch_size})")
    if opts.text is not None and not opts.text:
        raise MoegptError("--text is empty")


def held_out_tokens(run: LoadedRun, split: str, n_tokens: int) -> tuple[np.ndarray, Path]:
    """The first n_tokens + 1 ids of the split (all of it if shorter), read sequentially. Read-only: the
    bins are memory-mapped with mode "r"."""
    data_dir = run.prepared_data_dir()
    ds = TokenDataset(data_dir)
    if ds.vocab_size != run.config.model.vocab_size:
        raise MoegptError(f"{data_dir} has vocab {ds.vocab_size} but the model has {run.config.model.vocab_size}")
    data = ds.tokens(split)
    if len(data) < 2:
        raise MoegptError(f"the {split} split of {data_dir} has {len(data)} tokens; need at least 2")
    return np.asarray(data[:min(n_tokens, len(data) - 1) + 1], dtype=np.int64), data_dir


def _run_info(run: LoadedRun, path: str | Path) -> dict[str, Any]:
    cfg, best = run.config, run.state.get("best_val")
    facts = layer_facts(cfg.model, cfg.moe)
    return {"path": str(path), "checkpoint": str(run.checkpoint), "checkpoint_sha256": checkpoint_hash(run.checkpoint),
            "variant": cfg.moe.variant, "n_layer": cfg.model.n_layer, "moe_layers": run.model.moe_layers,
            "n_expert": facts["n_expert"], "experts_per_token": facts["experts_per_token"],
            "capacity_factor": facts["capacity_factor"], "step": int(run.state.get("step", 0)),
            "best_val_ce": float(best) if best is not None and math.isfinite(float(best)) else None,
            "causal": facts["causal"]}


def run_report(run: LoadedRun, path: str | Path, opts: InspectOptions, decode: bool = True) -> dict[str, Any]:
    """run, data, val_ce, layers and cross_layer of one run (the parts --compare also needs)."""
    ids, data_dir = held_out_tokens(run, opts.split, opts.tokens)
    # a re-prepared corpus under the same name would silently change what "held-out" means
    fingerprint = TokenDataset(data_dir).fingerprint
    same_data = fingerprint == str(run.state.get("data_ref", {}).get("fingerprint", ""))
    block = run.config.model.block_size
    batch = opts.batch_size or run.config.train.batch_size
    collected, ids, sampling = route_held_out(run.model, TokenDataset(data_dir).tokens(opts.split), opts.tokens,
                                              batch, block)
    check_evaluation(collected.ce, run.model, ids, run.checkpoint, run.state.get("step"))
    tok = run.tokenizer() if decode and run.model.moe_layers else None
    notes = list(variant_spec(run.config.moe.variant).report_notes)
    layers = build_layer_reports(collected.accumulator, notes, opts.dead_threshold,
                                 decode=(lambda i: tok.decode([i])) if tok else None, top_tokens=opts.top_tokens,
                                 min_count=opts.min_count, top_pairs=opts.top_pairs)
    return {"run": _run_info(run, path),
            "data": {"data_dir": str(data_dir), "split": opts.split, "tokens": collected.tokens,
                     "block_size": block, "batch_size": batch, "windows": math.ceil(collected.tokens / block),
                     "fingerprint_matches_run": same_data, "sampling": sampling},
            "val_ce": round(collected.ce, 6), **layers}


def _check_layer(run: LoadedRun, layer: int) -> None:
    n, moe = run.config.model.n_layer, run.model.moe_layers
    if not 0 <= layer < n:
        raise MoegptError(f"--layer {layer} is out of range: the model has layers 0..{n - 1} (MoE layers {moe})")
    if layer not in moe:
        raise MoegptError(f"--layer {layer} is not a MoE layer (MoE layers: {moe})")


def _text_report(run: LoadedRun, text: str) -> dict[str, Any]:
    tok = run.tokenizer()
    ids = [int(i) for i in tok.encode(text)]
    if not ids:
        raise MoegptError("--text encodes to no tokens")
    top1 = route_text(run.model, ids, run.config.model.block_size)
    return {"ids": ids, "tokens": [tok.decode([i]) for i in ids],
            "top1": [{"layer": layer, "experts": experts} for layer, experts in top1.items()]}


def _filter_layer(report: dict[str, Any], layer: int) -> None:
    report["layers"] = [x for x in report["layers"] if x["layer"] == layer]
    report["cross_layer"] = [x for x in report["cross_layer"] if layer in (x["from_layer"], x["to_layer"])]
    if report.get("history"):
        report["history"]["layers"] = [x for x in report["history"]["layers"] if x["layer"] == layer]
    if report.get("text"):
        report["text"]["top1"] = [x for x in report["text"]["top1"] if x["layer"] == layer]
    if report.get("causality"):
        agreement = report["causality"]["cached_agreement"]
        agreement["layers"] = [x for x in agreement["layers"] if x["layer"] == layer]


def _compare_report(path: str, opts: InspectOptions) -> dict[str, Any]:
    other = load_run(path, resolve_device(opts.device))
    report = run_report(other, path, opts, decode=False)
    for layer in report["layers"]:  # side-by-side needs the summary numbers, not the big tables
        layer.pop("specialisation", None)
        layer.pop("coactivation", None)
    report.pop("cross_layer", None)
    return report


@torch.no_grad()
def inspect_routing(path: str | Path, opts: InspectOptions) -> dict[str, Any]:
    """The full report (schema: moegpt/inspect/schema.py). Raises MoegptError for bad input and
    DenseRunError (with the val CE in its message) for a run without MoE layers."""
    check_options(opts)
    run = load_run(path, resolve_device(opts.device))
    if opts.layer is not None and run.model.moe_layers:
        _check_layer(run, opts.layer)
    base = run_report(run, path, opts)
    if not run.model.moe_layers:
        variant = run.config.moe.variant
        what = "" if not variant_spec(variant).routed else f" ({variant} without MoE layers)"
        raise DenseRunError(f"{path} is dense{what}: "
                            "nothing to route "
                            f"(val CE {base['val_ce']:.3f} on {base['data']['tokens']:,} {opts.split} tokens)")
    report: dict[str, Any] = {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, **base,
                              "dead_threshold": opts.dead_threshold, "history": training_history(run.run_dir),
                              "causality": None, "text": None, "compare": None}
    if opts.causality:
        ids, _ = held_out_tokens(run, opts.split, 4 * run.config.model.block_size)
        try:
            report["causality"] = probe_causality(run.model, torch.from_numpy(ids))
        except ValueError as exc:
            raise MoegptError(f"--causality: {exc}") from None
    if opts.text is not None:
        report["text"] = _text_report(run, opts.text)
    if opts.compare is not None:
        report["compare"] = _compare_report(opts.compare, opts)
    if opts.layer is not None:
        _filter_layer(report, opts.layer)
    return report
