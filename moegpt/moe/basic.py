"""basic: every expert runs on every token; outputs summed with softmax gates (Jacobs et al. 1991)."""

from __future__ import annotations

import torch
from torch import Tensor

from moegpt.moe.router import RoutedMoE
from moegpt.moe.spec import VariantSpec


class BasicMoE(RoutedMoE):
    def __init__(self, model_cfg, moe_cfg):
        super().__init__(model_cfg, moe_cfg, top_k=moe_cfg.n_expert)

    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        N, E = logits_NE.shape
        idx_NE = torch.arange(E, device=logits_NE.device).expand(N, E)
        return idx_NE, self.softmax(logits_NE)


SPEC = VariantSpec(
    name="basic", layer=BasicMoE, description="every expert on every token, softmax-gated sum",
    reference="Jacobs 1991",
    experts_per_token=lambda moe, block_size: float(moe.n_expert),
    uses_capacity=False,  # nothing to drop: every expert takes every token
    report_notes=("every expert runs on every token: loads are uniform by construction; entropy and margin "
                  "describe the gates",),
)
