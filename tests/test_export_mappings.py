"""Which models export to which transformers class, and the one-line refusals (reason + nearest exportable)."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.errors import MoegptError
from moegpt.export import MAPPINGS, ExportRefused, choose_mapping
from moegpt.export.gpt2 import GPT2Mapping
from moegpt.model import GPT

MLA = {"attention": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 4}


def gpt(variant: str = "dense", activation: str = "swiglu", arch: str = "gpt2", model: dict | None = None,
        **moe) -> GPT:
    cfg = ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, arch=arch, **(model or {}))
    return GPT(cfg, MoEConfig(variant=variant, activation=activation, n_expert=4, top_k=2, **moe))


@pytest.mark.parametrize("kwargs, architecture", [
    ({"activation": "gelu"}, "GPT2LMHeadModel"),
    ({"variant": "topk", "activation": "relu", "first_dense": 2}, "GPT2LMHeadModel"),  # no layer is MoE
    ({"arch": "llama"}, "LlamaForCausalLM"),
    ({"arch": "llama", "variant": "topk"}, "MixtralForCausalLM"),
    ({"arch": "llama", "variant": "shared", "shared_gate": True, "moe_every": 2}, "Qwen2MoeForCausalLM"),
    ({"arch": "llama", "variant": "aux-free", "model": MLA}, "DeepseekV3ForCausalLM"),
    ({"arch": "llama", "model": MLA}, "DeepseekV3ForCausalLM"),
    ({"arch": "llama", "variant": "shared", "normalize_topk": False, "first_dense": 1, "model": MLA},
     "DeepseekV2ForCausalLM"),
    ({"arch": "llama", "variant": "topk", "normalize_topk": False, "model": MLA}, "DeepseekV2ForCausalLM"),
])
def test_exact_mappings(kwargs, architecture):
    model = gpt(**kwargs)
    assert choose_mapping(model).architecture == architecture
    assert sum(m.refusal(model) is None for m in MAPPINGS) == 1 and sum(m.claims(model) for m in MAPPINGS) == 1


@pytest.mark.parametrize("variant", ["topk", "noisy-topk", "switch", "shared", "expert-choice", "soft", "aux-free",
                                     "basic"])
def test_moe_on_the_gpt2_trunk_is_refused(variant):
    with pytest.raises(ExportRefused, match=f"{variant} MoE layers on the gpt2 trunk.*nearest exportable: "
                                            "the llama trunk.*gelu"):
        choose_mapping(gpt(variant))


@pytest.mark.parametrize("kwargs, fragments", [
    ({"activation": "swiglu"}, ["GPT-2's MLP has no swiglu FFN", "--activation gelu", "model.arch=llama"]),
    ({"activation": "linear"}, ["GPT-2's MLP has no linear FFN"]),
    ({"arch": "llama", "activation": "gelu"}, ["Llama's MLP is SwiGLU", "moe.activation=swiglu"]),
    ({"arch": "llama", "variant": "switch"}, ["Mixtral routes by renormalised softmax top-k", "variant topk"]),
    ({"arch": "llama", "variant": "noisy-topk"}, ["which noisy-topk is not", "variant topk"]),
    ({"arch": "llama", "variant": "expert-choice"}, ["which expert-choice is not", "variant topk"]),
    ({"arch": "llama", "variant": "soft"}, ["which soft is not"]),
    ({"arch": "llama", "variant": "aux-free"}, ["which aux-free is not", "model.attention=mla (DeepSeek-V3)"]),
    ({"arch": "llama", "variant": "topk", "capacity_factor": 1.25}, ["dropless", "moe.capacity_factor=0"]),
    ({"arch": "llama", "variant": "topk", "activation": "gelu"}, ["experts are SwiGLU MLPs, not gelu"]),
    ({"arch": "llama", "variant": "topk", "first_dense": 1}, ["MoE FFN in every layer", "moe.first_dense=0"]),
    ({"arch": "llama", "variant": "topk", "normalize_topk": False}, ["renormalises", "moe.normalize_topk=true"]),
    ({"arch": "llama", "variant": "topk", "routed_scaling_factor": 2.0}, ["moe.routed_scaling_factor=1"]),
    ({"arch": "llama", "variant": "shared"}, ["sigmoid gate", "moe.shared_gate=true"]),
    ({"arch": "llama", "variant": "shared", "n_shared": 0}, ["always has a shared expert"]),
    ({"arch": "llama", "variant": "switch", "model": MLA}, ["DeepSeek-V3 routes by sigmoid", "variant aux-free"]),
    ({"arch": "llama", "variant": "topk", "model": MLA}, ["DeepSeek-V2 keeps the top-k", "moe.normalize_topk=false"]),
    ({"arch": "llama", "variant": "shared", "model": MLA}, ["not renormalised", "variant aux-free (DeepSeek-V3)"]),
    ({"arch": "llama", "variant": "shared", "normalize_topk": False, "shared_gate": True, "model": MLA},
     ["ungated", "moe.shared_gate=false"]),
    ({"arch": "llama", "variant": "shared", "normalize_topk": False, "model": {**MLA, "norm_eps": 1e-5}},
     ["eps 1e-06", "model.norm_eps=1e-06"]),
    ({"arch": "llama", "variant": "shared", "normalize_topk": False, "moe_every": 2, "model": MLA},
     ["DeepSeek-V2's dense layers are its first"]),
    ({"arch": "llama", "variant": "aux-free", "moe_every": 2, "model": MLA}, ["dense layers are its first",
                                                                              "moe.moe_every=1"]),
    ({"arch": "llama", "variant": "aux-free", "n_group": 4, "topk_group": 2, "model": MLA},
     ["two best experts", "moe.n_expert >= 2 * moe.n_group"]),
])
def test_refusals_name_the_reason_and_the_nearest_export(kwargs, fragments):
    model = gpt(**kwargs)
    assert sum(m.claims(model) for m in MAPPINGS) == 1  # one mapping explains the refusal
    with pytest.raises(ExportRefused) as refused:
        choose_mapping(model)
    message = str(refused.value)
    assert message.startswith("cannot export: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "nearest exportable" in message


def test_a_weight_no_mapping_places_stops_the_export():
    model = gpt(activation="gelu")
    model.blocks[0].extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(MoegptError, match="does not place these weights: blocks.0.extra"):
        GPT2Mapping().hf_weights(model)
