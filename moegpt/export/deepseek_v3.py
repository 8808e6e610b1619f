"""llama trunk with MLA and aux-free routing -> transformers' DeepseekV3ForCausalLM, exactly.

DeepSeek-V3's router is moegpt's aux-free: sigmoid affinities s of fp32 logits, experts chosen by the top k
of s + b (b = e_score_correction_bias, moegpt's expert_bias) within the topk_group groups whose two best
biased scores sum highest, gates = the chosen s (renormalised when norm_topk_prob) times
routed_scaling_factor. Its first first_k_dense_replace layers are dense SwiGLU MLPs, the rest MoE; its
shared experts (n_shared_experts) are summed unweighted (none here: an empty MLP). MLA's parameters carry
DeepseekV3Attention's names, with RoPE in the rotate-half layout (rope_interleave false).
"""

from __future__ import annotations

import torch
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
from moegpt.moe.aux_free import AuxFreeMoE

NAMES = ("gate_proj", "up_proj", "down_proj")


@register
class DeepseekV3Mapping(Mapping):
    name = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    summary = "llama trunk with MLA and the aux-free variant or a dense SwiGLU FFN (DeepSeek-V3)"

    def claims(self, model: nn.Module) -> bool:
        return is_llama(model) and uses_mla(model)

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a llama-trunk MLA model"
        routed = routed_layers(model)
        if routed and not isinstance(model.blocks[routed[0]].ffn, AuxFreeMoE):
            return (f"DeepSeek-V3 routes by sigmoid affinities with a selection bias, which "
                    f"{model.moe_config.variant} does not; nearest exportable: variant aux-free")
        problem = routed_problem(model, "DeepSeek-V3")
        if problem:
            return problem
        if model.moe_config.activation != "swiglu":
            return "DeepSeek-V3's MLPs are SwiGLU; nearest exportable: moe.activation=swiglu"
        if routed and routed != list(range(routed[0], len(model.blocks))):
            return ("DeepSeek-V3's dense layers are its first ones, then every layer is MoE; "
                    "nearest exportable: moe.moe_every=1")
        ffn = model.blocks[routed[0]].ffn if routed else None
        if ffn is not None and ffn.n_expert // ffn.n_group < 2:
            return ("DeepSeek-V3 scores an expert group by its two best experts; nearest exportable: "
                    "at least two experts per group (moe.n_expert >= 2 * moe.n_group)")
        return None

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        cfg, routed = model.config, routed_layers(model)
        ffn = model.blocks[routed[0]].ffn if routed else None
        moe = model.moe_config
        shared = getattr(ffn, "shared", None)
        expert_hidden = ffn.experts.hidden if ffn else moe.resolved_expert_hidden(cfg.resolved_ffn_hidden)
        return {**common_config(model, eot_id, self.architecture, "deepseek_v3"),
                "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
                "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
                "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim, "rope_interleave": False,
                "attention_bias": False, "first_k_dense_replace": routed[0] if routed else cfg.n_layer,
                "n_routed_experts": ffn.n_expert if ffn else moe.n_expert,
                "num_experts_per_tok": ffn.top_k if ffn else moe.top_k, "moe_intermediate_size": expert_hidden,
                "n_shared_experts": 0 if shared is None else shared.w_out.shape[0] // expert_hidden,
                "routed_scaling_factor": moe.routed_scaling_factor,
                "n_group": ffn.n_group if ffn else 1, "topk_group": ffn.topk_group if ffn else 1,
                "norm_topk_prob": ffn.normalize_topk if ffn else True, "num_mtp_layers": 0,
                **experts_kernel([cfg.n_embd, expert_hidden])}

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = trunk_weights(src, model)
        C = model.config.n_embd
        for i, block in enumerate(model.blocks):
            ours, theirs = f"blocks.{i}.ffn", f"model.layers.{i}.mlp"
            if not isinstance(block.ffn, AuxFreeMoE):
                out.update(mlp_weights(src, f"{ours}.mlp", theirs))
                continue
            out[f"{theirs}.gate.weight"] = src[f"{ours}.router.weight"]
            out[f"{theirs}.gate.e_score_correction_bias"] = src[f"{ours}.expert_bias"]
            out.update(expert_weights(src, f"{ours}.experts", f"{theirs}.experts", NAMES))
            if getattr(block.ffn, "shared", None) is not None:
                out.update(mlp_weights(src, f"{ours}.shared", f"{theirs}.shared_experts"))
            else:  # n_shared_experts = 0: transformers still builds the (empty) shared MLP
                empty = {"gate_proj": torch.zeros(0, C), "up_proj": torch.zeros(0, C), "down_proj": torch.zeros(C, 0)}
                out.update({f"{theirs}.shared_experts.{name}.weight": w for name, w in empty.items()})
        return src.finish(out, self.architecture)
