"""soft: Soft MoE (Puigcerver et al. 2023). NOT causal.

Per sequence, each of E*S slots is a softmax-over-tokens mixture of the sequence's tokens
(dispatch); each expert processes its S slots; each token's output is a softmax-over-slots mixture
of the slot outputs (combine). A slot mixes every position of the sequence, so position t sees the
future. The ignore mask is not applied (every position takes part in the mixtures). No discrete
choices, no drops, no balance loss. Reports treat a token's top experts by combine weight as its
"chosen" ones.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.moe.experts import ExpertBank
from moegpt.moe.stats import RouterStats


class SoftMoE(nn.Module):
    is_causal = False

    def __init__(self, model_cfg, moe_cfg):
        super().__init__()
        self.n_expert, self.slots = moe_cfg.n_expert, moe_cfg.slots_per_expert
        self.report_k = min(moe_cfg.top_k, moe_cfg.n_expert)
        self.router = nn.Linear(model_cfg.n_embd, self.n_expert * self.slots, bias=False)
        hidden = moe_cfg.resolved_expert_hidden(model_cfg.resolved_ffn_hidden)
        self.experts = ExpertBank(self.n_expert, model_cfg.n_embd, hidden, moe_cfg.activation)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        B, T, C = x.shape
        E, S = self.n_expert, self.slots
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits_BTX = x.float() @ self.router.weight.float().t()  # X = E*S slots
        dispatch_BTX = torch.softmax(logits_BTX, dim=1)
        combine_BTX = torch.softmax(logits_BTX, dim=2)
        slots_BXC = torch.einsum("btx,btc->bxc", dispatch_BTX.to(x.dtype), x)
        slots_EMC = slots_BXC.reshape(B, E, S, C).transpose(0, 1).reshape(E, B * S, C)
        out_EMC = self.experts.forward_batched(slots_EMC)
        out_BXC = out_EMC.reshape(E, B, S, C).transpose(0, 1).reshape(B, E * S, C)
        y = torch.einsum("btx,bxc->btc", combine_BTX.to(out_BXC.dtype), out_BXC)

        per_expert_NE = combine_BTX.detach().reshape(B * T, E, S).sum(-1)
        weight_NK, idx_NK = torch.topk(per_expert_NE, self.report_k, dim=-1)
        zero = logits_BTX.new_zeros(())
        stats = RouterStats(balance=zero, z=zero, seq_balance=zero, n_expert=E,
                            expert_idx_NK=idx_NK, expert_weight_NK=weight_NK, router_probs_NE=per_expert_NE)
        return y, stats

    def active_params(self, block_size: int) -> int:
        # E*S slots are processed per sequence, shared by its block_size tokens
        slots_per_token = self.n_expert * self.slots / block_size
        return self.router.weight.numel() + int(round(slots_per_token * self.experts.params_per_expert))
