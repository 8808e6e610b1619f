"""expert-choice: each expert takes its top-C tokens of the batch (Zhou et al. 2022). NOT causal.

C = ceil(capacity_factor * N * top_k / E), so on average a token gets top_k experts; some get none
(they ride the residual), some get many. Which tokens an expert takes depends on every token of
the batch, future ones included: the output at position t leaks information from after t.
Perfectly balanced by construction, so the balance loss is 0; the z-loss still applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegpt.moe.losses import router_z_loss
from moegpt.moe.routing import TokenChoiceMoE, expert_capacity
from moegpt.moe.stats import RouterStats


class ExpertChoiceMoE(TokenChoiceMoE):
    expert_parallel_ok = False  # experts pick tokens over the whole batch: no per-token routing to shard
    is_causal = False

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        B, T, C = x.shape
        N, E = B * T, self.n_expert
        x_NC = x.reshape(N, C)
        logits_NE = self.router_logits(x_NC)
        probs_NE = torch.softmax(logits_NE, dim=-1)
        capacity = min(N, expert_capacity(N, self.top_k, E, self.capacity_factor))
        gate_EC, tok_EC = torch.topk(probs_NE.t(), capacity, dim=-1)
        # equal rows per expert: one batched matmul, no sort needed
        out_ECC = self.experts.forward_batched(x_NC[tok_EC])
        out_ECC = out_ECC * gate_EC[..., None].to(out_ECC.dtype)
        y_NC = out_ECC.new_zeros(N, out_ECC.shape[-1]).index_add(0, tok_EC.reshape(-1), out_ECC.reshape(-1, C))

        chosen_NE = torch.zeros(N, E, dtype=torch.bool, device=x.device)
        chosen_NE[tok_EC, torch.arange(E, device=x.device)[:, None].expand_as(tok_EC)] = True
        weight_NE = torch.where(chosen_NE, probs_NE.detach(), torch.zeros_like(probs_NE))
        experts_NE = torch.arange(E, device=x.device).expand(N, E)
        mask_N = None if mask is None else mask.reshape(-1)
        stats = RouterStats(
            balance=logits_NE.new_zeros(()),
            z=router_z_loss(logits_NE, mask_N),
            seq_balance=logits_NE.new_zeros(()),
            n_expert=E,
            expert_idx_NK=torch.where(chosen_NE, experts_NE, torch.full_like(experts_NE, -1)),
            expert_weight_NK=weight_NE,
            router_probs_NE=probs_NE.detach(),
            router_logits_NE=logits_NE.detach(),
        )
        return y_NC.reshape(B, T, C), stats

    def active_params(self, block_size: int) -> int:
        per_token = self.top_k * max(self.capacity_factor, 0.0)
        return self.router.weight.numel() + int(round(per_token * self.experts.params_per_expert))
