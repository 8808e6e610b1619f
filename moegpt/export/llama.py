"""llama trunk (MHA) with a dense SwiGLU FFN in every layer -> transformers' LlamaForCausalLM, exactly.

The routed mappings' trunk with no MoE layer: Llama's MLP is down(silu(gate x) * up x), moegpt's SwiGLU.
"""

from __future__ import annotations

from torch import Tensor, nn

from moegpt.export.llama_parts import common_config, is_llama, mlp_weights, routed_layers, trunk_weights, uses_mla
from moegpt.export.mapping import Mapping, SourceWeights, register, tied_head_unused


@register
class LlamaMapping(Mapping):
    architecture = "LlamaForCausalLM"
    summary = "llama trunk with MHA and a dense SwiGLU FFN (Llama)"

    def claims(self, model: nn.Module) -> bool:
        return is_llama(model) and not uses_mla(model) and not routed_layers(model)

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a dense llama-trunk MHA model"
        if model.moe_config.activation != "swiglu":
            return (f"Llama's MLP is SwiGLU, not {model.moe_config.activation}; "
                    "nearest exportable: moe.activation=swiglu")
        return None

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        return {**common_config(model, eot_id, self.architecture, "llama"), "attention_bias": False,
                "mlp_bias": False, "head_dim": model.config.n_embd // model.config.n_head, "pretraining_tp": 1}

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = trunk_weights(src, model)
        for i in range(len(model.blocks)):
            out.update(mlp_weights(src, f"blocks.{i}.ffn.mlp", f"model.layers.{i}.mlp"))
        return src.finish(out, self.architecture)
