"""Router conventions of the DeepSeek/Qwen references: routed_scaling_factor, normalize_topk in aux-free,
and the sigmoid gate on the shared experts. Each checked against a direct computation."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe import VARIANTS, variant_problems
from moegpt.moe.experts import mlp_apply

pytestmark = pytest.mark.usefixtures("single_thread")
MODEL = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16)


def layer(variant: str, seed: int = 0, **kw):
    cfg = MoEConfig(**{"variant": variant, "n_expert": 4, "top_k": 2, "expert_hidden": 8, **kw})
    assert not cfg.problems(), cfg.problems()
    torch.manual_seed(seed)
    module = VARIANTS[variant].layer(MODEL, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module.eval()


def routed_reference(module, x_BTC: torch.Tensor, weight_fn) -> torch.Tensor:
    """Sum over the chosen experts of gate * expert(x), one token at a time."""
    x_NC = x_BTC.reshape(-1, x_BTC.shape[-1])
    logits_NE = x_NC @ module.router.weight.t()
    out = torch.zeros_like(x_NC)
    bank = module.experts
    for n in range(x_NC.shape[0]):
        idx, gates = weight_fn(logits_NE[n])
        for e, g in zip(idx.tolist(), gates, strict=True):
            out[n] += g * mlp_apply(x_NC[n:n + 1], bank.w_in[e], bank.w_out[e], bank.activation)[0]
    return out.reshape(x_BTC.shape)


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("variant", ["topk", "aux-free", "shared"])
def test_routed_scaling_factor_scales_the_routed_output(variant):
    with torch.no_grad():
        base, _ = layer(variant, n_shared=0)(X)
        scaled, stats = layer(variant, n_shared=0, routed_scaling_factor=2.5)(X)
    torch.testing.assert_close(scaled, 2.5 * base, atol=1e-5, rtol=1e-5)
    assert float(stats.expert_weight_NK.sum(-1).mean()) == pytest.approx(2.5, rel=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_aux_free_gates_are_sigmoid_affinities_optionally_normalised(normalize):
    module = layer("aux-free", normalize_topk=normalize, routed_scaling_factor=1.5)

    def gates(logits_E):
        scores = torch.sigmoid(logits_E)
        idx = torch.topk(scores + module.expert_bias, 2).indices
        chosen = scores[idx]
        return idx, 1.5 * (chosen / chosen.sum() if normalize else chosen)

    with torch.no_grad():
        got, _ = module(X)
        torch.testing.assert_close(got, routed_reference(module, X, gates), atol=1e-5, rtol=1e-5)


def test_shared_gate_scales_shared_experts_by_a_sigmoid_per_token():
    module = layer("shared", shared_gate=True, n_shared=1, normalize_topk=False)
    assert module.shared_gate.weight.shape == (1, 16)

    def gates(logits_E):
        probs = torch.softmax(logits_E, -1)
        top = torch.topk(probs, 2)
        return top.indices, top.values

    with torch.no_grad():
        got, _ = module(X)
        shared = torch.sigmoid(X @ module.shared_gate.weight.t()) * module.shared(X)
        torch.testing.assert_close(got, routed_reference(module, X, gates) + shared, atol=1e-5, rtol=1e-5)
    ungated = layer("shared", n_shared=1)
    assert ungated.shared_gate is None
    assert module.active_params(16) == ungated.active_params(16) + 16


def test_bad_router_convention_keys():
    assert any("routed_scaling_factor" in p for p in MoEConfig(routed_scaling_factor=0.0).problems())
    assert any("shared_gate" in p for p in variant_problems(MoEConfig(variant="topk", shared_gate=True)))


@pytest.mark.parametrize("normalize", [True, False])
def test_aux_free_equals_transformers_deepseek_v3_routed_experts(normalize):
    modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
                              moe_intermediate_size=8, n_shared_experts=1, norm_topk_prob=normalize,
                              routed_scaling_factor=2.5, hidden_act="silu")
    theirs = modeling.DeepseekV3MoE(config).eval()
    ours = layer("aux-free", n_expert=8, top_k=3, n_group=4, topk_group=2, normalize_topk=normalize,
                 routed_scaling_factor=2.5)
    with torch.no_grad():
        ours.expert_bias.copy_(torch.randn(8, generator=torch.Generator().manual_seed(3)) * 0.1)
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.gate.e_score_correction_bias.copy_(ours.expert_bias)
        theirs.experts.gate_up_proj.copy_(ours.experts.w_in.transpose(1, 2))
        theirs.experts.down_proj.copy_(ours.experts.w_out.transpose(1, 2))
        got, _ = ours(X)
        expected = theirs(X) - theirs.shared_experts(X)  # moegpt's aux-free has no shared experts
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_shared_with_gate_equals_transformers_qwen2_moe_block(normalize):
    modeling = pytest.importorskip("transformers.models.qwen2_moe.modeling_qwen2_moe")
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(hidden_size=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                            shared_expert_intermediate_size=8, norm_topk_prob=normalize, hidden_act="silu")
    theirs = modeling.Qwen2MoeSparseMoeBlock(config).eval()
    ours = layer("shared", n_shared=1, shared_gate=True, normalize_topk=normalize)
    shared_in = ours.shared.w_in  # [C, 2H]: [gate | up]
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.w_in.transpose(1, 2))
        theirs.experts.down_proj.copy_(ours.experts.w_out.transpose(1, 2))
        theirs.shared_expert.gate_proj.weight.copy_(shared_in[:, :8].t())
        theirs.shared_expert.up_proj.weight.copy_(shared_in[:, 8:].t())
        theirs.shared_expert.down_proj.weight.copy_(ours.shared.w_out.t())
        theirs.shared_expert_gate.weight.copy_(ours.shared_gate.weight)
        got, _ = ours(X)
        torch.testing.assert_close(got, theirs(X), atol=1e-5, rtol=1e-5)
