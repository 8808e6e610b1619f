"""Router losses as pure functions (see DESIGN §4). All computed in fp32 over real tokens only.

Legend: N tokens, E experts, K choices per token; mask_N is True for real (non-ignored) tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_rows(t: Tensor, mask_N: Tensor | None) -> Tensor:
    return t if mask_N is None else t[mask_N]


def switch_balance_loss(logits_NE: Tensor, expert_idx_NK: Tensor, mask_N: Tensor | None = None,
                        probs_NE: Tensor | None = None) -> Tensor:
    """Switch/GShard balance loss E * sum_i f_i * P_i; 1 when balanced, E when collapsed.

    f_i: fraction of the N*K assignments that went to expert i (no gradient, a count).
    P_i: mean over tokens of the FULL softmax over all E experts (the gradient path), so the loss
    has a router gradient even at K=1 (a top-k-renormalised P would be constant there).
    Choices of -1 (no expert) are ignored in f. probs_NE, when given, is softmax(logits_NE) already
    computed by the caller (all rows, before masking).
    """
    logits_NE = _masked_rows(logits_NE.float(), mask_N)
    idx_NK = _masked_rows(expert_idx_NK, mask_N)
    n_expert = logits_NE.shape[-1]
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0.0
    valid = idx_NK >= 0
    counts_E = torch.bincount(idx_NK[valid], minlength=n_expert).float()
    f_E = counts_E / valid.sum().clamp(min=1)
    probs_NE = torch.softmax(logits_NE, dim=-1) if probs_NE is None else _masked_rows(probs_NE.float(), mask_N)
    P_E = probs_NE.mean(dim=0)
    return n_expert * torch.sum(f_E * P_E)


def router_z_loss(logits_NE: Tensor, mask_N: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2 (not mean(logits^2))."""
    logits_NE = _masked_rows(logits_NE.float(), mask_N)
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0.0
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def seq_balance_loss(scores_BTE: Tensor, expert_idx_BTK: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 sequence-wise balance loss, averaged over sequences.

    Per sequence of T' real tokens: f_i = E/(K*T') * #{t: i chosen at t};
    P_i = (1/T') * sum_t s_{t,i} / sum_j s_{t,j} (affinities normalised over all experts);
    loss = sum_i f_i * P_i, which is 1 when balanced.
    """
    B, T, E = scores_BTE.shape
    K = expert_idx_BTK.shape[-1]
    scores = scores_BTE.float()
    mask = torch.ones(B, T, dtype=torch.bool, device=scores.device) if mask_BT is None else mask_BT
    m = mask.float()
    n_real_B = m.sum(dim=1)
    # scatter_add, not scatter_: an empty choice (-1, clamped to 0) must not overwrite a real choice of 0
    chosen_BTE = torch.zeros(B, T, E, device=scores.device).scatter_add_(
        2, expert_idx_BTK.clamp(min=0), (expert_idx_BTK >= 0).float())
    f_BE = (chosen_BTE * m[..., None]).sum(dim=1) * (E / (K * n_real_B.clamp(min=1)))[:, None]
    probs = scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-9)
    P_BE = (probs * m[..., None]).sum(dim=1) / n_real_B.clamp(min=1)[:, None]
    per_seq = (f_BE * P_BE).sum(dim=-1)
    has_tokens = n_real_B > 0
    if not bool(has_tokens.any()):
        return scores.sum() * 0.0
    return per_seq[has_tokens].mean()


@torch.no_grad()
def aux_free_bias_step(bias_E: Tensor, load_E: Tensor, rate: float) -> None:
    """DeepSeek-V3 bias update, in place: b_i += rate * sign(mean_load - load_i), then centre b.

    Called after the optimizer step with the loads accumulated since the last call, never inside
    forward, so a forward pass is a pure function of the weights and the current bias.
    """
    if float(load_E.sum()) <= 0:
        return
    bias_E.add_(rate * torch.sign(load_E.mean() - load_E))
    bias_E.sub_(bias_E.mean())
