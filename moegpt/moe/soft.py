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
from moegpt.moe.layer import FFNLayer
from moegpt.moe.registry import expert_hidden
from moegpt.moe.spec import VariantSpec
from moegpt.moe.stats import RouterStats


class SoftMoE(FFNLayer):
    def __init__(self, model_cfg, moe_cfg):
        super().__init__()
        self.n_expert, self.slots = moe_cfg.n_expert, moe_cfg.slots_per_expert
        self.report_k = min(moe_cfg.top_k, moe_cfg.n_expert)
        self.router = nn.Linear(model_cfg.n_embd, self.n_expert * self.slots, bias=False)
        hidden = expert_hidden(model_cfg, moe_cfg)
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


def _problems(moe) -> list[str]:
    out = []
    if moe.top_k < 1:  # soft sizes its experts like top-k ones, and reports a token's top-k by combine weight
        out.append(f"moe.top_k must be >= 1 (got {moe.top_k})")
    if moe.slots_per_expert < 1:
        out.append(f"moe.slots_per_expert must be >= 1 (got {moe.slots_per_expert})")
    return out


SPEC = VariantSpec(
    name="soft", layer=SoftMoE, description="slots as softmax mixtures of a sequence's tokens",
    reference="Puigcerver 2023", causal=False, uses_capacity=False,
    # E*S slots are processed per sequence and shared by its block_size tokens
    experts_per_token=lambda moe, block_size: moe.n_expert * moe.slots_per_expert / block_size,
    expert_width_share=lambda moe: float(moe.top_k), problems=_problems,
    report_notes=("soft MoE has no discrete routing: a token's 'chosen' experts are its top-k by combine weight, "
                  "probabilities are the per-expert combine weights; no drops",),
)
