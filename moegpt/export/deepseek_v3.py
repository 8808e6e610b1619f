"""llama trunk with MLA and aux-free routing -> transformers' DeepseekV3ForCausalLM, exactly.

DeepSeek-V3's router is moegpt's aux-free: sigmoid affinities s of fp32 logits, experts chosen by the top k
of s + b (b = e_score_correction_bias, moegpt's expert_bias) within the topk_group groups whose two best
biased scores sum highest, gates = the chosen s (renormalised when norm_topk_prob) times
routed_scaling_factor. MLA's parameters carry DeepseekV3Attention's names, with RoPE in the rotate-half
layout (rope_interleave false). A dense MLA model is DeepSeek-V3 with every layer dense.
"""

from __future__ import annotations

from torch import Tensor, nn

from moegpt.export.deepseek_parts import deepseek_config, first_routed, layout_problem, moe_weights
from moegpt.export.llama_parts import is_llama, trunk_weights, uses_mla
from moegpt.export.mapping import Mapping, SourceWeights, register, tied_head_unused
from moegpt.moe.aux_free import AuxFreeMoE
from moegpt.moe.shared import SharedExpertMoE
from moegpt.moe.topk import TopKMoE


@register
class DeepseekV3Mapping(Mapping):
    architecture = "DeepseekV3ForCausalLM"
    summary = "llama trunk with MLA and the aux-free variant or a dense SwiGLU FFN (DeepSeek-V3)"

    def claims(self, model: nn.Module) -> bool:  # softmax routers with MLA are DeepSeek-V2's
        return is_llama(model) and uses_mla(model) and type(first_routed(model)) not in (TopKMoE, SharedExpertMoE)

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a llama-trunk MLA model with aux-free routing or no MoE"
        ffn = first_routed(model)
        if ffn is not None and not isinstance(ffn, AuxFreeMoE):
            return (f"DeepSeek-V3 routes by sigmoid affinities with a selection bias, which "
                    f"{model.moe_config.variant} does not; nearest exportable: variant aux-free")
        problem = layout_problem(model, "DeepSeek-V3")
        if problem:
            return problem
        if ffn is not None and ffn.n_expert // ffn.n_group < 2:
            return ("DeepSeek-V3 scores an expert group by its two best experts; nearest exportable: "
                    "at least two experts per group (moe.n_expert >= 2 * moe.n_group)")
        return None

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        ffn = first_routed(model)
        return {**deepseek_config(model, eot_id, self.architecture, "deepseek_v3"), "rope_interleave": False,
                "n_group": ffn.n_group if ffn else 1, "topk_group": ffn.topk_group if ffn else 1,
                "norm_topk_prob": ffn.normalize_topk if ffn else True, "num_mtp_layers": 0}

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = {**trunk_weights(src, model), **moe_weights(src, model, {"expert_bias": "e_score_correction_bias"})}
        return src.finish(out, self.architecture)
