"""switch: top-1 routing with a capacity factor; dropped tokens ride the residual (Fedus et al. 2021).

The gate is the top-1 softmax probability (not renormalised, or it would always be 1 and the router
would get no gradient from the task loss). Capacity = ceil(cf * N / E), filled in causal priority;
moe.capacity_factor defaults to 1.25 for switch, and an explicit 0 runs it dropless. moe.top_k is ignored.
"""

from __future__ import annotations

from moegpt.moe.softmax_routing import SoftmaxTopKMoE
from moegpt.moe.spec import VariantSpec


class SwitchMoE(SoftmaxTopKMoE):
    renormalizes = False  # a renormalised top-1 gate is always 1: no router gradient from the task loss

    def __init__(self, model_cfg, moe_cfg):
        super().__init__(model_cfg, moe_cfg, top_k=1)


SPEC = VariantSpec(
    name="switch", layer=SwitchMoE, description="top-1 with capacity factor; dropped tokens ride the residual",
    reference="Fedus 2021", experts_per_token=lambda moe, block_size: 1.0, default_capacity_factor=1.25,
    expert_parallel=True,
    report_notes=("top-1 with capacity: drop_rate counts tokens that overflowed their expert and rode the residual",),
)
