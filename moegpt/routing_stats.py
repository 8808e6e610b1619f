"""Pure summaries of one layer's routing facts (RouterStats) for logs and reports.

Legend: N tokens, K choices per token, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moegpt.moe.stats import RouterStats


def normalized_entropy(probs_NE: Tensor) -> float:
    """Mean router entropy over tokens divided by log E (1 = uniform, 0 = one-hot)."""
    E = probs_NE.shape[-1]
    if E <= 1 or probs_NE.shape[0] == 0:
        return 0.0
    p = probs_NE.float()
    p = p / p.sum(dim=-1, keepdim=True).clamp(min=1e-12)  # sigmoid affinities are not normalised
    entropy_N = -(p * torch.log(p.clamp(min=1e-12))).sum(dim=-1)
    return float(entropy_N.mean()) / math.log(E)


def load_imbalance(load_E: Tensor) -> float:
    """max/mean of the per-expert load (1 = perfectly balanced, E = collapsed)."""
    mean = float(load_E.float().mean())
    return float(load_E.max()) / mean if mean > 0 else 0.0


def drop_fraction(stats: RouterStats) -> float:
    if stats.expert_idx_NK is None or stats.dropped_NK is None:
        return 0.0
    chosen = int((stats.expert_idx_NK >= 0).sum())
    return int(stats.dropped_NK.sum()) / chosen if chosen else 0.0


def layer_summary(stats: RouterStats) -> dict[str, float] | None:
    """Compact numbers for the training log: max/mean load (before drops), drop fraction, entropy."""
    if not stats.is_routed:
        return None
    out = {
        "max_mean_load": round(load_imbalance(stats.expert_load(after_drops=False)), 4),
        "drop_frac": round(drop_fraction(stats), 4),
    }
    if stats.router_probs_NE is not None:
        out["router_entropy"] = round(normalized_entropy(stats.router_probs_NE), 4)
    return out
