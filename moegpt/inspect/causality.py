"""Causality audit of a trained model (docs/architecture.md, "Causality"): does position t see tokens after t?

Two probes, both in eval mode and without touching the weights:

* Suffix perturbation: a batch of sequences is run twice, the second time with every token after a
  cut point t replaced (in every sequence of the batch, so leaks across the batch through capacity or
  expert-choice selection count too). The largest |Δ| of the logits at positions ≤ t is the leak;
  forward hooks on each block's attention and FFN record where in the stack it first appears.
* Cached-generation agreement: the routing of a full forward over a sequence is compared with the
  routing of the same tokens fed one at a time through a KVCache, as generation does. A causal
  variant routes identically; expert-choice and soft see a one-token "batch" and route differently.

Legend: B batch, T time, V vocab, N = B*T tokens, K choices per token.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from moegpt.errors import MoegptError
from moegpt.model import GPT, KVCache

# Relative to the logits' scale. A causal model measures exactly 0 on CPU fp32; the slack is for kernels whose
# reduction order depends on the GEMM shape (the suffix changes how many rows each expert sees). A barely
# trained soft MoE leaks ~1e-4 of the scale, so the bar must sit well below that.
DEFAULT_TOLERANCE = 1e-6


def _layer_types(model: GPT) -> list[str]:
    moe = set(model.moe_layers)
    return [f"ffn:{model.moe_config.variant}" if i in moe else "ffn:dense" for i in range(len(model.blocks))]


def _hooked_forward(model: GPT, idx_BT: Tensor) -> tuple[Tensor, list[tuple[str, int, Tensor, Tensor]]]:
    """All-position logits plus each block's attention and FFN (kind, layer, input, output), in forward order."""
    outputs: list[tuple[str, int, Tensor, Tensor]] = []
    types = _layer_types(model)
    handles = []
    for i, block in enumerate(model.blocks):
        def attn_hook(_m, inp, out, i=i):
            outputs.append(("attention", i, inp[0].detach(), out.detach()))

        def ffn_hook(_m, inp, out, i=i):
            outputs.append((types[i], i, inp[0].detach(), out[0].detach()))

        handles.append(block.attn.register_forward_hook(attn_hook))
        handles.append(block.ffn.register_forward_hook(ffn_hook))
    try:
        logits = model(idx_BT, all_logits=True).logits.detach()
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


def perturb_suffix(idx_BT: Tensor, cut: int, vocab_size: int, generator: torch.Generator) -> Tensor:
    """A copy of idx with every token after position `cut` replaced by a different random token."""
    out = idx_BT.clone()
    suffix = out[:, cut + 1:]
    shift = torch.randint(1, max(vocab_size, 2), suffix.shape, generator=generator).to(suffix.device)
    out[:, cut + 1:] = (suffix + shift) % vocab_size
    return out


@torch.no_grad()
def suffix_perturbation(model: GPT, idx_BT: Tensor, cuts: list[int], seed: int = 0,
                        tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """Largest change at positions ≤ t of the logits (and of each block's outputs) when tokens after t change."""
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    base_logits, base_out = _hooked_forward(model, idx_BT)
    scale = max(1.0, float(base_logits.abs().max()))
    max_logit = 0.0
    per_module: dict[tuple[str, int], list[float]] = {}  # (kind, layer) -> [max input Δ, max output Δ]
    for cut in cuts:
        logits, outs = _hooked_forward(model, perturb_suffix(idx_BT, cut, V, gen))
        max_logit = max(max_logit, float((logits[:, :cut + 1] - base_logits[:, :cut + 1]).abs().max()))
        for (kind, layer, a_in, a_out), (_, _, b_in, b_out) in zip(base_out, outs, strict=True):
            d_in = float((a_in[:, :cut + 1] - b_in[:, :cut + 1]).abs().max())
            d_out = float((a_out[:, :cut + 1] - b_out[:, :cut + 1]).abs().max())
            old = per_module.setdefault((kind, layer), [0.0, 0.0])
            old[0], old[1] = max(old[0], d_in), max(old[1], d_out)
    limit = tolerance * scale
    # A module is a source of the leak when its output at positions <= t changes while its input there does not.
    modules = [{"module": kind, "layer": layer, "max_delta_in": d_in, "max_delta": d_out,
                "source": d_out > limit and d_in <= limit} for (kind, layer), (d_in, d_out) in per_module.items()]
    by_type: dict[str, dict[str, Any]] = {}
    for m in modules:
        entry = by_type.setdefault(m["module"], {"max_delta": 0.0, "source": False})
        entry["max_delta"] = max(entry["max_delta"], m["max_delta"])
        entry["source"] = entry["source"] or m["source"]
    first = next((m for m in modules if m["max_delta"] > limit), None)
    return {"cuts": list(cuts), "sequences": int(idx_BT.shape[0]), "seq_len": int(idx_BT.shape[1]),
            "max_delta_logits": max_logit, "tolerance": limit, "leaks": max_logit > limit,
            "per_layer_type": by_type, "per_module": modules,
            "first_leak": None if first is None else {"module": first["module"], "layer": first["layer"]}}


def _expert_mask(idx_NK: Tensor, n_expert: int) -> Tensor:
    mask_NE = torch.zeros(idx_NK.shape[0], n_expert + 1, dtype=torch.bool, device=idx_NK.device)
    mask_NE.scatter_(1, idx_NK.long() + 1, True)  # column 0 collects the -1 padding
    return mask_NE[:, 1:].cpu()


def _chosen_sets(stats_list, moe_layers: list[int]) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Per MoE layer: the router's first choice [N] (rank 0 of the chosen experts, before capacity drops: what the
    router decided, whether or not the expert had room), the chosen-expert mask [N, E] and the kept mask."""
    out = {}
    for layer in moe_layers:
        s = stats_list[layer]
        if not s.is_routed:
            continue
        kept_NK = s.expert_idx_NK if s.dropped_NK is None else s.expert_idx_NK.masked_fill(s.dropped_NK, -1)
        out[layer] = (s.expert_idx_NK[:, 0].long().cpu(), _expert_mask(s.expert_idx_NK, s.n_expert),
                      _expert_mask(kept_NK, s.n_expert))
    return out


@torch.no_grad()
def cached_routing_agreement(model: GPT, idx_BT: Tensor) -> dict[str, Any]:
    """Per MoE layer, how often a token's routing in one full forward equals its routing when the tokens
    are fed one by one through a KVCache (top-1 expert, the chosen set, and the set kept after capacity
    drops: a one-token step never overflows a capacity, a full sequence may), and the largest logit
    difference between the two."""
    moe_layers = model.moe_layers
    top1_same = {layer: 0 for layer in moe_layers}
    set_same = {layer: 0 for layer in moe_layers}
    kept_same = {layer: 0 for layer in moe_layers}
    max_logit_delta, n_tokens = 0.0, 0
    for seq_T in idx_BT:
        seq_1T = seq_T[None]
        full = model(seq_1T, all_logits=True)
        full_sets = _chosen_sets(full.router_stats, moe_layers)
        cache = KVCache()
        step_logits = []
        step_sets: list[dict[int, tuple[Tensor, Tensor, Tensor]]] = []
        for t in range(seq_1T.shape[1]):
            out = model(seq_1T[:, t:t + 1], cache=cache, all_logits=True)
            step_logits.append(out.logits)
            step_sets.append(_chosen_sets(out.router_stats, moe_layers))
        cached_logits = torch.cat(step_logits, dim=1)
        max_logit_delta = max(max_logit_delta, float((cached_logits - full.logits).abs().max()))
        for layer, (top1_N, mask_NE, kept_NE) in full_sets.items():
            top1_c = torch.cat([s[layer][0] for s in step_sets])
            mask_c = torch.cat([s[layer][1] for s in step_sets])
            kept_c = torch.cat([s[layer][2] for s in step_sets])
            top1_same[layer] += int((top1_c == top1_N).sum())
            set_same[layer] += int((mask_c == mask_NE).all(dim=-1).sum())
            kept_same[layer] += int((kept_c == kept_NE).all(dim=-1).sum())
        n_tokens += seq_1T.shape[1]
    layers = [{"layer": layer, "top1_agreement": top1_same[layer] / n_tokens,
               "set_agreement": set_same[layer] / n_tokens, "kept_agreement": kept_same[layer] / n_tokens}
              for layer in moe_layers]
    return {"tokens": n_tokens, "max_delta_logits": max_logit_delta, "layers": layers,
            "min_top1_agreement": min((x["top1_agreement"] for x in layers), default=1.0),
            "min_set_agreement": min((x["set_agreement"] for x in layers), default=1.0)}


def verdict(result: dict[str, Any]) -> str:
    """"causal" or "leaks (max Δ = …)" from a suffix_perturbation result."""
    return f"leaks (max Δ = {result['max_delta_logits']:.3g})" if result["leaks"] else "causal"


@torch.no_grad()
def probe_causality(model: GPT, token_ids: Tensor, n_seq: int = 4, seq_len: int | None = None,
                    agreement_seqs: int = 2, agreement_len: int = 64, seed: int = 0,
                    tolerance: float = DEFAULT_TOLERANCE) -> dict[str, Any]:
    """The full audit on sequences cut from `token_ids` (1-D): suffix perturbation at three cut points
    and cached-generation routing agreement. Returns a JSON-ready dict with a `verdict`."""
    was_training = model.training
    model.eval()
    try:
        T = min(seq_len or model.config.block_size, model.config.block_size, len(token_ids) // max(n_seq, 1))
        if T < 4:
            raise MoegptError(f"need at least {4 * n_seq} tokens for the causality probe (got {len(token_ids)})")
        device = next(model.parameters()).device
        idx_BT = torch.as_tensor(token_ids[:n_seq * T], dtype=torch.long).reshape(n_seq, T).to(device)
        cuts = sorted({T // 4, T // 2, (3 * T) // 4})
        suffix = suffix_perturbation(model, idx_BT, cuts, seed=seed, tolerance=tolerance)
        A = min(agreement_len, T)
        agreement = cached_routing_agreement(model, idx_BT[:agreement_seqs, :A])
    finally:
        model.train(was_training)
    return {"verdict": verdict(suffix), "causal": not suffix["leaks"], "variant": model.moe_config.variant,
            "suffix_perturbation": suffix, "cached_agreement": agreement}
