"""RouterStats: what one FFN layer reports besides its output.

Shape legend used throughout moegpt/moe: B batch, T time, C model width, N = B*T tokens,
E experts, K choices per token (top-k; for expert-choice K = E with -1 padding), H expert hidden.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

_GENERATING: ContextVar[bool] = ContextVar("moegpt_generating", default=False)


@contextlib.contextmanager
def generating() -> Iterator[None]:
    """Inside this block routed layers skip what only training and routing reports read: aux losses
    (reported as zero) and the full router probabilities (None). Generation uses neither, and each
    costs several small ops per layer per generated token."""
    token = _GENERATING.set(True)
    try:
        yield
    finally:
        _GENERATING.reset(token)


def is_generating() -> bool:
    return _GENERATING.get()


@dataclass
class RouterStats:
    """Aux losses (scalar, unscaled, already reduced over real tokens) and detached routing facts.

    expert_idx_NK: chosen experts, -1 where a slot holds no expert.
    expert_weight_NK: the combine weight of each choice (0 where dropped or empty).
    dropped_NK: choices removed by a capacity limit (the token rides the residual for them).
    router_probs_NE: full router probabilities (softmax, or sigmoid affinities for aux-free).
    extras: variant-specific detached facts (aux-free biases, shared-path output share, ...).
    """

    balance: Tensor
    z: Tensor
    seq_balance: Tensor
    n_expert: int = 1
    expert_idx_NK: Tensor | None = None
    expert_weight_NK: Tensor | None = None
    dropped_NK: Tensor | None = None
    router_probs_NE: Tensor | None = None
    router_logits_NE: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def is_routed(self) -> bool:
        return self.expert_idx_NK is not None

    @staticmethod
    def empty(device: torch.device | str = "cpu") -> RouterStats:
        zero = torch.zeros((), device=device)
        return RouterStats(balance=zero, z=zero, seq_balance=zero)

    def expert_load(self, after_drops: bool = True) -> Tensor:
        """Assignments per expert [E] (float), counting only kept choices when after_drops."""
        assert self.expert_idx_NK is not None
        idx = self.expert_idx_NK
        valid = idx >= 0
        if after_drops and self.dropped_NK is not None:
            valid = valid & ~self.dropped_NK
        return torch.bincount(idx[valid].reshape(-1), minlength=self.n_expert).float()
