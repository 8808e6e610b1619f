"""gpt2 trunk with a dense GELU or ReLU FFN -> transformers' GPT2LMHeadModel, exactly.

moegpt's trunk is GPT-2's: learned positions, pre-LayerNorm blocks (eps 1e-5), fused q/k/v in head-major
order, attention scaled by 1/sqrt(head_dim), a final LayerNorm and a head tied to the token embedding (or not).
What differs is only storage: GPT-2's Conv1D keeps weights [in, out] (moegpt's Linear: [out, in]), and
GPT-2 always has biases (moegpt's are absent unless model.bias; written as zeros). The dense FFN's
w_in [C, H] and w_out [H, C] already are Conv1D's layout. GPT-2's MLP has one activation between two
matrices: exact GELU ("gelu", not GPT-2's tanh "gelu_new") and ReLU map; SwiGLU and `linear` do not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.export.mapping import Mapping, SourceWeights, register, tied_head_unused, trunk
from moegpt.model import GPT
from moegpt.moe.dense import DenseFFN

# moegpt activation -> transformers' ACT2FN name of the same function
ACTIVATIONS = {"gelu": "gelu", "relu": "relu"}
GPT2_NEAREST = "a dense GELU FFN (--moe dense --activation gelu: GPT-2)"


@register
class GPT2Mapping(Mapping):
    architecture = "GPT2LMHeadModel"
    summary = "gpt2 trunk with a dense GELU or ReLU FFN (GPT-2)"

    def claims(self, model: nn.Module) -> bool:
        return isinstance(model, GPT) and trunk(model) == "gpt2"

    def refusal(self, model: nn.Module) -> str | None:
        if not self.claims(model):
            return "not a gpt2-trunk moegpt model"
        ffns = [block.ffn for block in model.blocks]
        routed = [i for i, ffn in enumerate(ffns) if not isinstance(ffn, DenseFFN)]
        if routed:
            return (f"layers {', '.join(map(str, routed))} are {model.moe_config.variant} MoE layers on the gpt2 "
                    f"trunk, which no transformers architecture has; nearest exportable: the llama trunk "
                    f"(model.arch=llama; topk: Mixtral) or {GPT2_NEAREST}")
        activation = ffns[0].mlp.activation
        if activation not in ACTIVATIONS:
            return (f"GPT-2's MLP has no {activation} FFN (it applies one activation between two matrices); "
                    f"nearest exportable: {GPT2_NEAREST}, or model.arch=llama with swiglu (Llama)")
        return None

    def hf_config(self, model: nn.Module, eot_id: int) -> dict:
        cfg = model.config
        return {
            "architectures": [self.architecture], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.resolved_ffn_hidden,
            "activation_function": ACTIVATIONS[model.blocks[0].ffn.mlp.activation],
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "layer_norm_epsilon": model.ln_f.eps, "initializer_range": 0.02,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
            "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": "float32",
        }

    def hf_weights(self, model: nn.Module) -> dict[str, Tensor]:
        src = SourceWeights(model, unused=tied_head_unused(model))
        out = {"transformer.wte.weight": src["wte.weight"], "transformer.wpe.weight": src["wpe.weight"]}
        if not model.config.tie_embeddings:
            out["lm_head.weight"] = src["lm_head.weight"]
        for i in range(len(model.blocks)):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for norm in ("ln_1", "ln_2"):
                out.update(layer_norm(src, ours + norm, theirs + norm))
            for proj in ("c_attn", "c_proj"):
                weight = src[f"{ours}attn.{proj}.weight"]
                out[f"{theirs}attn.{proj}.weight"] = weight.t()
                out[f"{theirs}attn.{proj}.bias"] = bias_or_zeros(src, f"{ours}attn.{proj}.bias", weight.shape[0])
            w_in, w_out = src[f"{ours}ffn.mlp.w_in"], src[f"{ours}ffn.mlp.w_out"]
            out[f"{theirs}mlp.c_fc.weight"] = w_in
            out[f"{theirs}mlp.c_fc.bias"] = w_in.new_zeros(w_in.shape[1])
            out[f"{theirs}mlp.c_proj.weight"] = w_out
            out[f"{theirs}mlp.c_proj.bias"] = w_out.new_zeros(w_out.shape[1])
        out.update(layer_norm(src, "ln_f", "transformer.ln_f"))
        return src.finish(out, self.architecture)


def bias_or_zeros(src: SourceWeights, name: str, size: int) -> Tensor:
    bias = src.get(name)
    return torch.zeros(size) if bias is None else bias


def layer_norm(src: SourceWeights, ours: str, theirs: str) -> dict[str, Tensor]:
    weight = src[f"{ours}.weight"]
    return {f"{theirs}.weight": weight, f"{theirs}.bias": bias_or_zeros(src, f"{ours}.bias", weight.shape[0])}
