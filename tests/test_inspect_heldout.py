"""inspect-routing's held-out sample: random windows spread over the whole split (not its first tokens),
scored exactly like a direct forward pass on each window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moegpt.inspect.heldout import RANDOM_WINDOWS, WHOLE_SPLIT, route_held_out, sample_windows
from moegpt.inspect.report import collect_windows
from moegpt.model import GPT
from moegpt.presets import resolve_config


@pytest.fixture(scope="module")
def model():
    cfg = resolve_config("tiny", sets=["model.vocab_size=64", "model.block_size=16"])
    torch.manual_seed(0)
    return GPT(cfg.model, cfg.moe).eval()


def test_windows_are_spread_over_the_split():
    data = np.arange(100_000)
    windows = sample_windows(data, 1000, 64)
    assert [len(w) for w in windows].count(65) == 15 and sum(len(w) - 1 for w in windows) == 1000
    assert all((np.diff(w) == 1).all() for w in windows)  # each a contiguous stretch plus its next token
    starts = np.array([w[0] for w in windows])
    assert (np.diff(starts) >= 0).all() and starts.max() > 50_000 and starts.min() < 50_000
    assert all((a == b).all() for a, b in zip(sample_windows(data, 1000, 64), windows, strict=True))  # seeded


def test_collected_ce_equals_a_direct_forward(model):
    data = np.random.default_rng(1).integers(0, 64, size=5000)
    windows = sample_windows(data, 16 * 6 + 5, 16)
    collected = collect_windows(model, windows, batch_size=4)
    total = 0.0
    with torch.no_grad():  # the slow reference: one window at a time, summed per position
        for window in windows:
            row = torch.as_tensor(window).unsqueeze(0)
            logits = model(row[:, :-1], all_logits=True).logits[0]
            total += F.cross_entropy(logits, row[0, 1:], reduction="sum").item()
    assert collected.tokens == 6 * 16 + 5
    assert collected.ce == pytest.approx(total / collected.tokens, rel=1e-5)


def test_a_short_split_is_routed_whole(model):
    data = np.random.default_rng(2).integers(0, 64, size=200)
    collected, ids, sampling = route_held_out(model, data, 1000, 4, 16)
    assert sampling == WHOLE_SPLIT and collected.tokens == 199 and len(ids) == 200
    collected, ids, sampling = route_held_out(model, data, 64, 4, 16)
    assert sampling == RANDOM_WINDOWS and collected.tokens == 64
