"""Router losses as pure functions (docs/architecture.md, "Router losses"). All computed in fp32 over real tokens only.

Legend: N tokens, E experts, K choices per token; mask_N is True for real (non-ignored) tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegpt.moe.global_batch import is_global, sum_over_ranks


def _token_weights(mask_N: Tensor | None, like: Tensor) -> Tensor | None:
    """1.0 for real tokens, 0.0 for ignored ones (None when every token is real). Weights instead of
    boolean row selection: selecting rows by a mask has a data-dependent shape, a host sync on GPU and a
    graph break under torch.compile."""
    return None if mask_N is None else mask_N.reshape(-1).to(like.dtype)


def _mean_over_tokens(values_NX: Tensor, w_N: Tensor | None) -> Tensor:
    """Mean over real tokens (dim 0); zero when there are none. Over every rank's tokens when global."""
    if is_global():
        w = None if w_N is None else w_N.reshape(-1, *([1] * (values_NX.dim() - 1)))
        total = values_NX.sum(dim=0) if w is None else (values_NX * w).sum(dim=0)
        count = values_NX.new_tensor(float(values_NX.shape[0])) if w_N is None else w_N.sum()
        total, count = sum_over_ranks(total, count)
        return total / count.clamp(min=1)
    if w_N is None:
        return values_NX.mean(dim=0) if values_NX.shape[0] else values_NX.sum(dim=0)
    w = w_N.reshape(-1, *([1] * (values_NX.dim() - 1)))
    return (values_NX * w).sum(dim=0) / w_N.sum().clamp(min=1)


def switch_balance_loss(logits_NE: Tensor, expert_idx_NK: Tensor, mask_N: Tensor | None = None,
                        probs_NE: Tensor | None = None) -> Tensor:
    """Switch/GShard balance loss E * sum_i f_i * P_i; 1 when balanced, E when collapsed.

    f_i: fraction of the N*K assignments that went to expert i (no gradient, a count).
    P_i: mean over tokens of the FULL softmax over all E experts (the gradient path), so the loss
    has a router gradient even at K=1 (a top-k-renormalised P would be constant there).
    Choices of -1 (no expert) and ignored tokens are left out of both. probs_NE, when given, is
    softmax(logits_NE) already computed by the caller (all rows). No data-dependent shapes: no host sync.
    """
    logits_NE = logits_NE.float()
    n_expert = logits_NE.shape[-1]
    w_N = _token_weights(mask_N, logits_NE)
    valid_NK = (expert_idx_NK >= 0).to(logits_NE.dtype)
    if w_N is not None:
        valid_NK = valid_NK * w_N[:, None]
    counts_E = logits_NE.new_zeros(n_expert).scatter_add_(0, expert_idx_NK.clamp(min=0).reshape(-1),
                                                          valid_NK.reshape(-1))
    assigned = valid_NK.sum()
    if is_global():
        counts_E, assigned = sum_over_ranks(counts_E, assigned)
    f_E = counts_E / assigned.clamp(min=1)
    probs_NE = torch.softmax(logits_NE, dim=-1) if probs_NE is None else probs_NE.float()
    P_E = _mean_over_tokens(probs_NE, w_N)
    return n_expert * torch.sum(f_E * P_E)


def router_z_loss(logits_NE: Tensor, mask_N: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2 (not mean(logits^2))."""
    logits_NE = logits_NE.float()
    z_N = torch.logsumexp(logits_NE, dim=-1).square()
    return _mean_over_tokens(z_N, _token_weights(mask_N, logits_NE))


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
    if is_global():  # the mean over every rank's sequences
        total, count = sum_over_ranks((per_seq * has_tokens).sum(), has_tokens.sum())
        return total / count.clamp(min=1)
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
