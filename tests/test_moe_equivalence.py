"""Variants that must reduce to one another when their knobs say so, with the same weights."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe import BACKENDS as DISPATCH_BACKENDS
from moegpt.moe import VARIANTS, variant_problems
from moegpt.moe.dense import DenseFFN

C, H, E = 32, 16, 4
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def model_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=C)


def layer(variant: str, seed: int = 0, **kw) -> torch.nn.Module:
    cfg = MoEConfig(**{"variant": variant, "n_expert": E, "top_k": 2, "expert_hidden": H, **kw})
    assert not cfg.problems() + variant_problems(cfg), cfg.problems() + variant_problems(cfg)
    module = VARIANTS[variant].layer(model_cfg(), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return module


def same_weights(dst: torch.nn.Module, src: torch.nn.Module, strict: bool = True) -> torch.nn.Module:
    dst.load_state_dict(src.state_dict(), strict=strict)
    return dst


def run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)[0]


def x_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 7, C, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_topk_with_one_expert_is_the_dense_ffn(normalize, activation):
    moe = layer("topk", n_expert=1, top_k=1, normalize_topk=normalize, activation=activation)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=C, ffn_hidden=H)
    dense = DenseFFN(cfg, MoEConfig(variant="dense", activation=activation))
    with torch.no_grad():
        dense.mlp.w_in.copy_(moe.experts.w_in[0])
        dense.mlp.w_out.copy_(moe.experts.w_out[0])
    x = x_input()
    torch.testing.assert_close(run(moe, x), run(dense, x), atol=TOL, rtol=0)


def test_topk_with_k_equal_e_without_renormalisation_is_basic():
    topk = layer("topk", top_k=E, normalize_topk=False)
    basic = same_weights(layer("basic", seed=5), topk)
    x = x_input()
    torch.testing.assert_close(run(topk, x), run(basic, x), atol=TOL, rtol=0)
    # and renormalising the full softmax changes nothing either (the k=E weights already sum to 1)
    renorm = same_weights(layer("topk", top_k=E, normalize_topk=True, seed=6), topk)
    torch.testing.assert_close(run(renorm, x), run(basic, x), atol=TOL, rtol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_noisy_topk_in_eval_is_topk(top_k):
    noisy = layer("noisy-topk", top_k=top_k)  # noise weights are non-zero: noise would show
    topk = same_weights(layer("topk", top_k=top_k, normalize_topk=True, seed=7), noisy, strict=False)
    x = x_input()
    noisy.eval()
    topk.eval()
    y_noisy, s_noisy = noisy(x)
    y_topk, s_topk = topk(x)
    torch.testing.assert_close(y_noisy, y_topk, atol=TOL, rtol=0)
    assert torch.equal(s_noisy.expert_idx_NK, s_topk.expert_idx_NK)
    torch.testing.assert_close(s_noisy.balance, s_topk.balance)
    # the same layer in training mode is noisy: the comparison above could have failed
    noisy.train()
    torch.manual_seed(0)
    assert not torch.allclose(noisy(x)[0], y_topk, atol=1e-3)


def test_switch_with_capacity_of_all_tokens_is_top1_without_renormalisation():
    switch = layer("switch", capacity_factor=float(E))  # capacity = ceil(E * N / E) = N
    topk = same_weights(layer("topk", top_k=1, normalize_topk=False, seed=8), switch)
    x = x_input()
    y_switch, s_switch = switch(x)
    assert not s_switch.dropped_NK.any()
    torch.testing.assert_close(y_switch, run(topk, x), atol=TOL, rtol=0)
    # a small capacity does drop, and the dropped tokens get no expert output
    small = same_weights(layer("switch", capacity_factor=0.25, seed=9), switch)
    y_small, s_small = small(x)
    dropped_N = s_small.dropped_NK[:, 0]
    assert dropped_N.any()
    assert torch.equal(y_small.reshape(-1, C)[dropped_N], torch.zeros(int(dropped_N.sum()), C))
    torch.testing.assert_close(y_small.reshape(-1, C)[~dropped_N], y_switch.reshape(-1, C)[~dropped_N],
                               atol=TOL, rtol=0)


def test_switch_defaults_to_a_capacity_and_top1():
    switch = layer("switch", top_k=3)  # top_k is ignored by switch
    _, stats = switch(x_input())
    assert stats.expert_idx_NK.shape[1] == 1 and stats.dropped_NK is not None


def test_shared_with_no_shared_expert_is_topk():
    shared = layer("shared", n_shared=0)
    topk = same_weights(layer("topk", seed=10), shared)  # strict: the same parameters, nothing more
    x = x_input()
    torch.testing.assert_close(run(shared, x), run(topk, x), atol=TOL, rtol=0)


def test_shared_adds_the_shared_mlp():
    shared = layer("shared", n_shared=2)
    x = x_input()
    routed_only = same_weights(layer("topk", seed=11), shared, strict=False)
    torch.testing.assert_close(run(shared, x), run(routed_only, x) + shared.shared(x), atol=TOL, rtol=0)
    assert shared.shared.w_out.shape[0] == 2 * H


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend", [b for b in DISPATCH_BACKENDS if b != "loop"])
def test_layer_output_and_gradients_do_not_depend_on_the_backend(variant, backend):
    if backend == "grouped" and getattr(torch, "_grouped_mm", None) is None:
        pytest.skip("torch._grouped_mm is missing in this torch")
    results = []
    for name in ("loop", backend):
        # capacity 1.0 on the capacity-capable token-choice variants, so dropped choices are exercised
        capacity = 1.0 if variant in ("topk", "switch", "shared", "aux-free", "noisy-topk") else -1.0
        module = layer(variant, dispatch=name, capacity_factor=capacity, router_jitter=0.1)
        x = x_input().requires_grad_(True)
        torch.manual_seed(0)  # the same noise and jitter for both backends
        y, _ = module(x)
        (y * torch.linspace(-1, 1, C)).sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in module.parameters()])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
