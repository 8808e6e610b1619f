"""The MoE package: one file per routing variant (its layer class and its SPEC), the registry, the router
machinery (router.py), expert banks and dispatch backends, and the router losses.

Every layer class is an `FFNLayer`: `forward(x_BTC, mask_BT=None) -> (y_BTC, RouterStats)` and
`active_params(block_size)`. Adding a variant = one file with its class and SPEC, plus one line in the
tuple below (or `register(spec)` from outside, as the test suite does).
"""

from __future__ import annotations

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe import aux_free, basic, dense, expert_choice, shared, soft, switch, topk
from moegpt.moe.dispatch import BACKENDS
from moegpt.moe.experts import ACTIVATIONS
from moegpt.moe.layer import FFNLayer
from moegpt.moe.registry import (
    VARIANTS,
    capacity_factor,
    expert_hidden,
    experts_per_token,
    is_causal_variant,
    layer_facts,
    moe_layer_indices,
    register,
    validate_run_config,
    variant_problems,
    variant_spec,
)
from moegpt.moe.spec import ExtraStat, VariantSpec
from moegpt.moe.stats import RouterStats

for _spec in (dense.SPEC, basic.SPEC, topk.SPEC, topk.NOISY_SPEC, switch.SPEC, shared.SPEC,
              expert_choice.SPEC, soft.SPEC, aux_free.SPEC):
    register(_spec)


def build_ffn(model_cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int) -> FFNLayer:
    if layer_idx not in moe_layer_indices(moe_cfg, model_cfg.n_layer):
        return dense.DenseFFN(model_cfg, moe_cfg)
    return variant_spec(moe_cfg.variant).layer(model_cfg, moe_cfg)


__all__ = [
    "ACTIVATIONS", "BACKENDS", "VARIANTS", "ExtraStat", "FFNLayer", "RouterStats", "VariantSpec", "build_ffn",
    "capacity_factor", "expert_hidden", "experts_per_token", "is_causal_variant", "layer_facts",
    "moe_layer_indices", "register", "validate_run_config", "variant_problems", "variant_spec",
]
