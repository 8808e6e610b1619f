"""What the DeepSeek-V2 and -V3 mappings share: MLA config keys, the first-k-dense layout, MoE weights.

Both put dense SwiGLU MLPs in their first first_k_dense_replace layers and a MoE block in every later one:
a router `gate` [E, C], per-expert SwiGLU experts, and shared experts summed unweighted (transformers
builds them from n_shared_experts * moe_intermediate_size, an empty MLP when there are none).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.export.llama_parts import (
    common_config,
    expert_weights,
    experts_kernel,
    mlp_weights,
    routed_layers,
    routed_problem,
)
from moegpt.export.mapping import SourceWeights
from moegpt.moe import expert_hidden as expert_hidden_of

NAMES = ("gate_proj", "up_proj", "down_proj")


def layout_problem(model: nn.Module, target: str) -> str | None:
    """SwiGLU everywhere, dropless experts, and dense layers only before the first MoE layer."""
    problem = routed_problem(model, target)
    if problem:
        return problem
    if model.moe_config.activation != "swiglu":
        return f"{target}'s MLPs are SwiGLU; nearest exportable: moe.activation=swiglu"
    routed = routed_layers(model)
    if routed and routed != list(range(routed[0], len(model.blocks))):
        return (f"{target}'s dense layers are its first ones, then every layer is MoE; "
                "nearest exportable: moe.moe_every=1")
    return None


def first_routed(model: nn.Module) -> nn.Module | None:
    routed = routed_layers(model)
    return model.blocks[routed[0]].ffn if routed else None


def deepseek_config(model: nn.Module, eot_id: int, architecture: str, model_type: str) -> dict:
    cfg, moe, ffn = model.config, model.moe_config, first_routed(model)
    routed = routed_layers(model)
    expert_hidden = ffn.experts.hidden if ffn else expert_hidden_of(cfg, moe)
    shared = getattr(ffn, "shared", None)
    n_expert = ffn.n_expert if ffn else moe.n_expert
    return {**common_config(model, eot_id, architecture, model_type),
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim, "attention_bias": False,
            "first_k_dense_replace": routed[0] if routed else cfg.n_layer,
            "n_routed_experts": n_expert, "num_experts": n_expert,  # transformers 4.x and 5 names
            "num_experts_per_tok": ffn.top_k if ffn else moe.top_k, "moe_intermediate_size": expert_hidden,
            "n_shared_experts": 0 if shared is None else shared.w_out.shape[0] // expert_hidden,
            "routed_scaling_factor": moe.routed_scaling_factor,
            **experts_kernel([cfg.n_embd, expert_hidden])}


def moe_weights(src: SourceWeights, model: nn.Module, extra: dict[str, str]) -> dict[str, Tensor]:
    """Every layer's FFN: dense MLP, or router + experts + shared experts; `extra` maps further router
    tensors of ours (e.g. "expert_bias") to theirs."""
    out, C = {}, model.config.n_embd
    for i, block in enumerate(model.blocks):
        ours, theirs = f"blocks.{i}.ffn", f"model.layers.{i}.mlp"
        if i not in routed_layers(model):
            out.update(mlp_weights(src, f"{ours}.mlp", theirs))
            continue
        out[f"{theirs}.gate.weight"] = src[f"{ours}.router.weight"]
        out.update({f"{theirs}.gate.{name}": src[f"{ours}.{mine}"] for mine, name in extra.items()})
        out.update(expert_weights(src, f"{ours}.experts", f"{theirs}.experts", NAMES))
        if getattr(block.ffn, "shared", None) is not None:
            out.update(mlp_weights(src, f"{ours}.shared", f"{theirs}.shared_experts"))
        else:  # n_shared_experts = 0: transformers still builds the (empty) shared MLP
            empty = {"gate_proj": torch.zeros(0, C), "up_proj": torch.zeros(0, C), "down_proj": torch.zeros(C, 0)}
            out.update({f"{theirs}.shared_experts.{name}.weight": w for name, w in empty.items()})
    return out
