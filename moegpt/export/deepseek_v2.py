"""llama trunk with MLA and softmax top-k routing (shared or topk) -> transformers' DeepseekV2ForCausalLM.

DeepSeek-V2's router takes the softmax over all experts of fp32 logits and keeps the top k unrenormalised
(topk_method "greedy"), times routed_scaling_factor: moegpt's shared or topk with normalize_topk off. Its
shared experts are summed unweighted (moegpt's shared without shared_gate; topk: none).

Its attention is MLA with RoPE on interleaved pairs (2i, 2i+1), where moegpt rotates the pairs (i, i + P/2)
of the P rotary dimensions. Permuting the rotary rows of the query and key projections by
[0, P/2, 1, P/2 + 1, ...] turns one layout into the other; the same permutation of queries and keys
leaves every attention score unchanged. DeepSeek-V2's inner MLA norms use eps 1e-6.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.config import ModelConfig
from moegpt.export.deepseek_parts import deepseek_config, first_routed, layout_problem, moe_weights
from moegpt.export.llama_parts import is_llama, trunk_weights, uses_mla
from moegpt.export.mapping import Mapping, SourceWeights, register, tied_head_unused
from moegpt.moe.shared import SharedExpertMoE
from moegpt.moe.topk import TopKMoE

INNER_NORM_EPS = 1e-6


@register
class DeepseekV2Mapping(Mapping):
    architecture = "DeepseekV2ForCausalLM"
    summary = "llama trunk with MLA and shared or topk routing with moe.normalize_topk=false (DeepSeek-V2)"

    def claims(self, model: nn.Module) -> bool:
        return is_llama(model) and uses_mla(model) and type(first_routed(model)) in (TopKMoE, SharedExpertMoE)

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a llama-trunk MLA model with softmax top-k routing"
        ffn = first_routed(model)
        if getattr(ffn, "shared_gate", None) is not None:
            return "DeepSeek-V2 adds its shared experts ungated; nearest exportable: moe.shared_gate=false"
        if ffn.normalize_topk:
            return ("DeepSeek-V2 keeps the top-k softmax gates as they are, not renormalised; nearest exportable: "
                    "moe.normalize_topk=false, or variant aux-free (DeepSeek-V3)")
        if model.config.norm_eps != INNER_NORM_EPS:
            return (f"DeepSeek-V2's MLA latent norms use eps {INNER_NORM_EPS:g}, this model "
                    f"{model.config.norm_eps:g}; nearest exportable: model.norm_eps={INNER_NORM_EPS:g}")
        return layout_problem(model, "DeepSeek-V2")

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        return {**deepseek_config(model, eot_id, self.architecture, "deepseek_v2"), "topk_method": "greedy",
                "n_group": 1, "topk_group": 1, "norm_topk_prob": False}

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = {**trunk_weights(src, model), **moe_weights(src, model, {})}
        interleave_rotary_rows(out, model.config)
        return src.finish(out, self.architecture)


def interleave_rotary_rows(out: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Reorder the rotary output rows of every query and key projection in `out` to interleaved pairs."""
    P, N, H, R = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.n_head, cfg.kv_lora_rank
    order = torch.stack((torch.arange(P // 2), torch.arange(P // 2) + P // 2), dim=1).reshape(-1)
    per_head = torch.cat((torch.arange(N), N + order))  # a query head's rows: nope, then rotary
    query_rows = torch.cat([h * (N + P) + per_head for h in range(H)])
    key_rows = torch.cat((torch.arange(R), R + order))  # the latent's rows, then the one rotary key
    for name in list(out):
        if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
            out[name] = out[name][query_rows]
        elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
            out[name] = out[name][key_rows]
