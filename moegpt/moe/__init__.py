"""The MoE registry: one dict from variant name to FFN class; `build_ffn` picks per layer.

Every class takes (ModelConfig, MoEConfig), has `forward(x_BTC, mask_BT=None) -> (y_BTC, RouterStats)`,
a class attribute `is_causal`, and `active_params(block_size)` (parameters a token runs through).
"""

from __future__ import annotations

from torch import nn

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe.aux_free import AuxFreeMoE
from moegpt.moe.basic import BasicMoE
from moegpt.moe.dense import DenseFFN
from moegpt.moe.expert_choice import ExpertChoiceMoE
from moegpt.moe.shared import SharedExpertMoE
from moegpt.moe.soft import SoftMoE
from moegpt.moe.stats import RouterStats
from moegpt.moe.switch import SwitchMoE
from moegpt.moe.topk import NoisyTopKMoE, TopKMoE

VARIANTS: dict[str, type[nn.Module]] = {
    "dense": DenseFFN,
    "basic": BasicMoE,
    "topk": TopKMoE,
    "noisy-topk": NoisyTopKMoE,
    "switch": SwitchMoE,
    "shared": SharedExpertMoE,
    "expert-choice": ExpertChoiceMoE,
    "soft": SoftMoE,
    "aux-free": AuxFreeMoE,
}

DESCRIPTIONS: dict[str, str] = {
    "dense": "plain FFN, the baseline",
    "basic": "every expert on every token, softmax-gated sum",
    "topk": "token-choice softmax top-k (Shazeer 2017, Mixtral)",
    "noisy-topk": "top-k with learned logit noise in training (Shazeer 2017)",
    "switch": "top-1 with capacity factor; dropped tokens ride the residual (Fedus 2021)",
    "shared": "shared experts always on + fine-grained routed experts (DeepSeekMoE)",
    "expert-choice": "each expert takes its top-C tokens (Zhou 2022; NOT causal)",
    "soft": "slots as softmax mixtures of tokens (Puigcerver 2023; NOT causal)",
    "aux-free": "sigmoid affinities, load-driven selection bias, no aux loss (DeepSeek-V3)",
}


def build_ffn(model_cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int) -> nn.Module:
    if not moe_cfg.is_moe_layer(layer_idx):
        return DenseFFN(model_cfg, moe_cfg)
    return VARIANTS[moe_cfg.variant](model_cfg, moe_cfg)


def is_causal_variant(variant: str) -> bool:
    return bool(VARIANTS[variant].is_causal)


__all__ = ["VARIANTS", "DESCRIPTIONS", "RouterStats", "build_ffn", "is_causal_variant"]
