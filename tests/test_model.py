"""The GPT trunk (moegpt/model.py): loss, aux-loss sum, overfitting, KV cache, parameter accounting."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moegpt.config import ModelConfig, MoEConfig
from moegpt.errors import MoegptError
from moegpt.model import GPT, IGNORE_INDEX, KVCache, Linear, aux_losses
from moegpt.moe import VARIANTS, variant_problems
from moegpt.moe import dispatch as dispatch_module
from moegpt.moe.dense import DenseFFN
from moegpt.moe.losses import router_z_loss, switch_balance_loss

CAUSAL = [v for v in VARIANTS if VARIANTS[v].causal]


pytestmark = pytest.mark.usefixtures("single_thread")


def model_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})


def moe_cfg(variant: str = "topk", **kw) -> MoEConfig:
    cfg = MoEConfig(**{"variant": variant, "n_expert": 4, "top_k": 2, **kw})
    assert not cfg.problems() + variant_problems(cfg), cfg.problems() + variant_problems(cfg)
    return cfg


def build(variant: str = "topk", seed: int = 0, model_kw: dict | None = None, **moe_kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(model_cfg(**(model_kw or {})), moe_cfg(variant, **moe_kw))


def tokens(B: int, T: int, V: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- forward and losses --------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_untrained_cross_entropy_is_about_log_vocab(variant):
    model = build(variant, model_kw={"vocab_size": 256})
    idx = tokens(4, 16, 256)
    out = model(idx[:, :-1], idx[:, 1:])
    assert out.logits.shape == (4, 15, 256)
    assert abs(out.loss.item() - math.log(256)) < 0.1
    assert len(out.router_stats) == 2


def test_loss_is_cross_entropy_skipping_ignored_targets():
    model = build("topk")
    idx = tokens(2, 12)
    targets = tokens(2, 12, seed=1)
    targets[0, :5] = IGNORE_INDEX
    out = model(idx, targets)
    expected = F.cross_entropy(out.logits[targets != IGNORE_INDEX], targets[targets != IGNORE_INDEX])
    torch.testing.assert_close(out.loss, expected)


def test_without_targets_only_the_last_position_unless_asked():
    model = build("topk").eval()
    idx = tokens(2, 10)
    last = model(idx).logits
    full = model(idx, all_logits=True).logits
    assert last.shape == (2, 1, 64) and full.shape == (2, 10, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    assert model(idx).loss is None


def test_longer_than_block_size_raises():
    with pytest.raises(MoegptError, match="block_size"):
        build("dense")(tokens(1, 17))


@pytest.mark.parametrize("variant", VARIANTS)
def test_aux_total_is_the_per_layer_sum_times_coefficients(variant):
    coefs = {"balance_coef": 0.3, "z_coef": 0.07, "seq_balance_coef": 0.5}
    model = build(variant, **coefs).train()
    idx = tokens(2, 12)
    out = model(idx, idx)
    stats = out.router_stats
    aux = aux_losses(stats, model.moe_config)
    hand = {"balance": sum(s.balance.item() for s in stats), "z": sum(s.z.item() for s in stats),
            "seq_balance": sum(s.seq_balance.item() for s in stats)}
    for key, value in hand.items():
        assert aux[key].item() == pytest.approx(value, rel=1e-6, abs=1e-9)
    total = 0.3 * hand["balance"] + 0.07 * hand["z"] + 0.5 * hand["seq_balance"]
    assert aux["total"].item() == pytest.approx(total, rel=1e-6, abs=1e-9)


def test_layer_losses_are_the_design_formulas_over_real_tokens():
    """Each topk layer's balance and z equal the definitions on its own tokens, with ignored targets masked out."""
    model = build("topk", balance_coef=1.0, z_coef=1.0).train()
    idx = tokens(2, 12)
    targets = idx.clone()
    targets[1, 7:] = IGNORE_INDEX
    out = model(idx, targets)
    mask = (targets != IGNORE_INDEX).reshape(-1)
    hand_balance = hand_z = 0.0
    for s in out.router_stats:
        hand_balance += float(switch_balance_loss(s.router_logits_NE, s.expert_idx_NK, mask))
        hand_z += float(router_z_loss(s.router_logits_NE, mask))
        unmasked = float(switch_balance_loss(s.router_logits_NE, s.expert_idx_NK))
        assert s.balance.item() != pytest.approx(unmasked, rel=1e-7)  # the mask made a difference
    aux = aux_losses(out.router_stats, model.moe_config)
    assert aux["balance"].item() == pytest.approx(hand_balance, rel=1e-6)
    assert aux["z"].item() == pytest.approx(hand_z, rel=1e-6)
    aux["total"].backward()
    for block in model.blocks:
        assert float(block.ffn.router.weight.grad.abs().sum()) > 0


# ---- learning ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["dense", "topk"])
def test_tiny_model_overfits_one_batch(variant):
    model = build(variant, model_kw={"vocab_size": 32}).train()
    idx = tokens(2, 16, 32, seed=4)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = losses = None
    for _ in range(300):
        out = model(x, y)
        loss = out.loss + aux_losses(out.router_stats, model.moe_config)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = out.loss.item() if first is None else first
        losses = out.loss.item()
        if losses < 0.05:
            break
    assert first > 3.0 and losses < 0.05, (first, losses)


# ---- KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", CAUSAL)
def test_kv_cache_matches_a_full_forward(variant):
    # switch's default capacity depends on how many tokens a forward sees; a capacity above the
    # token count keeps the comparison about the cache (see test_capacity_dropping_* for drops)
    extra = {"capacity_factor": 8.0} if variant == "switch" else {}
    model = build(variant, **extra).eval()
    idx = tokens(2, 14, seed=5)
    with torch.no_grad():
        full = model(idx, all_logits=True).logits
        cache = KVCache()
        parts = [model(idx[:, :5], cache=cache, all_logits=True).logits]  # a prefill chunk
        assert cache.length == 5
        parts.append(model(idx[:, 5:8], cache=cache, all_logits=True).logits)  # a chunk on a cache
        for t in range(8, 14):  # then token by token
            parts.append(model(idx[:, t:t + 1], cache=cache, all_logits=True).logits)
        assert cache.length == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


TRUNKS = {"gpt2": {}, "gpt2-bias": {"bias": True}, "llama-mha": {"arch": "llama"},
          "llama-mla": {"arch": "llama", "attention": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8,
                        "qk_rope_head_dim": 4, "v_head_dim": 6},
          "llama-mla-plain": {"arch": "llama", "attention": "mla", "kv_lora_rank": 8, "qk_nope_head_dim": 8,
                              "qk_rope_head_dim": 4, "v_head_dim": 6, "mla_absorb": False}}


def assert_decode_equals_cached_forward(model: GPT, idx: torch.Tensor, prefill: int) -> None:
    """GPT.decode (generation's lean step) against forward on an identical cache, token by token: logits and
    the captured routing (experts, gates, drops)."""
    with torch.inference_mode():
        ref_cache, cache = KVCache(), KVCache()
        model(idx[:, :prefill], cache=ref_cache)
        model(idx[:, :prefill], cache=cache)
        for t in range(prefill, idx.shape[1]):
            ref = model(idx[:, t:t + 1], cache=ref_cache)
            capture = t % 2 == 0
            logits, stats = model.decode(idx[:, t], cache, capture=capture)
            assert cache.length == ref_cache.length == t + 1
            # the decode kernels and forward's ops sum in different orders: fp32 rounding of sums whose terms
            # reach the logits' own size (several units with the sharpened weights), so relative to that size
            scale = max(1.0, ref.logits.abs().max().item())
            torch.testing.assert_close(logits, ref.logits[:, -1], atol=1e-5 * scale, rtol=1e-5)
            if not capture:
                assert stats is None
                continue
            for mine, theirs in zip(stats, ref.router_stats, strict=True):
                if mine is None:
                    assert not theirs.is_routed
                    continue
                assert torch.equal(mine.expert_idx_NK, theirs.expert_idx_NK)
                # the native decode kernels sum in their own order (gates of weights perturbed to ~0.3 differ by
                # ~1e-6 after a few layers); same tolerance as the logits
                torch.testing.assert_close(mine.expert_weight_NK, theirs.expert_weight_NK, atol=1e-5, rtol=1e-5)
                assert (mine.dropped_NK is None) == (theirs.dropped_NK is None)
                if mine.dropped_NK is not None:
                    assert torch.equal(mine.dropped_NK, theirs.dropped_NK)


@pytest.mark.parametrize("variant", CAUSAL)
def test_decode_step_equals_a_cached_forward_for_every_causal_variant(variant):
    # switch at its default capacity: with two sequences a step can overflow an expert, and decode must drop
    # the same choices as forward
    extra = {"n_shared": 1, "shared_gate": True} if variant == "shared" else {}
    model = build(variant, **extra).eval()
    for p in model.parameters():  # sharper weights than the init: differences must show
        p.data.add_(torch.randn_like(p) * 0.3)
    assert_decode_equals_cached_forward(model, tokens(2, 14, seed=5), prefill=5)


@pytest.mark.parametrize("trunk", TRUNKS)
@pytest.mark.parametrize("variant", ["topk", "aux-free", "dense"])
def test_decode_step_equals_a_cached_forward_on_every_trunk(trunk, variant):
    extra = {"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5} if variant == "aux-free" else {}
    model = build(variant, model_kw=TRUNKS[trunk], first_dense=1 if variant != "dense" else 0, **extra).eval()
    for p in model.parameters():
        p.data.add_(torch.randn_like(p) * 0.3)
    assert_decode_equals_cached_forward(model, tokens(3, 16, seed=7), prefill=3)
    assert_decode_equals_cached_forward(model, tokens(1, 9, seed=8), prefill=1)


def test_decode_refuses_training_mode_autograd_and_a_full_block():
    model = build("topk").eval()
    cache = KVCache()
    with torch.inference_mode():
        model(tokens(1, 16), cache=cache)
        with pytest.raises(MoegptError, match="block_size"):
            model.decode(tokens(1, 1)[:, 0], cache)
    with pytest.raises(MoegptError, match="inference"):
        model.decode(tokens(1, 1)[:, 0], KVCache())


def test_decode_under_autocast_runs_the_forward():
    model = build("topk").eval()
    idx = tokens(1, 6)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref_cache, cache = KVCache(), KVCache()
        model(idx[:, :5], cache=ref_cache)
        model(idx[:, :5], cache=cache)
        ref = model(idx[:, 5:], cache=ref_cache).logits[:, -1]
        logits, _ = model.decode(idx[:, 5], cache)
    assert torch.equal(logits, ref)


@pytest.mark.parametrize("bias", [False, True])
def test_linear_few_row_path_equals_nn_linear_and_follows_weight_updates(bias):
    # without autograd, a few rows multiply a cached [in, out] copy of the weight; it must give
    # nn.Linear's result and never go stale when the weight changes in place or gets new storage
    torch.manual_seed(0)
    fast, plain = Linear(16, 24, bias=bias), torch.nn.Linear(16, 24, bias=bias)
    plain.load_state_dict(fast.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 1, 16)

    def check() -> None:
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), plain(x), atol=1e-6, rtol=1e-6)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), plain(x), atol=1e-6, rtol=1e-6)

    check()
    with torch.no_grad():
        for m in (fast, plain):
            m.weight.mul_(-2.0)  # in place, as an optimizer step
    check()
    new_state = {k: torch.randn_like(v) for k, v in plain.state_dict().items()}
    for m in (fast, plain):
        m.load_state_dict(new_state)
    check()
    fast.weight.data = fast.weight.data.clone()  # new storage, same values
    check()
    out = fast(x)  # with autograd: nn.Linear's own path, gradients flow
    out.sum().backward()
    assert fast.weight.grad is not None


def test_kv_cache_respects_block_size():
    model = build("dense").eval()
    cache = KVCache()
    with torch.no_grad():
        model(tokens(1, 16), cache=cache)
        with pytest.raises(MoegptError, match="block_size"):
            model(tokens(1, 1), cache=cache)


# ---- parameter accounting and layer layout -------------------------------------------------------

def test_num_params_total_and_active():
    dense = build("dense").num_params()
    topk = build("topk", n_expert=8, top_k=2).num_params()
    assert dense["active"] == dense["total"]
    assert topk["active"] < topk["total"]
    # default expert_hidden = ffn_hidden / top_k: a token runs through as many FFN weights as dense
    router_params = 2 * 8 * 32  # n_layer * n_expert * n_embd
    assert topk["active"] - router_params == dense["active"]
    assert topk["embedding"] == dense["embedding"] == 64 * 32 + 16 * 32
    assert topk["active_non_embedding"] == topk["active"] - topk["embedding"]
    model = build("topk", n_expert=8, top_k=2)
    assert topk["total"] == sum(p.numel() for p in model.parameters())  # tied head counted once


def test_flops_per_token_grow_with_active_not_total_params():
    few = build("topk", n_expert=4, top_k=2).flops_per_token()
    many = build("topk", n_expert=16, top_k=2).flops_per_token()
    assert many - few == 6 * 2 * (16 - 4) * 32  # only the router grows


@pytest.mark.parametrize("n_layer,moe_every,first_dense,expected", [
    (4, 1, 0, [0, 1, 2, 3]), (5, 2, 0, [0, 2, 4]), (5, 2, 1, [1, 3]), (4, 1, 2, [2, 3]), (3, 1, 3, []),
])
def test_which_layers_are_moe(n_layer, moe_every, first_dense, expected):
    model = build("topk", model_kw={"n_layer": n_layer}, moe_every=moe_every, first_dense=first_dense)
    assert model.moe_layers == expected
    for i, block in enumerate(model.blocks):
        assert isinstance(block.ffn, VARIANTS["topk"].layer if i in expected else DenseFFN), i
    stats = model(tokens(1, 8), tokens(1, 8, seed=1)).router_stats
    assert [i for i, s in enumerate(stats) if s.is_routed] == expected


def test_dense_variant_has_no_moe_layers():
    model = build("dense", moe_every=1)
    assert model.moe_layers == []
    assert all(isinstance(b.ffn, DenseFFN) for b in model.blocks)


# ---- torch.compile ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_compiled_moe_model_matches_eager_and_breaks_only_for_the_dispatch_group_sizes():
    # the sorted dispatch reads its per-expert group sizes on the host (one graph break per MoE layer
    # and pass); nothing else in the model may break the graph
    import torch._dynamo as dynamo

    model = build("topk", model_kw={"n_layer": 2}, n_expert=4, top_k=2)
    x, y = tokens(2, 16, seed=1), tokens(2, 16, seed=2)

    def loss_fn(m):
        out = m(x, y)
        return out.loss + aux_losses(out.router_stats, m.moe_config)["total"]

    dynamo.reset()
    try:
        explained = dynamo.explain(loss_fn)(model)
        break_files = {frame.filename for reason in explained.break_reasons for frame in reason.user_stack[-1:]}
        assert break_files <= {str(Path(dispatch_module.__file__))}, explained.break_reasons
        eager = loss_fn(model)
        eager.backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        compiled = loss_fn(torch.compile(model))
        compiled.backward()
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4,
                                       msg=name)
    finally:
        dynamo.reset()
