"""The versioned JSON schema of `moegpt inspect-routing --format json` (schema_version 2).

Bump SCHEMA_VERSION when a field is removed, renamed or changes meaning; adding a field is compatible.
Numbers are plain JSON numbers (fractions in [0, 1] unless said otherwise); null = not applicable.

Top level
  schema               "moegpt.routing-report"
  schema_version       2 (v2: run.top_k became run.experts_per_token; a layer's variant statistics moved
                       into layer.extras)
  run                  {path, checkpoint, checkpoint_sha256, variant, n_layer, moe_layers, n_expert,
                        experts_per_token (routed experts a token runs through, from the variant's spec),
                        capacity_factor, step, best_val_ce (the checkpoint's best eval CE, null if none), causal}
  data                 {data_dir, split, tokens (positions routed), block_size, batch_size, windows,
                        fingerprint_matches_run (false: the data folder was re-prepared since training),
                        sampling (which tokens: "the whole split", or random windows spread over it)}
  val_ce               mean cross-entropy (nats) of the model on exactly these tokens
  dead_threshold       an expert is dead when load_before_drops < dead_threshold / n_expert
  layers               [layer object], one per MoE layer (only --layer's when given)
  cross_layer          [{from_layer, to_layer, agreement, baseline, predictability}] for consecutive MoE layers:
                        agreement = accuracy of the best map top-1(from) -> top-1(to); baseline = accuracy of
                        always guessing to's most common expert; predictability = I(from; to) / H(to)
  history              null, or {steps: [int], layers: [{layer, max_mean_load: [..], drop_frac: [..],
                        router_entropy: [..], balance: [..]}], val: [{step, val_ce}]} from metrics.jsonl
                        (each entry one training batch; null where a record lacks the value)
  causality            null, or {verdict ("causal" | "leaks (max Δ = x)"), causal, variant,
                        suffix_perturbation: {cuts, sequences, seq_len, max_delta_logits, tolerance, leaks,
                          per_layer_type: {type: {max_delta, source}}, per_module: [{module, layer,
                          max_delta_in, max_delta, source}], first_leak: null | {module, layer}},
                        cached_agreement: {tokens, max_delta_logits, min_top1_agreement, min_set_agreement,
                          layers: [{layer, top1_agreement (the router's first choice, before drops), set_agreement,
                          kept_agreement}]}}
  text                 null, or {ids: [int], tokens: [str], top1: [{layer, experts: [int, -1 = none]}]}
  compare              null, or the run, data, val_ce and layers (without specialisation and co-activation
                        matrices) of the other run, computed the same way

Layer object
  layer, n_expert, tokens
  assignments, kept, dropped           choices made, kept after capacity, dropped (assignments = kept + dropped)
  counts_before_drops, counts_after_drops   [n_expert] ints
  load_before_drops, load_after_drops       [n_expert] fractions of assignments (each sums to 1)
  top1_load                            [n_expert] fraction of tokens whose top-1 expert it is (largest combine weight
                                       among the kept choices; tokens with every choice dropped have none)
  max_mean_load, max_mean_load_after_drops, cv_load (std/mean of counts_before_drops)
  dead_experts                         [int]
  drop_rate                            dropped / assignments
  unrouted_token_frac                  tokens with no kept expert
  experts_per_token                    kept / tokens
  router_entropy                       mean H(p) / log E, p = router probabilities normalised per token (null if
                                       the variant reports none)
  top1_top2_margin                     mean p_(1) - p_(2)
  mean_router_prob                     [n_expert] mean p per expert (the P of the balance loss)
  balance_loss, z_loss                 the layer's loss values, averaged over batches (weighted by tokens)
  extras                               {key: value}: the statistics the variant declares in its spec (empty for most;
                                       shared: shared_output_share = mean |shared output| / (|shared| + |routed|);
                                       aux-free: expert_bias = the selection bias per expert); null = not reported
  specialisation                       [{expert, tokens: [{id, text, count, share, lift}]}], top tokens by lift
                                       (count = assignments of the token to the expert, >= a minimum; share =
                                       count / occurrences of the token; lift = count / expected count)
  coactivation                         null when tokens have < 2 experts; else {pairs: [{experts: [i, j], count,
                                       token_frac, lift = P(i and j) / (P(i) P(j))}], matrix: [[int]] (diag:
                                       tokens choosing i)}
  notes                                [str] how to read this variant's numbers
"""

from __future__ import annotations

import json
import math
from typing import Any

SCHEMA_NAME = "moegpt.routing-report"
SCHEMA_VERSION = 2

TOP_LEVEL = {"schema": str, "schema_version": int, "run": dict, "data": dict, "val_ce": float,
             "dead_threshold": float, "layers": list, "cross_layer": list}
OPTIONAL_TOP_LEVEL = ("history", "causality", "text", "compare")
RUN_KEYS = ("path", "checkpoint", "checkpoint_sha256", "variant", "n_layer", "moe_layers", "n_expert",
            "experts_per_token", "capacity_factor", "step", "best_val_ce", "causal")
DATA_KEYS = ("data_dir", "split", "tokens", "block_size", "batch_size", "windows")
LAYER_KEYS = {"layer": int, "n_expert": int, "tokens": int, "assignments": int, "kept": int, "dropped": int,
              "counts_before_drops": list, "counts_after_drops": list, "load_before_drops": list,
              "load_after_drops": list, "top1_load": list, "max_mean_load": float,
              "max_mean_load_after_drops": float, "cv_load": float, "dead_experts": list, "drop_rate": float,
              "unrouted_token_frac": float, "experts_per_token": float, "router_entropy": (float, type(None)),
              "top1_top2_margin": (float, type(None)), "mean_router_prob": (list, type(None)),
              "balance_loss": float, "z_loss": float, "extras": dict, "specialisation": list,
              "coactivation": (dict, type(None)),
              "notes": list}
CROSS_KEYS = ("from_layer", "to_layer", "agreement", "baseline", "predictability")


def _is(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True  # JSON does not keep 1.0 apart from 1
    return isinstance(value, kinds)


def validate_report(report: dict[str, Any], compare: bool = False) -> list[str]:
    """Problems with a report against the current schema version (empty list = valid)."""
    problems = []
    for key, kind in TOP_LEVEL.items():
        if compare and key in ("schema", "schema_version", "dead_threshold", "cross_layer"):
            continue
        if key not in report:
            problems.append(f"missing {key}")
        elif not _is(report[key], kind):
            problems.append(f"{key}: expected {kind.__name__}, got {type(report[key]).__name__}")
    if not compare:
        if report.get("schema") != SCHEMA_NAME:
            problems.append(f"schema is {report.get('schema')!r}, not {SCHEMA_NAME!r}")
        if report.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"schema_version is {report.get('schema_version')!r}, not {SCHEMA_VERSION}")
        for key in OPTIONAL_TOP_LEVEL:
            if key not in report:
                problems.append(f"missing {key} (null when not requested)")
    problems += [f"run: missing {k}" for k in RUN_KEYS if k not in report.get("run", {})]
    problems += [f"data: missing {k}" for k in DATA_KEYS if k not in report.get("data", {})]
    for i, layer in enumerate(report.get("layers", [])):
        for key, kind in LAYER_KEYS.items():
            if compare and key in ("specialisation", "coactivation"):
                continue
            if key not in layer:
                problems.append(f"layers[{i}]: missing {key}")
            elif not _is(layer[key], kind):
                problems.append(f"layers[{i}].{key}: unexpected type {type(layer[key]).__name__}")
        if "assignments" in layer and layer.get("kept", 0) + layer.get("dropped", 0) != layer["assignments"]:
            problems.append(f"layers[{i}]: kept + dropped != assignments")
    for i, cross in enumerate(report.get("cross_layer", []) if not compare else []):
        problems += [f"cross_layer[{i}]: missing {k}" for k in CROSS_KEYS if k not in cross]
    if not compare and isinstance(report.get("compare"), dict):
        problems += [f"compare: {p}" for p in validate_report(report["compare"], compare=True)]
    return problems


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def report_to_json(report: dict[str, Any], indent: int | None = 2) -> str:
    """Strict JSON (NaN/inf become null, which JSON parsers other than Python's reject otherwise)."""
    return json.dumps(_finite(report), indent=indent, ensure_ascii=False, allow_nan=False)
