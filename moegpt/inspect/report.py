"""Expert-usage reports: accumulate RouterStats over held-out batches, then summarise them into a dict.

`RoutingAccumulator.update(stats, tokens_N)` keeps only counts and sums (memory is O(V·E) per layer,
independent of the number of tokens), so 65,536 tokens or ten million cost the same memory.
`build_layer_reports` turns the counts into the "layers" and "cross_layer" parts of the JSON report
(schema: moegpt/inspect/schema.py). `collect_routing` runs a model over non-overlapping windows.

Definitions (per MoE layer; N tokens, K choice slots per token, E experts):
  assignment           one (token, expert) choice the router made; slots holding -1 are not assignments
  load_before_drops_E  assignments of expert e / all assignments (the router's preference)
  load_after_drops_E   kept assignments of e / all kept ones (what the experts actually computed)
  drop_rate            dropped assignments / assignments (capacity overflow; the token rides the residual)
  unrouted_token_frac  tokens with no kept expert (expert-choice's "drop": no expert picked the token)
  dead expert          load_before_drops < dead_threshold / E
  router_entropy       mean over tokens of H(p) / log E, p = router probabilities scaled to sum to 1
  top1_top2_margin     mean over tokens of p_(1) - p_(2) of the same p
  lift(v, e)           (assignments of token v to e) / (expected if e took v at its corpus rate)
                       = count(v, e) · N / (count(v) · assignments(e))

Legend: N tokens, K choices per token, E experts, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moegpt.errors import MoegptError
from moegpt.inspect.stats import coefficient_of_variation, entropy_sum, load_imbalance, margin_sum, top1_expert
from moegpt.moe import variant_spec
from moegpt.moe.spec import ExtraStat
from moegpt.moe.stats import RouterStats


class LayerAccumulator:
    """Running counts of one MoE layer's routing facts."""

    def __init__(self, layer: int, n_expert: int, vocab_size: int, extra_stats: tuple[ExtraStat, ...] = ()) -> None:
        self.layer, self.n_expert, self.vocab_size = layer, n_expert, vocab_size
        self.extra_stats = extra_stats
        E = n_expert
        self.tokens = 0
        self.assigned_E = torch.zeros(E, dtype=torch.long)
        self.kept_E = torch.zeros(E, dtype=torch.long)
        self.top1_E = torch.zeros(E, dtype=torch.long)
        self.dropped = 0
        self.unrouted_tokens = 0
        self.max_choices = 0
        self.prob_tokens = 0
        self.entropy_nats = 0.0
        self.margin = 0.0
        self.prob_sum_E = torch.zeros(E, dtype=torch.float64)
        self.loss_tokens = 0
        self.balance = 0.0
        self.z = 0.0
        self.extra_sums: dict[str, float] = {}  # token_mean extras: value * tokens, summed
        self.extra_tokens: dict[str, int] = {}
        self.extra_latest: dict[str, Tensor] = {}  # per_expert extras: the latest value
        self.token_expert_VE = torch.zeros(vocab_size * E, dtype=torch.long)  # flat [V, E]
        self.pair_EE = torch.zeros(E, E, dtype=torch.float64)  # tokens choosing both i and j (diag: i)

    def update(self, stats: RouterStats, tokens_N: Tensor) -> Tensor:
        """Add one batch; returns the tokens' top-1 experts [N] (-1 = none) for cross-layer counts."""
        E = self.n_expert
        idx_NK = stats.expert_idx_NK.detach().long().cpu()
        N = idx_NK.shape[0]
        valid_NK = idx_NK >= 0
        kept_NK = valid_NK if stats.dropped_NK is None else valid_NK & ~stats.dropped_NK.detach().cpu()
        self.tokens += N
        self.assigned_E += torch.bincount(idx_NK[valid_NK], minlength=E)
        self.kept_E += torch.bincount(idx_NK[kept_NK], minlength=E)
        self.dropped += int((valid_NK & ~kept_NK).sum())
        self.unrouted_tokens += int((~kept_NK.any(dim=-1)).sum())
        self.max_choices = max(self.max_choices, int(valid_NK.sum(dim=-1).max()) if N else 0)
        top1_N = top1_expert(stats).cpu()
        self.top1_E += torch.bincount(top1_N[top1_N >= 0], minlength=E)
        if stats.router_probs_NE is not None:
            probs_NE = stats.router_probs_NE.detach().cpu()
            self.prob_tokens += N
            self.entropy_nats += entropy_sum(probs_NE)
            self.margin += margin_sum(probs_NE)
            self.prob_sum_E += probs_NE.double().sum(dim=0)
        # the losses are means over the batch's tokens: weight by tokens to average over batches
        self.loss_tokens += N
        self.balance += float(stats.balance.detach()) * N
        self.z += float(stats.z.detach()) * N
        self._add_extras(stats, N)
        tok_NK = tokens_N.detach().long().cpu()[:, None].expand_as(idx_NK)
        self.token_expert_VE += torch.bincount((tok_NK * E + idx_NK)[valid_NK], minlength=self.vocab_size * E)
        chosen_NE = torch.zeros(N, E + 1, dtype=torch.float64)
        chosen_NE.scatter_(1, idx_NK + 1, 1.0)  # column 0 soaks up the -1 padding
        chosen_NE = chosen_NE[:, 1:]
        self.pair_EE += chosen_NE.t() @ chosen_NE
        return top1_N

    def _add_extras(self, stats: RouterStats, N: int) -> None:
        for extra in self.extra_stats:
            value = stats.extras.get(extra.key)
            if value is None:
                continue
            if extra.kind == "token_mean":
                self.extra_sums[extra.key] = self.extra_sums.get(extra.key, 0.0) + float(value) * N
                self.extra_tokens[extra.key] = self.extra_tokens.get(extra.key, 0) + N
            else:
                self.extra_latest[extra.key] = value.detach().float().cpu()

    def extras_report(self) -> dict[str, Any]:
        """The variant's declared statistics: {key: value} (null when a forward never reported it)."""
        out: dict[str, Any] = {}
        for extra in self.extra_stats:
            if extra.kind == "token_mean":
                tokens = self.extra_tokens.get(extra.key, 0)
                out[extra.key] = _f(self.extra_sums[extra.key] / tokens, 4) if tokens else None
            else:
                latest = self.extra_latest.get(extra.key)
                out[extra.key] = None if latest is None else [_f(x) for x in latest.tolist()]
        return out


class RoutingAccumulator:
    """Counts for every MoE layer, token frequencies, and top-1 contingency tables of consecutive MoE layers."""

    def __init__(self, moe_layers: list[int], n_expert: int, vocab_size: int,
                 extra_stats: tuple[ExtraStat, ...] = ()) -> None:
        self.moe_layers, self.n_expert, self.vocab_size = list(moe_layers), n_expert, vocab_size
        self.layers = {layer: LayerAccumulator(layer, n_expert, vocab_size, extra_stats) for layer in self.moe_layers}
        self.token_count_V = torch.zeros(vocab_size, dtype=torch.long)
        self.tokens = 0
        E1 = n_expert + 1  # row/column 0: no expert
        self.transitions = {(a, b): torch.zeros(E1, E1, dtype=torch.long)
                            for a, b in zip(self.moe_layers, self.moe_layers[1:], strict=False)}

    def update(self, router_stats: list[RouterStats], tokens_N: Tensor) -> None:
        """Add one forward's per-layer stats; tokens_N are the input ids at the routed positions (flat)."""
        tokens_N = tokens_N.reshape(-1).long().cpu()
        self.tokens += tokens_N.numel()
        self.token_count_V += torch.bincount(tokens_N, minlength=self.vocab_size)
        top1: dict[int, Tensor] = {}
        for layer in self.moe_layers:
            stats = router_stats[layer]
            if not stats.is_routed:
                continue
            top1[layer] = self.layers[layer].update(stats, tokens_N)
        E1 = self.n_expert + 1
        for (a, b), table in self.transitions.items():
            if a in top1 and b in top1:
                table += torch.bincount((top1[a] + 1) * E1 + top1[b] + 1, minlength=E1 * E1).reshape(E1, E1)


def _f(x: float, nd: int = 6) -> float:
    """Rounded for JSON: enough digits for any table, short enough to read."""
    return round(float(x), nd)


def _specialisation(acc: LayerAccumulator, token_count_V: Tensor, n_tokens: int, decode: Callable[[int], str] | None,
                    top_tokens: int, min_count: int) -> list[dict[str, Any]]:
    E = acc.n_expert
    count_VE = acc.token_expert_VE.reshape(acc.vocab_size, E).double()
    per_expert_E = count_VE.sum(dim=0)
    expected_VE = token_count_V.double()[:, None] * per_expert_E[None, :] / max(n_tokens, 1)
    lift_VE = torch.where((count_VE >= min_count) & (expected_VE > 0), count_VE / expected_VE.clamp(min=1e-12),
                          torch.full_like(count_VE, -math.inf))
    # ties in lift go to the more frequent token: key = lift, then count
    key_VE = lift_VE * 1e9 + count_VE
    out = []
    for e in range(E):
        n_ok = int(torch.isfinite(lift_VE[:, e]).sum())
        best = torch.topk(key_VE[:, e], min(top_tokens, n_ok)).indices.tolist() if n_ok else []
        out.append({"expert": e, "tokens": [
            {"id": v, "text": decode(v) if decode else str(v), "count": int(count_VE[v, e]),
             "share": _f(count_VE[v, e] / max(int(token_count_V[v]), 1), 4), "lift": _f(lift_VE[v, e], 4)}
            for v in best]})
    return out


def _coactivation(acc: LayerAccumulator, top_pairs: int) -> dict[str, Any] | None:
    if acc.max_choices < 2:
        return None
    E, N = acc.n_expert, max(acc.tokens, 1)
    pair = acc.pair_EE
    p_E = pair.diagonal() / N
    i_P, j_P = torch.triu_indices(E, E, offset=1)
    count_P = pair[i_P, j_P]
    order = torch.argsort(count_P, descending=True, stable=True)[:top_pairs].tolist()
    pairs = []
    for p in order:
        i, j, c = int(i_P[p]), int(j_P[p]), float(count_P[p])
        indep = float(p_E[i] * p_E[j])
        pairs.append({"experts": [i, j], "count": int(c), "token_frac": _f(c / N),
                      "lift": _f(c / N / indep, 4) if indep > 0 else None})
    return {"pairs": pairs, "matrix": [[int(v) for v in row] for row in pair.tolist()]}


def layer_report(acc: LayerAccumulator, token_count_V: Tensor, notes: list[str], dead_threshold: float = 0.1,
                 decode: Callable[[int], str] | None = None, top_tokens: int = 5, min_count: int = 5,
                 top_pairs: int = 5) -> dict[str, Any]:
    """The JSON object of one MoE layer (see the module docstring for definitions)."""
    E = acc.n_expert
    assigned, kept = int(acc.assigned_E.sum()), int(acc.kept_E.sum())
    load_before_E = acc.assigned_E.double() / max(assigned, 1)
    load_after_E = acc.kept_E.double() / max(kept, 1)
    dead = [e for e in range(E) if float(load_before_E[e]) < dead_threshold / E]
    P = max(acc.prob_tokens, 1)
    return {
        "layer": acc.layer, "n_expert": E, "tokens": acc.tokens,
        "assignments": assigned, "kept": kept, "dropped": acc.dropped,
        "counts_before_drops": acc.assigned_E.tolist(), "counts_after_drops": acc.kept_E.tolist(),
        "load_before_drops": [_f(x) for x in load_before_E.tolist()],
        "load_after_drops": [_f(x) for x in load_after_E.tolist()],
        "top1_load": [_f(x) for x in (acc.top1_E.double() / max(int(acc.top1_E.sum()), 1)).tolist()],
        "max_mean_load": _f(load_imbalance(acc.assigned_E), 4),
        "max_mean_load_after_drops": _f(load_imbalance(acc.kept_E), 4),
        "cv_load": _f(coefficient_of_variation(acc.assigned_E), 4),
        "dead_experts": dead,
        "drop_rate": _f(acc.dropped / assigned if assigned else 0.0),
        "unrouted_token_frac": _f(acc.unrouted_tokens / max(acc.tokens, 1)),
        "experts_per_token": _f(kept / max(acc.tokens, 1), 4),
        "router_entropy": _f(acc.entropy_nats / P / math.log(E)) if E > 1 and acc.prob_tokens else None,
        "top1_top2_margin": _f(acc.margin / P) if acc.prob_tokens else None,
        "mean_router_prob": [_f(x) for x in (acc.prob_sum_E / P).tolist()] if acc.prob_tokens else None,
        "balance_loss": _f(acc.balance / max(acc.loss_tokens, 1)),
        "z_loss": _f(acc.z / max(acc.loss_tokens, 1)),
        "extras": acc.extras_report(),
        "specialisation": _specialisation(acc, token_count_V, acc.tokens, decode, top_tokens, min_count),
        "coactivation": _coactivation(acc, top_pairs),
        "notes": list(notes),
    }


def cross_layer_report(table: Tensor, from_layer: int, to_layer: int) -> dict[str, Any]:
    """How well a token's top-1 expert in one layer predicts its top-1 in the next MoE layer.

    agreement: accuracy of the best map expert(l) -> expert(l+1) (each row's most common column);
    baseline: accuracy of always guessing the next layer's most common expert;
    predictability: mutual information / entropy of the next layer's top-1 (0 = independent, 1 = determined).
    """
    C = table.double()
    total = float(C.sum())
    if total == 0:
        return {"from_layer": from_layer, "to_layer": to_layer, "agreement": None, "baseline": None,
                "predictability": None}
    joint = C / total
    px, py = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = float((joint[nz] * torch.log(joint[nz] / (px @ py)[nz])).sum())
    hy = float(-(py[py > 0] * torch.log(py[py > 0])).sum())
    return {"from_layer": from_layer, "to_layer": to_layer,
            "agreement": _f(float(C.max(dim=1).values.sum()) / total, 4),
            "baseline": _f(float(C.sum(0).max()) / total, 4),
            "predictability": _f(mi / hy, 4) if hy > 0 else 1.0}


def build_layer_reports(acc: RoutingAccumulator, notes: list[str], dead_threshold: float = 0.1,
                        decode: Callable[[int], str] | None = None, top_tokens: int = 5, min_count: int = 5,
                        top_pairs: int = 5) -> dict[str, Any]:
    """{"layers": [...], "cross_layer": [...]} of the report from an accumulator."""
    layers = [layer_report(a, acc.token_count_V, notes, dead_threshold, decode, top_tokens, min_count, top_pairs)
              for a in acc.layers.values() if a.tokens]
    cross = [cross_layer_report(t, a, b) for (a, b), t in acc.transitions.items()]
    return {"layers": layers, "cross_layer": cross}


# ---- running a model ---------------------------------------------------------------------------------------
@dataclass
class Collected:
    accumulator: RoutingAccumulator
    ce: float  # mean cross-entropy over the routed positions
    tokens: int


def _windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """Non-overlapping (start, length) windows covering positions 0..n_tokens-1."""
    return [(s, min(block_size, n_tokens - s)) for s in range(0, n_tokens, block_size)]


def accumulator_for(model: torch.nn.Module) -> RoutingAccumulator:
    """An empty accumulator for the model's MoE layers, counting the statistics its variant declares."""
    extra_stats = variant_spec(model.moe_config.variant).extra_stats
    return RoutingAccumulator(model.moe_layers, model.moe_config.n_expert, model.config.vocab_size, extra_stats)


def collect_routing(model: torch.nn.Module, token_ids: np.ndarray | Tensor, batch_size: int, block_size: int,
                    device: torch.device | str | None = None) -> Collected:
    """Run `model` in eval mode over non-overlapping windows of `token_ids` (1-D; the last id is only a
    target) and accumulate routing counts and the cross-entropy of every position but that last id."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids) - 1
    if n < 1:
        raise MoegptError("need at least two tokens")
    return collect_windows(model, [ids[s:s + length + 1] for s, length in _windows(n, block_size)], batch_size,
                           device)


@torch.no_grad()
def collect_windows(model: torch.nn.Module, windows: list[np.ndarray], batch_size: int,
                    device: torch.device | str | None = None) -> Collected:
    """Route and score each window (inputs w[:-1], targets w[1:]) in eval mode; windows of one length batch
    together, in order of first appearance."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    acc = accumulator_for(model)
    by_length: dict[int, list[np.ndarray]] = {}
    for window in windows:
        by_length.setdefault(len(window), []).append(window)
    batches = [group[i:i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]
    was_training, ce_sum, n = model.training, 0.0, 0
    model.eval()
    try:
        for batch in batches:
            rows = torch.as_tensor(np.stack(batch))
            x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
            out = model(x, y)
            ce_sum += float(out.loss) * x.numel()
            n += x.numel()
            acc.update(out.router_stats, x.reshape(-1))
    finally:
        model.train(was_training)
    return Collected(accumulator=acc, ce=ce_sum / n, tokens=n)


@torch.no_grad()
def route_text(model: torch.nn.Module, token_ids: list[int], block_size: int) -> dict[int, list[int]]:
    """Each MoE layer's top-1 expert (-1 = none) for every token of a text, in windows of block_size."""
    device = next(model.parameters()).device
    out: dict[int, list[int]] = {layer: [] for layer in model.moe_layers}
    for start, length in _windows(len(token_ids), block_size):
        x = torch.tensor(token_ids[start:start + length], dtype=torch.long, device=device)[None]
        stats = model(x, all_logits=True).router_stats
        for layer in out:
            if stats[layer].is_routed:
                out[layer] += top1_expert(stats[layer]).tolist()
    return out
