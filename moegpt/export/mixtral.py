"""llama trunk (MHA) with topk routing in every layer -> transformers' MixtralForCausalLM, exactly.

Mixtral's router takes the softmax over all experts of x W_router^T, keeps the top k and renormalises them
to sum to one: moegpt's topk with normalize_topk (which computes the same in fp32). Its experts are SwiGLU
MLPs (w1 = gate, w3 = up, w2 = down), every token reaches its k experts (no capacity), every layer is a
MoE layer, and the gates are not rescaled.
"""

from __future__ import annotations

from torch import Tensor, nn

from moegpt.export.llama_parts import (
    common_config,
    expert_weights,
    experts_kernel,
    is_llama,
    routed_layers,
    routed_problem,
    trunk_weights,
    uses_mla,
)
from moegpt.export.mapping import Mapping, SourceWeights, register, tied_head_unused
from moegpt.moe.aux_free import AuxFreeMoE
from moegpt.moe.shared import SharedExpertMoE
from moegpt.moe.topk import TopKMoE


@register
class MixtralMapping(Mapping):
    architecture = "MixtralForCausalLM"
    summary = "llama trunk with MHA, topk routing and SwiGLU experts in every layer (Mixtral)"

    def claims(self, model: nn.Module) -> bool:
        return (is_llama(model) and not uses_mla(model) and bool(routed_layers(model))
                and not isinstance(model.blocks[routed_layers(model)[0]].ffn, SharedExpertMoE))

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a llama-trunk MHA model with routed (non-shared) MoE layers"
        variant = model.moe_config.variant
        ffn = model.blocks[routed_layers(model)[0]].ffn
        if type(ffn) is not TopKMoE:
            nearest = "model.attention=mla (DeepSeek-V3)" if isinstance(ffn, AuxFreeMoE) else "variant topk (Mixtral)"
            return (f"Mixtral routes by renormalised softmax top-k, which {variant} is not; "
                    f"nearest exportable: {nearest}")
        problem = routed_problem(model, "Mixtral")
        if problem:
            return problem
        if len(routed_layers(model)) != len(model.blocks):
            return ("Mixtral has a MoE FFN in every layer, this model has dense ones; nearest exportable: "
                    "moe.first_dense=0 and moe.moe_every=1")
        if not ffn.normalize_topk or ffn.routed_scaling_factor != 1.0:
            return ("Mixtral renormalises the kept top-k gates to sum to one and does not rescale them; "
                    "nearest exportable: moe.normalize_topk=true and moe.routed_scaling_factor=1")
        return None

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        moe = model.moe_config
        ffn = model.blocks[0].ffn
        return {**common_config(model, eot_id, self.architecture, "mixtral"),
                "intermediate_size": ffn.experts.hidden, "head_dim": model.config.n_embd // model.config.n_head,
                "num_local_experts": ffn.n_expert, "num_experts_per_tok": ffn.top_k,
                "router_aux_loss_coef": moe.balance_coef, "router_jitter_noise": 0.0, "output_router_logits": False,
                "sliding_window": None, **experts_kernel([model.config.n_embd, ffn.experts.hidden])}

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = trunk_weights(src, model)
        for i in range(len(model.blocks)):
            ours, theirs = f"blocks.{i}.ffn", f"model.layers.{i}.block_sparse_moe"
            out[f"{theirs}.gate.weight"] = src[f"{ours}.router.weight"]
            out.update(expert_weights(src, f"{ours}.experts", f"{theirs}.experts", ("w1", "w3", "w2")))
        return src.finish(out, self.architecture)
