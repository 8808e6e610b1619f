"""What the llama-trunk mappings share: the trunk's config keys and weights, SwiGLU MLPs, routed-layer checks.

moegpt's llama trunk is transformers' Llama layout: RMSNorm before attention and FFN (input_layernorm,
post_attention_layernorm), a final norm, RoPE in the rotate-half layout, no biases, tied or untied head.
Its MHA keeps q, k, v fused in one [3C, C] matrix (row blocks q, k, v, head-major), which splits into
q_proj/k_proj/v_proj; MLA's parameters already carry DeepseekV3Attention's names. A SwiGLU FFN stores
w_in [C, 2H] (gate columns, then up columns) and w_out [H, C]: gate_proj = w_in[:, :H]^T,
up_proj = w_in[:, H:]^T, down_proj = w_out^T.
"""

from __future__ import annotations

from torch import Tensor, nn

from moegpt.export.mapping import SourceWeights, trunk
from moegpt.mla import MultiHeadLatentAttention
from moegpt.moe.dense import DenseFFN

MLA_NAMES = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
             "kv_b_proj", "o_proj")


def is_llama(model: nn.Module) -> bool:
    return trunk(model) == "llama"


def uses_mla(model: nn.Module) -> bool:
    return isinstance(model.blocks[0].attn, MultiHeadLatentAttention)


def routed_layers(model: nn.Module) -> list[int]:
    return [i for i, block in enumerate(model.blocks) if not isinstance(block.ffn, DenseFFN)]


def ffn_activation(model: nn.Module) -> str:
    return model.moe_config.activation


def routed_problem(model: nn.Module, target: str) -> str | None:
    """What stops token-choice routed layers from matching a transformers MoE block: experts that are not
    SwiGLU, or capacity drops."""
    if ffn_activation(model) != "swiglu":
        return (f"{target}'s experts are SwiGLU MLPs, not {ffn_activation(model)}; "
                "nearest exportable: moe.activation=swiglu")
    for i in routed_layers(model):  # token-choice layers (the callers have checked the router's class)
        capacity = getattr(model.blocks[i].ffn, "capacity_factor", 0.0)
        if capacity > 0:
            return (f"{target} is dropless, and this model drops tokens past a capacity factor of "
                    f"{capacity:g}; nearest exportable: moe.capacity_factor=0")
    return None


def common_config(model: nn.Module, eot_id: int, architecture: str, model_type: str) -> dict:
    cfg = model.config
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": [architecture], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.n_embd, "intermediate_size": cfg.resolved_ffn_hidden,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads rope_parameters, 4.x rope_theta
        "rope_theta": cfg.rope_theta, "rope_parameters": rope, "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": cfg.dropout, "initializer_range": 0.02,
        "use_cache": True, "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
    }


def experts_kernel(widths: list[int]) -> dict:
    """transformers 5's default experts kernel (grouped matmul) needs rows aligned to 16 bytes on CPU; for
    narrower widths the export names its per-expert loop ("eager"), the same arithmetic."""
    return {} if all(w % 8 == 0 for w in widths) else {"experts_implementation": "eager"}


def swiglu(w_in_CH2: Tensor, w_out_HC: Tensor) -> dict[str, Tensor]:
    H = w_out_HC.shape[0]
    return {"gate_proj": w_in_CH2[:, :H].t(), "up_proj": w_in_CH2[:, H:].t(), "down_proj": w_out_HC.t()}


def mlp_weights(src: SourceWeights, ours: str, theirs: str) -> dict[str, Tensor]:
    """A dense SwiGLU MLP (`ours`.w_in / .w_out) as `theirs`.gate_proj/up_proj/down_proj.weight."""
    parts = swiglu(src[f"{ours}.w_in"], src[f"{ours}.w_out"])
    return {f"{theirs}.{name}.weight": w for name, w in parts.items()}


def expert_weights(src: SourceWeights, ours: str, theirs: str, names: tuple[str, str, str]) -> dict[str, Tensor]:
    """An ExpertBank (`ours`.w_in [E, C, 2H], .w_out [E, H, C]) as per-expert `theirs`.{e}.<gate, up, down>.weight,
    the layout of the published checkpoints (transformers 5 fuses them on loading)."""
    w_in, w_out = src[f"{ours}.w_in"], src[f"{ours}.w_out"]
    out = {}
    for e in range(w_in.shape[0]):
        for name, w in zip(names, swiglu(w_in[e], w_out[e]).values(), strict=True):
            out[f"{theirs}.{e}.{name}.weight"] = w
    return out


def trunk_weights(src: SourceWeights, model: nn.Module) -> dict[str, Tensor]:
    """Embedding, norms, attention and head under Llama-family names (FFNs are the caller's)."""
    out = {"model.embed_tokens.weight": src["wte.weight"], "model.norm.weight": src["ln_f.weight"]}
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = src["lm_head.weight"]
    for i, block in enumerate(model.blocks):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[f"{theirs}input_layernorm.weight"] = src[f"{ours}ln_1.weight"]
        out[f"{theirs}post_attention_layernorm.weight"] = src[f"{ours}ln_2.weight"]
        if isinstance(block.attn, MultiHeadLatentAttention):
            for name in list(src.tensors):
                if name.startswith(f"{ours}attn.") and name.split(".")[3] in MLA_NAMES:
                    out[theirs + "self_attn." + name[len(f"{ours}attn."):]] = src[name]
        else:
            q, k, v = src[f"{ours}attn.c_attn.weight"].chunk(3, dim=0)
            out.update({f"{theirs}self_attn.{n}_proj.weight": w for n, w in zip("qkv", (q, k, v), strict=True)})
            out[f"{theirs}self_attn.o_proj.weight"] = src[f"{ours}attn.c_proj.weight"]
    return out
