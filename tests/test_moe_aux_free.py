"""aux-free (DeepSeek-V3): sigmoid gates, bias-driven selection, sign-rule bias updates, group limits."""

from __future__ import annotations

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe import variant_problems
from moegpt.moe.aux_free import AuxFreeMoE

C = 16


pytestmark = pytest.mark.usefixtures("single_thread")


def aux_free(seed: int = 0, **kw) -> AuxFreeMoE:
    cfg = MoEConfig(**{"variant": "aux-free", "n_expert": 4, "top_k": 2, "expert_hidden": 8, **kw})
    assert not cfg.problems() + variant_problems(cfg), cfg.problems() + variant_problems(cfg)
    layer = AuxFreeMoE(ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=C), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def skewed_batch(layer: AuxFreeMoE, offsets: list[float], gen: torch.Generator,
                 batch: int = 16) -> torch.Tensor:
    """Inputs whose feature 0 is 1, with router column 0 = a big per-expert offset on the logits."""
    with torch.no_grad():
        layer.router.weight[:, 0] = torch.tensor(offsets)
    x = torch.randn(batch, 16, C, generator=gen)
    x[..., 0] = 1.0
    return x


def imbalance(load: torch.Tensor) -> float:
    return float(load.max() / load.mean())


def test_gates_are_normalised_sigmoid_affinities_of_the_chosen_experts():
    layer = aux_free().eval()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.tensor([0.5, -0.5, 0.2, -0.2]))
    x = torch.randn(2, 5, C)
    _, stats = layer(x)
    scores = torch.sigmoid(x.reshape(-1, C) @ layer.router.weight.t())
    idx = torch.topk(scores + layer.expert_bias, 2, dim=-1).indices  # the bias steers selection ...
    assert torch.equal(stats.expert_idx_NK, idx)
    gates = scores.gather(1, idx)
    torch.testing.assert_close(stats.expert_weight_NK, gates / gates.sum(-1, keepdim=True))  # ... not gates
    assert float(stats.balance) == 0.0 and float(stats.z) == 0.0


def test_bias_updates_balance_a_skewed_router():
    layer = aux_free(bias_update_rate=0.01)
    gen = torch.Generator().manual_seed(0)
    offsets = [3.0, 1.5, -1.5, -3.0]
    layer.train()
    _, stats = layer(skewed_batch(layer, offsets, gen))
    assert imbalance(stats.expert_load()) > 1.5, "the router is not skewed to begin with"
    layer.update_bias()
    for step in range(200):
        if step == 150:  # a smaller step at the end: the sign rule then oscillates less around balance
            layer.bias_update_rate = 0.002
        layer(skewed_batch(layer, offsets, gen))
        layer.update_bias()
    assert abs(float(layer.expert_bias.mean())) < 1e-6  # centred
    assert float(layer.expert_bias[3]) > float(layer.expert_bias[0])  # the starved expert was pushed up
    layer.eval()
    loads = torch.stack([layer(skewed_batch(layer, offsets, gen))[1].expert_load() for _ in range(4)]).sum(0)
    assert imbalance(loads) < 1.2, loads.tolist()


def test_update_bias_uses_the_loads_since_the_last_call_and_only_training_loads():
    layer = aux_free(bias_update_rate=0.1)
    x = torch.randn(2, 8, C)
    layer.eval()
    layer(x)
    assert float(layer.pending_load.sum()) == 0  # eval forwards do not count
    layer.train()
    _, stats = layer(x)
    assert torch.equal(layer.pending_load, stats.expert_load(after_drops=False))
    assert torch.equal(layer.expert_bias, torch.zeros(4))  # forward never moves the bias
    layer.update_bias()
    assert float(layer.pending_load.sum()) == 0
    load = stats.expert_load(after_drops=False)
    expected = 0.1 * torch.sign(load.mean() - load)
    torch.testing.assert_close(layer.expert_bias, expected - expected.mean())
    before = layer.expert_bias.clone()
    layer.update_bias()  # nothing counted since: no change
    assert torch.equal(layer.expert_bias, before)


def test_bias_is_a_buffer_saved_with_the_weights_and_gets_no_gradient():
    layer = aux_free()
    assert "expert_bias" in layer.state_dict() and "pending_load" not in layer.state_dict()
    assert all(p is not layer.expert_bias for p in layer.parameters())


@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 2, 2), (4, 1, 2), (2, 1, 3), (4, 3, 4)])
def test_group_limited_routing_picks_from_the_best_groups_only(n_group, topk_group, top_k):
    E = 8
    layer = aux_free(n_expert=E, top_k=top_k, n_group=n_group, topk_group=topk_group).eval()
    with torch.no_grad():
        layer.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    x = torch.randn(3, 6, C)
    _, stats = layer(x)
    idx = stats.expert_idx_NK
    size = E // n_group
    biased = torch.sigmoid(x.reshape(-1, C) @ layer.router.weight.t()) + layer.expert_bias
    group_score = biased.reshape(-1, n_group, size).topk(min(2, size), dim=-1).values.sum(-1)
    best_groups = group_score.topk(topk_group, dim=-1).indices
    for n in range(idx.shape[0]):
        groups = set((idx[n] // size).tolist())
        assert len(groups) <= topk_group
        assert groups <= set(best_groups[n].tolist()), (n, idx[n].tolist(), best_groups[n].tolist())
        # and within the kept groups the choice is the plain biased top-k
        allowed = torch.full((E,), float("-inf"))
        for g in best_groups[n].tolist():
            allowed[g * size:(g + 1) * size] = 0.0
        assert set(idx[n].tolist()) == set(torch.topk(biased[n] + allowed, top_k).indices.tolist())


def test_group_limits_change_the_routing():
    """Guards the test above: without the limit some tokens would pick experts from more groups."""
    free = aux_free(n_expert=8, top_k=2).eval()  # the (4 groups, keep 1, top-2) case, unlimited
    _, stats = free(torch.randn(4, 8, C, generator=torch.Generator().manual_seed(1)))
    groups_used = [len(set((row // 2).tolist())) for row in stats.expert_idx_NK]
    assert max(groups_used) > 1
