"""dense: the plain FFN baseline (one MLP, no router). With `activation = "gelu"` it is nanoGPT's MLP
(4x width, GELU); the default activation is SwiGLU at the same width budget."""

from __future__ import annotations

from torch import Tensor

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe.experts import DenseMLP
from moegpt.moe.layer import FFNLayer
from moegpt.moe.spec import VariantSpec
from moegpt.moe.stats import RouterStats


class DenseFFN(FFNLayer):
    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.mlp = DenseMLP(model_cfg.n_embd, model_cfg.resolved_ffn_hidden, moe_cfg.activation)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        return self.mlp(x), RouterStats.empty(x.device)

    def decode(self, h_NC: Tensor, x_NC: Tensor, capture: bool) -> tuple[Tensor, RouterStats | None]:
        return self.mlp.add_to_(x_NC, h_NC), None

    def active_params(self, block_size: int) -> int:
        return sum(p.numel() for p in self.parameters())


SPEC = VariantSpec(
    name="dense", layer=DenseFFN, description="plain FFN, the baseline", reference="nanoGPT",
    routed=False, uses_capacity=False, experts_per_token=lambda moe, block_size: 1.0,
)
