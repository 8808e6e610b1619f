"""Token-choice routing machinery (moegpt/moe/router.py): expert capacity and causal drop priority."""

from __future__ import annotations

import pytest
import torch

from moegpt.moe.router import capacity_keep_mask, expert_capacity, softmax_topk

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_keep(idx_NK: torch.Tensor, B: int, T: int, E: int, capacity: int) -> torch.Tensor:
    """Position-major across the batch, a token's choices together in rank order, first come first kept."""
    keep = torch.zeros_like(idx_NK, dtype=torch.bool)
    used = [0] * E
    for t in range(T):
        for b in range(B):
            n = b * T + t
            for j in range(idx_NK.shape[1]):
                e = int(idx_NK[n, j])
                if e >= 0 and used[e] < capacity:
                    keep[n, j] = True
                    used[e] += 1
    return keep


def test_expert_capacity():
    assert expert_capacity(16, 2, 4, 1.0) == 8
    assert expert_capacity(16, 1, 4, 1.25) == 5  # ceil(5.0)
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(1, 1, 64, 0.01) == 1  # never 0


@pytest.mark.parametrize("B,T,K,E,capacity",
                         [(3, 5, 2, 4, 2), (2, 8, 1, 4, 3), (4, 4, 3, 6, 1), (1, 9, 2, 3, 4)])
def test_keep_mask_matches_reference_and_respects_capacity(B, T, K, E, capacity):
    gen = torch.Generator().manual_seed(B * 100 + T)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(B * T)])
    idx[torch.rand(B * T, K, generator=gen) < 0.15] = -1
    keep = capacity_keep_mask(idx, B, T, E, capacity)
    assert torch.equal(keep, reference_keep(idx, B, T, E, capacity))
    kept_per_expert = torch.bincount(idx[keep], minlength=E)
    wanted_per_expert = torch.bincount(idx[idx >= 0], minlength=E)
    assert (kept_per_expert <= capacity).all()
    assert torch.equal(kept_per_expert, torch.minimum(wanted_per_expert, torch.tensor(capacity)))  # fills up
    assert not keep[idx < 0].any()


def test_priority_is_position_major_across_the_batch():
    # B=2, T=2, every token wants expert 0, capacity 2. Position-major keeps both sequences'
    # position 0; sequence-major would keep sequence 0's positions 0 and 1 (its last token before
    # sequence 1's first, which makes sequence 1 depend on sequence 0's future).
    idx = torch.zeros(4, 1, dtype=torch.long)  # rows n = b*T + t: (0,0), (0,1), (1,0), (1,1)
    keep = capacity_keep_mask(idx, 2, 2, 1, 2)
    assert keep[:, 0].tolist() == [True, False, True, False]


def test_a_tokens_choices_go_together_before_later_positions():
    # B=1, T=2, K=2, E=2, capacity 1. Token 0 chooses (0, 1), token 1 chooses (1, 0).
    # Token-major keeps both of token 0's choices; "all first choices, then all second choices"
    # would keep token 0 -> 0 and token 1 -> 1 instead (token 0's second choice would then depend
    # on token 1, a later position).
    idx = torch.tensor([[0, 1], [1, 0]])
    keep = capacity_keep_mask(idx, 1, 2, 2, 1)
    assert keep.tolist() == [[True, True], [False, False]]


def test_a_tokens_choices_are_taken_in_rank_order():
    idx = torch.tensor([[1, 0], [0, 1]])
    keep = capacity_keep_mask(idx, 1, 2, 2, 1)
    assert keep.tolist() == [[True, True], [False, False]]
    # same expert twice in one token (not produced by top-k, but the rule still holds): rank 0 first
    keep = capacity_keep_mask(torch.tensor([[0, 0]]), 1, 1, 1, 1)
    assert keep.tolist() == [[True, False]]


def test_empty_choices_never_take_capacity():
    idx = torch.tensor([[-1], [-1], [0], [0]])  # B=1, T=4
    keep = capacity_keep_mask(idx, 1, 4, 1, 1)
    assert keep[:, 0].tolist() == [False, False, True, False]


def test_softmax_topk_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx, w = softmax_topk(logits, 2, normalize=False)
    probs = torch.softmax(logits, -1)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(w, probs[:, :2])
    idx, w = softmax_topk(logits, 2, normalize=True)
    torch.testing.assert_close(w, probs[:, :2] / probs[:, :2].sum())


@pytest.mark.parametrize("rows", [1, 63, 64, 500])  # both sides of the few-rows form (softmax of top-k logits)
def test_softmax_topk_renormalised_matches_the_definition(rows):
    logits = torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows)) * 3
    idx, w = softmax_topk(logits, 3, normalize=True)
    probs = torch.softmax(logits, -1)
    want_w, want_idx = torch.topk(probs, 3, dim=-1)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(w, want_w / want_w.sum(-1, keepdim=True))
