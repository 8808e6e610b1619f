"""Expert ranges of the sorted dispatch (moegpt/moe/sorted_experts.py): how experts are grouped into padded
batched-matmul ranges, where each assignment lands, and that every grouping gives the reference's numbers."""

from __future__ import annotations

import random

import pytest
import torch
from test_moe_dispatch import CASES, PYTHON_SORTED, assert_close_all, run_with_grads

import moegpt.moe.sorted_experts as sorted_experts
from moegpt.moe import ACTIVATIONS
from moegpt.moe.sorted_experts import PADDING_ROWS, PADDING_SLACK, padded_slots, plan_ranges


def random_counts(rng: random.Random) -> list[int]:
    E = rng.randint(1, 40)
    scale = rng.choice([3, 50, 400, 3000])
    return [0 if rng.random() < 0.2 else rng.randint(0, scale) for _ in range(E)]


@pytest.mark.parametrize("seed", range(200))
def test_ranges_cover_every_busy_expert_once_within_the_padding_bounds(seed):
    rng = random.Random(seed)
    counts = random_counts(rng)
    bucket, max_rows = rng.choice([1, 1, 64]), rng.choice([1, 512, 1 << 40])
    ranges = plan_ranges(counts, bucket, max_rows)
    covered = [e for r in ranges for e in range(r.first, r.stop)]
    assert covered == sorted(set(covered)), "ranges overlap or are out of order"
    assert {e for e, n in enumerate(counts) if n} <= set(covered)
    offset = 0
    for r in ranges:
        assert r.offset == offset and r.cap % bucket == 0
        sizes = counts[r.first:r.stop]
        assert counts[r.first] > 0 and r.cap >= max(sizes) and r.cap - max(sizes) < bucket
        padded, real = r.cap * len(sizes), sum(sizes)
        if len(sizes) > 1:  # a lone expert is its own range whatever its size
            assert padded - real <= max(PADDING_SLACK * real, PADDING_ROWS)
            assert padded <= max_rows
        offset += padded


def test_balanced_experts_share_one_range_and_an_outlier_splits_it():
    assert len(plan_ranges([100] * 8)) == 1
    ranges = plan_ranges([1000, 1000, 5000, 1000, 1000])
    assert [(r.first, r.stop) for r in ranges] == [(0, 2), (2, 3), (3, 5)]
    assert plan_ranges([0, 0, 0]) == []


@pytest.mark.parametrize("seed", range(50))
def test_padded_slots_hold_every_assignment_once_in_expert_order(seed):
    rng = random.Random(seed)
    counts = random_counts(rng)
    ranges = plan_ranges(counts, rng.choice([1, 8]), rng.choice([16, 1 << 40]))
    slot = padded_slots(counts, ranges, torch.device("cpu")).tolist()
    M = sum(counts)
    assert sorted(s for s in slot if s < M) == list(range(M))
    assert all(s == M for s in slot if s >= M)
    start = 0
    starts = []
    for n in counts:
        starts.append(start)
        start += n
    for r in ranges:
        for i, e in enumerate(range(r.first, r.stop)):
            block = slot[r.offset + i * r.cap:r.offset + (i + 1) * r.cap]
            assert block == list(range(starts[e], starts[e] + counts[e])) + [M] * (r.cap - counts[e])


@pytest.mark.parametrize("grouping", ["one expert per range", "one range"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_grouping_matches_the_reference(monkeypatch, grouping, activation, case):
    if grouping == "one expert per range":
        monkeypatch.setattr(sorted_experts, "MAX_RANGE_BYTES", 1)
    else:
        monkeypatch.setattr(sorted_experts, "PADDING_ROWS", 1 << 30)
        monkeypatch.setattr(sorted_experts, "MAX_RANGE_BYTES", 1 << 40)
    got = run_with_grads.__wrapped__(PYTHON_SORTED, activation, case)  # ranges are the Python path's
    assert_close_all(got, run_with_grads("reference", activation, case), f"{grouping}/{activation}/{case}")
