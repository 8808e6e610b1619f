"""Which held-out tokens `inspect-routing` routes and scores.

The first tokens of a split are one stretch of the corpus (a few source files), not a sample of it: their
cross-entropy can sit far from the split's. Like training's evaluation, inspection therefore routes
windows at seeded random positions spread over the whole split; when the split holds no more tokens
than asked for, it routes all of it, in order.
"""

from __future__ import annotations

import numpy as np
import torch

from moegpt.inspect.report import Collected, collect_routing, collect_windows

SAMPLE_SEED = 0
WHOLE_SPLIT = "the whole split"
RANDOM_WINDOWS = f"random windows spread over the whole split (seed {SAMPLE_SEED})"


def sample_windows(data: np.ndarray, n_tokens: int, block_size: int, seed: int = SAMPLE_SEED) -> list[np.ndarray]:
    """Token windows (inputs plus their next-token target) at seeded random starts, in order of start:
    n_tokens // block_size of block_size positions, and one of the remainder, so exactly n_tokens positions.
    Starts may repeat when the split is barely longer than n_tokens."""
    lengths = [block_size] * (n_tokens // block_size) + ([n_tokens % block_size] if n_tokens % block_size else [])
    starts = np.random.default_rng(seed).integers(0, len(data) - block_size, size=len(lengths))
    order = np.argsort(starts, kind="stable")
    return [np.asarray(data[starts[i]:starts[i] + lengths[i] + 1], dtype=np.int64) for i in order]


def route_held_out(model: torch.nn.Module, data: np.ndarray, n_tokens: int, batch_size: int,
                   block_size: int) -> tuple[Collected, np.ndarray, str]:
    """(routing and CE, the first routed ids, how they were chosen) for about n_tokens of a split."""
    if n_tokens + 1 >= len(data) or len(data) <= block_size + 1:
        ids = np.asarray(data, dtype=np.int64)
        return collect_routing(model, ids, batch_size, block_size), ids, WHOLE_SPLIT
    windows = sample_windows(data, n_tokens, block_size)
    return collect_windows(model, windows, batch_size), windows[0], RANDOM_WINDOWS
