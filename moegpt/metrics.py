"""The records of metrics.jsonl that the trainer writes at log steps (evaluation records are built inline)."""

from __future__ import annotations

from typing import Any

import torch

from moegpt.inspect.stats import layer_summary


def log_record(step: int, tokens: int, lr: float, out, aux: dict, grad_norm: torch.Tensor,
                tokens_per_s: float, moe_layers: list[int]) -> dict[str, Any]:
    stats = out.router_stats
    aux = {k: float(v.detach()) for k, v in aux.items()}
    ce, aux_total = float(out.loss.detach()), aux["total"]
    record: dict[str, Any] = {
        "step": step, "tokens": tokens, "lr": lr,
        "loss": round(ce + aux_total, 5), "loss_ce": round(ce, 5),
        "balance": round(aux["balance"], 5), "z": round(aux["z"], 5),
        "seq_balance": round(aux["seq_balance"], 5), "grad_norm": round(float(grad_norm), 5),
        "tokens_per_s": round(tokens_per_s, 1),
    }
    per_layer = []
    for layer in moe_layers:
        summary = layer_summary(stats[layer])
        if summary is not None:
            per_layer.append({"layer": layer, "balance": round(float(stats[layer].balance.detach()), 5),
                              "z": round(float(stats[layer].z.detach()), 5), **summary})
    record["layers"] = per_layer
    return record
