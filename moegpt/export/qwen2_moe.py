"""llama trunk (MHA) with gated shared experts -> transformers' Qwen2MoeForCausalLM, exactly.

Qwen2-MoE's sparse block is moegpt's `shared` variant with `shared_gate`: a softmax top-k router
(renormalised when norm_topk_prob), SwiGLU routed experts, and one shared SwiGLU expert (moegpt's
n_shared experts stored as one MLP of their summed width) scaled per token by sigmoid(x w_gate).
Dense layers are listed in mlp_only_layers. Qwen2's q/k/v projections have biases: written as zeros.
"""

from __future__ import annotations

from torch import Tensor, nn

from moegpt.export.llama_parts import (
    common_config,
    expert_weights,
    experts_kernel,
    is_llama,
    mlp_weights,
    routed_layers,
    routed_problem,
    trunk_weights,
    uses_mla,
)
from moegpt.export.mapping import Mapping, SourceWeights, register, tied_head_unused
from moegpt.moe.shared import SharedExpertMoE

NAMES = ("gate_proj", "up_proj", "down_proj")


@register
class Qwen2MoeMapping(Mapping):
    architecture = "Qwen2MoeForCausalLM"
    summary = "llama trunk with MHA and the shared variant with moe.shared_gate (Qwen2-MoE)"

    def claims(self, model: nn.Module) -> bool:
        routed = routed_layers(model)
        return (is_llama(model) and not uses_mla(model) and bool(routed)
                and isinstance(model.blocks[routed[0]].ffn, SharedExpertMoE))

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a llama-trunk MHA model with shared-expert MoE layers"
        ffn = model.blocks[routed_layers(model)[0]].ffn
        if ffn.shared is None:
            return ("Qwen2-MoE always has a shared expert; nearest exportable: moe.n_shared=1 with "
                    "moe.shared_gate=true (Qwen2-MoE), or variant topk (Mixtral)")
        if ffn.shared_gate is None:
            return ("Qwen2-MoE scales its shared expert by a learned sigmoid gate, this model adds it ungated; "
                    "nearest exportable: moe.shared_gate=true")
        problem = routed_problem(model, "Qwen2-MoE")
        if problem:
            return problem
        if ffn.routed_scaling_factor != 1.0:
            return "Qwen2-MoE does not rescale the routed gates; nearest exportable: moe.routed_scaling_factor=1"
        return None

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        routed = routed_layers(model)
        ffn = model.blocks[routed[0]].ffn
        cfg = model.config
        return {**common_config(model, eot_id, self.architecture, "qwen2_moe"),
                "num_experts": ffn.n_expert, "num_experts_per_tok": ffn.top_k, "norm_topk_prob": ffn.normalize_topk,
                "moe_intermediate_size": ffn.experts.hidden,
                "shared_expert_intermediate_size": ffn.shared.w_out.shape[0],
                "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(cfg.n_layer) if i not in routed],
                "router_aux_loss_coef": model.moe_config.balance_coef, "output_router_logits": False,
                "qkv_bias": True, "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": cfg.n_layer, **experts_kernel([cfg.n_embd, ffn.experts.hidden])}

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = trunk_weights(src, model)
        for i, block in enumerate(model.blocks):
            ours, theirs = f"blocks.{i}.ffn", f"model.layers.{i}.mlp"
            for proj in ("q_proj", "k_proj", "v_proj"):
                weight = out[f"model.layers.{i}.self_attn.{proj}.weight"]
                out[f"model.layers.{i}.self_attn.{proj}.bias"] = weight.new_zeros(weight.shape[0])
            if not isinstance(block.ffn, SharedExpertMoE):
                out.update(mlp_weights(src, f"{ours}.mlp", theirs))
                continue
            out[f"{theirs}.gate.weight"] = src[f"{ours}.router.weight"]
            out.update(expert_weights(src, f"{ours}.experts", f"{theirs}.experts", NAMES))
            out.update(mlp_weights(src, f"{ours}.shared", f"{theirs}.shared_expert"))
            out[f"{theirs}.shared_expert_gate.weight"] = src[f"{ours}.shared_gate.weight"]
        return src.finish(out, self.architecture)
