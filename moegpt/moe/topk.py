"""topk and noisy-topk: token-choice softmax top-k (Shazeer et al. 2017; Mixtral).

noisy-topk adds learned Gaussian noise to the logits in training only (Shazeer's noisy gating):
H = logits + N(0, 1) * softplus(x W_noise); top-k of H; gates = softmax over the kept H values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegpt.moe.losses import router_z_loss, switch_balance_loss
from moegpt.moe.router import RoutedMoE
from moegpt.moe.softmax_routing import SoftmaxTopKMoE
from moegpt.moe.spec import VariantSpec, top_k_problems


class TopKMoE(SoftmaxTopKMoE):
    """Softmax top-k, renormalised over the k kept when moe.normalize_topk (SoftmaxTopKMoE)."""


class NoisyTopKMoE(RoutedMoE):
    def __init__(self, model_cfg, moe_cfg):
        super().__init__(model_cfg, moe_cfg)
        self.noise = nn.Linear(model_cfg.n_embd, self.n_expert, bias=False)

    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        if self.training:
            with torch.autocast(device_type=x_NC.device.type, enabled=False):
                noise_std = F.softplus(x_NC.float() @ self.noise.weight.float().t())
            logits_NE = logits_NE + torch.randn_like(logits_NE) * noise_std
        self._forward_memo["noisy_logits_NE"] = logits_NE
        kept_NK, idx_NK = torch.topk(logits_NE, self.top_k, dim=-1)
        return idx_NK, torch.softmax(kept_NK, dim=-1)

    def router_losses(self, logits_NE, idx_NK, mask_BT, B, T):
        # P comes from the logits that drove selection (noisy in training), so the balance loss
        # sees the routing the experts saw; the z-loss stays on the clean logits.
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        noisy_NE = self._forward_memo["noisy_logits_NE"]  # set by select, which always runs first
        probs_NE = self.softmax(logits_NE) if noisy_NE is logits_NE else None  # eval: no noise, share the memo
        return (switch_balance_loss(noisy_NE, idx_NK, mask_N, probs_NE=probs_NE), router_z_loss(logits_NE, mask_N),
                logits_NE.new_zeros(()))

    def init_parameters(self) -> None:
        nn.init.zeros_(self.noise.weight)  # start with no learned noise beyond softplus(0)

    def active_params(self, block_size: int) -> int:
        return super().active_params(block_size) + self.noise.weight.numel()


SPEC = VariantSpec(
    name="topk", layer=TopKMoE, description="token-choice softmax top-k, optional renormalisation",
    reference="Shazeer 2017, Mixtral", problems=top_k_problems, expert_parallel=True,
)
NOISY_SPEC = VariantSpec(
    name="noisy-topk", layer=NoisyTopKMoE, description="top-k with learned Gaussian logit noise in training only",
    reference="Shazeer 2017", problems=top_k_problems, expert_parallel=True,
)
