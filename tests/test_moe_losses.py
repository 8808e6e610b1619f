"""Router losses (docs/architecture.md): balance, z, sequence-wise balance, against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from moegpt.config import ModelConfig, MoEConfig
from moegpt.model import aux_losses
from moegpt.moe import VARIANTS, RouterStats
from moegpt.moe.losses import router_z_loss, seq_balance_loss, switch_balance_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def hand_balance(logits, idx) -> float:
    """E * sum_i f_i * P_i with plain Python loops over the rows (choices of -1 ignored)."""
    N, E = logits.shape
    counts, assignments = [0] * E, 0
    for row in idx.tolist():
        for e in row:
            if e >= 0:
                counts[e] += 1
                assignments += 1
    P = [0.0] * E
    for row in logits.tolist():
        z = sum(math.exp(v) for v in row)
        for i, v in enumerate(row):
            P[i] += math.exp(v) / z / N
    return E * sum(counts[i] / assignments * P[i] for i in range(E))


# ---- balance -------------------------------------------------------------------------------------

def test_balance_is_one_when_uniform():
    E, K = 4, 2
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2]])  # every expert gets N*K/E assignments
    assert float(switch_balance_loss(torch.zeros(4, E), idx)) == pytest.approx(1.0)
    # uniform assignments with non-uniform probabilities is also 1 (sum_i P_i = 1)
    logits = torch.randn(4, E)
    assert float(switch_balance_loss(logits, idx)) == pytest.approx(1.0, abs=1e-6)
    assert K == idx.shape[1]


def test_balance_is_e_on_total_collapse():
    for E in (2, 4, 8):
        logits = torch.zeros(6, E)
        logits[:, 0] = 50.0  # all probability on expert 0, and every token picks it
        idx = torch.zeros(6, 1, dtype=torch.long)
        assert float(switch_balance_loss(logits, idx)) == pytest.approx(E, rel=1e-5)


def test_balance_matches_hand_computation_with_empty_choices():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=gen) * 2
    idx = torch.topk(logits, 2, dim=-1).indices
    idx[1, 1] = -1
    idx[4, 0] = -1
    assert float(switch_balance_loss(logits, idx)) == pytest.approx(hand_balance(logits, idx), rel=1e-5)


@pytest.mark.parametrize("variant", ["topk", "switch"])
def test_balance_has_a_router_gradient_at_k1(variant):
    cfg = MoEConfig(variant=variant, n_expert=4, top_k=1, normalize_topk=True, capacity_factor=4.0)
    layer = VARIANTS[variant].layer(ModelConfig(n_embd=16, n_head=2), cfg)
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    _, stats = layer(torch.randn(2, 8, 16))
    stats.balance.backward()
    assert layer.router.weight.grad is not None and float(layer.router.weight.grad.abs().sum()) > 1e-6


def test_balance_gradient_uses_the_full_softmax():
    logits = torch.randn(8, 4, requires_grad=True)
    idx = logits.detach().argmax(-1, keepdim=True)
    switch_balance_loss(logits, idx).backward()
    assert float(logits.grad.abs().sum()) > 1e-6
    # the gradient moves probability away from over-loaded experts: d/dlogits of E*sum f_i P_i
    f = torch.bincount(idx[:, 0], minlength=4).float() / 8
    probs = torch.softmax(logits.detach(), -1)
    expected = 4 * probs * (f - (probs * f).sum(-1, keepdim=True)) / 8
    torch.testing.assert_close(logits.grad, expected)


def test_balance_sums_per_layer_and_never_pools_layers():
    """Two layers with opposite collapse: per-layer sum reads 2*E; a pooled f/P would read ~1."""
    E, N = 2, 8
    logits_a = torch.tensor([[8.0, -8.0]]).repeat(N, 1)
    logits_b = torch.tensor([[-8.0, 8.0]]).repeat(N, 1)
    idx_a = torch.zeros(N, 1, dtype=torch.long)
    idx_b = torch.ones(N, 1, dtype=torch.long)
    layer_stats = []
    for logits, idx in ((logits_a, idx_a), (logits_b, idx_b)):
        zero = torch.zeros(())
        layer_stats.append(RouterStats(balance=switch_balance_loss(logits, idx), z=zero, seq_balance=zero,
                                       n_expert=E, expert_idx_NK=idx))
    cfg = MoEConfig(balance_coef=0.5, z_coef=0.0)
    aux = aux_losses(layer_stats, cfg)
    assert float(aux["balance"]) == pytest.approx(2 * E, rel=1e-4)
    assert float(aux["total"]) == pytest.approx(0.5 * 2 * E, rel=1e-4)
    pooled = switch_balance_loss(torch.cat([logits_a, logits_b]), torch.cat([idx_a, idx_b]))
    assert float(pooled) == pytest.approx(1.0, abs=1e-4)  # the HF #31464 trap: looks balanced


# ---- z-loss --------------------------------------------------------------------------------------

def test_z_loss_is_mean_squared_logsumexp():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 5, generator=gen) * 3
    hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 6
    assert float(router_z_loss(logits)) == pytest.approx(hand, rel=1e-5)
    assert float(router_z_loss(logits)) != pytest.approx(float(logits.square().mean()), rel=1e-2)


def test_z_loss_is_fp32_for_low_precision_logits():
    logits = (torch.randn(4, 8) * 4).to(torch.bfloat16)
    z = router_z_loss(logits)
    assert z.dtype == torch.float32
    assert float(z) == pytest.approx(float(router_z_loss(logits.float())), rel=1e-6)


# ---- ignored positions ---------------------------------------------------------------------------

def test_masked_rows_change_neither_loss():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 4, generator=gen)
    idx = torch.topk(logits, 2, dim=-1).indices
    mask = torch.tensor([True, False, True, True, False, True, True, True, False, True])
    other_logits = logits.clone()
    other_logits[~mask] = torch.randn(int((~mask).sum()), 4, generator=gen) * 20
    other_idx = idx.clone()
    other_idx[~mask] = torch.tensor([3, 2])
    for fn_a, fn_b in (
        (lambda: switch_balance_loss(logits, idx, mask),
         lambda: switch_balance_loss(other_logits, other_idx, mask)),
        (lambda: router_z_loss(logits, mask), lambda: router_z_loss(other_logits, mask)),
    ):
        assert float(fn_a()) == pytest.approx(float(fn_b()), rel=1e-6)
    assert float(switch_balance_loss(logits, idx, mask)) == pytest.approx(
        hand_balance(logits[mask], idx[mask]), rel=1e-5)
    assert float(router_z_loss(logits, mask)) == pytest.approx(float(router_z_loss(logits[mask])), rel=1e-6)
    # and without the mask they would have changed: the mask is what protects them
    assert float(router_z_loss(other_logits)) != pytest.approx(float(router_z_loss(logits)), rel=1e-3)


def test_all_rows_masked_gives_zero_not_nan():
    logits = torch.randn(3, 4, requires_grad=True)
    idx = torch.zeros(3, 1, dtype=torch.long)
    mask = torch.zeros(3, dtype=torch.bool)
    for loss in (switch_balance_loss(logits, idx, mask), router_z_loss(logits, mask)):
        assert float(loss.detach()) == 0.0
        loss.backward()


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "dense"])
def test_layer_losses_ignore_masked_positions(variant):
    """Through a whole layer: positions whose mask is False do not move balance, z or seq_balance."""
    cfg = MoEConfig(variant=variant, n_expert=4, top_k=2, seq_balance_coef=0.1)
    torch.manual_seed(0)
    layer = VARIANTS[variant].layer(ModelConfig(n_embd=16, n_head=2), cfg).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 6, 16)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    x2 = x.clone()
    x2[~mask] = torch.randn(int((~mask).sum()), 16) * 5
    _, a = layer(x, mask)
    _, b = layer(x2, mask)
    for name in ("balance", "z", "seq_balance"):
        assert getattr(a, name).item() == pytest.approx(getattr(b, name).item(), rel=1e-5, abs=1e-7), name


# ---- sequence-wise balance (aux-free's optional loss) --------------------------------------------

def hand_seq_balance(scores, idx, mask) -> float:
    B, T, E = scores.shape
    K = idx.shape[-1]
    per_seq = []
    for b in range(B):
        rows = [t for t in range(T) if mask[b, t]]
        if not rows:
            continue
        f = [0.0] * E
        P = [0.0] * E
        for t in rows:
            for e in idx[b, t].tolist():
                if e >= 0:
                    f[e] += E / (K * len(rows))
            total = float(scores[b, t].sum())
            for i in range(E):
                P[i] += float(scores[b, t, i]) / total / len(rows)
        per_seq.append(sum(f[i] * P[i] for i in range(E)))
    return sum(per_seq) / len(per_seq)


def test_seq_balance_matches_hand_computation():
    gen = torch.Generator().manual_seed(3)
    scores = torch.sigmoid(torch.randn(3, 5, 4, generator=gen) * 2)
    idx = torch.topk(scores, 2, dim=-1).indices
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, :] = False  # a sequence with no real token is left out of the mean
    assert float(seq_balance_loss(scores, idx)) == pytest.approx(
        hand_seq_balance(scores, idx, torch.ones_like(mask)), rel=1e-5)
    assert float(seq_balance_loss(scores, idx, mask)) == pytest.approx(
        hand_seq_balance(scores, idx, mask), rel=1e-5)


def test_seq_balance_ignores_empty_choices():
    scores = torch.full((1, 2, 3), 0.5)
    idx = torch.tensor([[[0, -1], [1, 2]]])  # token 0's second slot holds no expert
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = hand_seq_balance(scores, idx, mask)
    assert expected == pytest.approx(0.75)  # f = (3/4)*[1, 1, 1] after dropping the empty slot, P uniform
    assert float(seq_balance_loss(scores, idx)) == pytest.approx(expected, rel=1e-6)


def test_seq_balance_is_one_when_balanced_and_larger_when_not():
    E = 4
    scores = torch.full((1, 4, E), 0.5)
    idx = torch.tensor([[[0, 1], [2, 3], [1, 0], [3, 2]]])
    assert float(seq_balance_loss(scores, idx)) == pytest.approx(1.0)
    skewed_scores = torch.tensor([[[0.9, 0.8, 0.1, 0.1]]]).repeat(1, 4, 1)
    skewed_idx = torch.tensor([[[0, 1]]]).repeat(1, 4, 1)
    assert float(seq_balance_loss(skewed_scores, skewed_idx)) > 1.5
