"""aux-free: DeepSeek-V3 auxiliary-loss-free balancing.

s = sigmoid(logits) (fp32); experts are selected by top-k of s + b, where b is a per-expert bias
that is not a parameter; gates = s of the selected experts / their sum (or s itself with
normalize_topk off), times routed_scaling_factor. After each optimizer step the trainer calls
`after_optimizer_step`, which sums the loads over data-parallel ranks and calls `update_bias()`:
b_i += gamma * sign(mean_load - load_i), then b is centred.
Optional group-limited routing (n_group, topk_group): only experts of the topk_group groups with the
highest sum of their two best biased scores are eligible. Optional sequence-wise balance loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegpt.moe.layer import AllReduce
from moegpt.moe.losses import aux_free_bias_step, seq_balance_loss
from moegpt.moe.router import RoutedMoE
from moegpt.moe.spec import ExtraStat, VariantSpec, top_k_problems
from moegpt.moe.stats import RouterStats

EXPERT_BIAS = ExtraStat(key="expert_bias", kind="per_expert", label="expert bias (selection only)",
                        description="the selection bias per expert (added to the affinities for top-k only)")


class AuxFreeMoE(RoutedMoE):
    def __init__(self, model_cfg, moe_cfg):
        super().__init__(model_cfg, moe_cfg)
        self.n_group, self.topk_group = moe_cfg.n_group, moe_cfg.topk_group
        self.bias_update_rate = moe_cfg.bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(self.n_expert))
        # assignments counted in training forwards since the last update_bias(); not saved
        self.register_buffer("pending_load", torch.zeros(self.n_expert), persistent=False)

    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        scores_NE = torch.sigmoid(logits_NE)
        # the bias steers selection only: no gradient through it (a detach is an op, so not when there is none)
        biased_NE = (scores_NE.detach() if scores_NE.requires_grad else scores_NE) + self.expert_bias
        if self.n_group > 1:
            biased_NE = self._limit_to_best_groups(biased_NE)
        idx_NK = torch.topk(biased_NE, self.top_k, dim=-1).indices
        weight_NK = scores_NE.gather(1, idx_NK)
        if self.normalize_topk:  # off = DeepSeek's norm_topk_prob=False: the raw sigmoid affinities gate
            weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        return idx_NK, weight_NK

    def _limit_to_best_groups(self, biased_NE: Tensor) -> Tensor:
        N, E = biased_NE.shape
        grouped = biased_NE.view(N, self.n_group, E // self.n_group)
        best = min(2, grouped.shape[-1])
        group_score_NG = grouped.topk(best, dim=-1).values.sum(-1)
        dropped_NG = torch.ones_like(group_score_NG, dtype=torch.bool)
        dropped_NG.scatter_(1, group_score_NG.topk(self.topk_group, dim=-1).indices, False)
        return grouped.masked_fill(dropped_NG.unsqueeze(-1), float("-inf")).view(N, E)

    def router_losses(self, logits_NE, idx_NK, mask_BT, B, T):
        # No auxiliary balance or z loss: balance comes from the bias. Only the optional
        # sequence-wise loss on the sigmoid affinities (logged always, added when its coef > 0).
        zero = logits_NE.new_zeros(())
        scores_BTE = torch.sigmoid(logits_NE).reshape(B, T, -1)
        return zero, zero, seq_balance_loss(scores_BTE, idx_NK.reshape(B, T, -1), mask_BT)

    def router_probs(self, logits_NE: Tensor) -> Tensor:
        return torch.sigmoid(logits_NE)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        y, stats = self.routed_forward(x, mask)
        stats.extras[EXPERT_BIAS.key] = self.expert_bias.detach().clone()
        if self.training:
            with torch.no_grad():
                self.pending_load += stats.expert_load(after_drops=False)
        return y, stats

    def after_optimizer_step(self, all_reduce: AllReduce) -> None:
        all_reduce(self.pending_load)  # the sign rule needs the loads of the global batch
        self.update_bias()

    @torch.no_grad()
    def update_bias(self, load_E: Tensor | None = None) -> None:
        """Apply the sign rule with the given loads (default: those counted since the last call)."""
        aux_free_bias_step(self.expert_bias, self.pending_load if load_E is None else load_E,
                           self.bias_update_rate)
        self.pending_load.zero_()


def _problems(moe) -> list[str]:
    out = top_k_problems(moe)
    if moe.n_group < 1 or moe.n_expert % moe.n_group:
        out.append(f"moe.n_group ({moe.n_group}) must be >= 1 and divide n_expert ({moe.n_expert})")
    elif not 1 <= moe.topk_group <= moe.n_group:
        out.append(f"moe.topk_group must be in [1, n_group={moe.n_group}] (got {moe.topk_group})")
    elif moe.n_group > 1 and moe.top_k > moe.topk_group * (moe.n_expert // moe.n_group):
        out.append("moe.top_k exceeds the experts in the kept groups (topk_group * n_expert / n_group)")
    return out


SPEC = VariantSpec(
    name="aux-free", layer=AuxFreeMoE,
    description="sigmoid affinities, load-driven selection bias, no aux loss; optional group-limited routing",
    reference="DeepSeek-V3", problems=_problems, extra_stats=(EXPERT_BIAS,), expert_parallel=True,
    report_notes=("probabilities are sigmoid affinities scaled to sum to 1 per token; selection also adds "
                  "expert_bias",),
)
