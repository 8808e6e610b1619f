"""Router losses over the global batch when a layer's tokens are spread over several processes.

Inside `losses_over_ranks(group)` the loss helpers of moegpt.moe.losses sum their per-token totals
and counts over the ranks of `group` before dividing, so every rank gets the loss one process would
compute on the concatenated batch. The sum is differentiable: its backward sums the gradients of all
ranks, so each rank's router receives the gradient of the global loss for its own tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

_NOT_SET = object()
# A module global, not a ContextVar: torch.compile traces a global read but breaks the graph on
# ContextVar.get(), and the losses ask on every forward. One training loop per process sets it.
_active_group: object = _NOT_SET


@contextlib.contextmanager
def losses_over_ranks(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Router losses computed in this block cover the batches of every rank of `group` (None: all)."""
    global _active_group
    previous, _active_group = _active_group, group
    try:
        yield
    finally:
        _active_group = previous


def is_global() -> bool:
    return _active_group is not _NOT_SET


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # every rank's loss depends on every rank's x: x's gradient is the sum of all of theirs
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Each tensor summed over the ranks of the active group, in one collective (differentiable)."""
    group = _active_group
    assert group is not _NOT_SET, "sum_over_ranks outside losses_over_ranks"
    flat = torch.cat([t.float().reshape(-1) for t in tensors])
    summed = _SumOverRanks.apply(flat, group)
    out, start = [], 0
    for t in tensors:
        out.append(summed[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return tuple(out)
