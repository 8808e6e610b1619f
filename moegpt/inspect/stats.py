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


def coefficient_of_variation(load_E: Tensor) -> float:
    """Population std / mean of the per-expert load (0 = balanced; sqrt(E-1) = all on one expert)."""
    load = load_E.double()
    mean = float(load.mean())
    return float(load.std(unbiased=False)) / mean if mean > 0 else 0.0


def normalized_probs(probs_NE: Tensor) -> Tensor:
    """Router probabilities scaled to sum to 1 per token (a no-op for softmax; aux-free's sigmoid
    affinities are not normalised, and entropy/margins need a distribution)."""
    p = probs_NE.double()
    return p / p.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def entropy_sum(probs_NE: Tensor) -> float:
    """Sum over tokens of the router entropy in nats (divide by N log E for `normalized_entropy`)."""
    p = normalized_probs(probs_NE)
    return float(-(p * torch.log(p.clamp(min=1e-12))).sum())


def margin_sum(probs_NE: Tensor) -> float:
    """Sum over tokens of p_top1 - p_top2 of the normalised router probabilities (0 when E = 1)."""
    if probs_NE.shape[-1] < 2:
        return 0.0
    top2 = torch.topk(normalized_probs(probs_NE), 2, dim=-1).values
    return float((top2[:, 0] - top2[:, 1]).sum())


def top1_expert(stats: RouterStats) -> Tensor:
    """Each token's top-1 expert [N] (long), by `top1_of_choices`."""
    assert stats.expert_idx_NK is not None and stats.expert_weight_NK is not None
    return top1_of_choices(stats.expert_idx_NK, stats.expert_weight_NK, stats.dropped_NK)


def top1_of_choices(expert_idx_XK: Tensor, expert_weight_XK: Tensor, dropped_XK: Tensor | None = None) -> Tensor:
    """A token's top-1 expert, the one definition that reports, `inspect-routing --text` and `sample
    --show-routing` share: of the experts whose output the token received (kept choices: weight > 0), the
    one with the largest combine weight; -1 when none did (every choice dropped). Any leading shape [..., K]."""
    live_XK = (expert_idx_XK >= 0) & (expert_weight_XK > 0)
    if dropped_XK is not None:
        live_XK = live_XK & ~dropped_XK
    weight_XK = expert_weight_XK.double().masked_fill(~live_XK, -1.0)
    best_X1 = weight_XK.argmax(dim=-1, keepdim=True)
    top_X = expert_idx_XK.long().gather(-1, best_X1).squeeze(-1)
    return torch.where(live_XK.any(dim=-1), top_X, torch.full_like(top_X, -1))
