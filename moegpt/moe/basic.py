"""basic: every expert runs on every token; outputs summed with softmax gates (Jacobs et al. 1991)."""

from __future__ import annotations

import torch
from torch import Tensor

from moegpt.moe.routing import TokenChoiceMoE


class BasicMoE(TokenChoiceMoE):
    expert_parallel_ok = False  # every token runs every expert: sharding would send every token everywhere

    def __init__(self, model_cfg, moe_cfg):
        super().__init__(model_cfg, moe_cfg, top_k=moe_cfg.n_expert)
        self.capacity_factor = 0.0  # nothing to drop: every expert takes every token

    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        N, E = logits_NE.shape
        idx_NE = torch.arange(E, device=logits_NE.device).expand(N, E)
        return idx_NE, self.softmax(logits_NE)
