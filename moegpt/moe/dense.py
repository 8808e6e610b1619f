"""dense: the plain FFN baseline (nanoGPT's MLP; one expert, no router)."""

from __future__ import annotations

from torch import Tensor, nn

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe.experts import DenseMLP
from moegpt.moe.stats import RouterStats


class DenseFFN(nn.Module):
    is_causal = True

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.mlp = DenseMLP(model_cfg.n_embd, model_cfg.resolved_ffn_hidden, moe_cfg.activation)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        return self.mlp(x), RouterStats.empty(x.device)

    def active_params(self, block_size: int) -> int:
        return sum(p.numel() for p in self.parameters())
