"""shared: always-on shared experts plus fine-grained routed top-k experts (DeepSeekMoE 2024).

The n_shared shared experts are summed with weight 1, which equals one dense MLP of hidden width
n_shared * expert_hidden; that is how they are stored. With `shared_gate` (Qwen2-MoE) their output is
scaled per token by sigmoid(x . w_gate), a learned [C, 1] gate.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.moe.experts import DenseMLP
from moegpt.moe.registry import expert_hidden
from moegpt.moe.softmax_routing import SoftmaxTopKMoE
from moegpt.moe.spec import ExtraStat, VariantSpec, top_k_problems
from moegpt.moe.stats import RouterStats

SHARED_SHARE = ExtraStat(
    key="shared_output_share", kind="token_mean", label="shared experts' share of the FFN output norm",
    description="mean |shared output| / (|shared| + |routed|) over tokens")


class SharedExpertMoE(SoftmaxTopKMoE):
    def __init__(self, model_cfg, moe_cfg):
        super().__init__(model_cfg, moe_cfg)
        hidden = expert_hidden(model_cfg, moe_cfg)
        self.n_shared = moe_cfg.n_shared
        self.shared = DenseMLP(model_cfg.n_embd, hidden * self.n_shared, moe_cfg.activation) \
            if self.n_shared > 0 else None
        self.shared_gate = nn.Linear(model_cfg.n_embd, 1, bias=False) \
            if moe_cfg.shared_gate and self.shared is not None else None

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        routed, stats = self.routed_forward(x, mask)
        if self.shared is None:
            return routed, stats
        shared = self.shared(x)
        if self.shared_gate is not None:
            shared = torch.sigmoid(self.shared_gate(x)) * shared
        shared_norm = shared.detach().float().norm(dim=-1)
        stats.extras[SHARED_SHARE.key] = (
            shared_norm / (shared_norm + routed.detach().float().norm(dim=-1)).clamp(min=1e-9)).mean()
        return routed + shared, stats

    def add_unrouted_(self, h_NC: Tensor, x_NC: Tensor) -> Tensor:
        """Decode: the shared experts onto the residual after the routed ones (no output-share statistic)."""
        if self.shared is None:
            return x_NC
        if self.shared_gate is None:
            return self.shared.add_to_(x_NC, h_NC)
        return x_NC.add_(torch.sigmoid(self.shared_gate(h_NC)) * self.shared(h_NC))

    def active_params(self, block_size: int) -> int:
        shared = 0 if self.shared is None else sum(p.numel() for p in self.shared.parameters())
        if self.shared_gate is not None:
            shared += self.shared_gate.weight.numel()
        return super().active_params(block_size) + shared


def _problems(moe) -> list[str]:
    out = top_k_problems(moe)
    if moe.n_shared < 0:
        out.append(f"moe.n_shared must be >= 0 (got {moe.n_shared})")
    return out


SPEC = VariantSpec(
    name="shared", layer=SharedExpertMoE,
    description="always-on shared experts + fine-grained routed experts", reference="DeepSeekMoE 2024",
    expert_width_share=lambda moe: float(moe.top_k + moe.n_shared), problems=_problems, has_shared_experts=True,
    expert_parallel=True,
    extra_stats=(SHARED_SHARE,),
)
