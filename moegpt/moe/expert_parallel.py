"""Expert parallelism inside a routed layer: this rank holds a contiguous slice of the experts and
exchanges tokens with the other ranks of its expert-parallel group by all-to-all.

Legend: N local tokens, K choices per token, C width, E experts in all, L = E / P local experts,
P ranks in the expert-parallel group, M assignments this rank sends, R rows it receives.

Per layer: route locally (the router is replicated), sort the N*K assignments by expert (experts are
numbered so that rank p owns experts p*L .. p*L+L-1, hence sorted by expert is sorted by owner),
exchange per-expert counts, send each assignment's token row to its owner with an uneven
`all_to_all_single`, run the local experts on what arrived with the one-process dispatch code
(`run_experts`), send the outputs back with the reverse all-to-all, and add them to their tokens with
their gates. Gates never travel: they are applied on the token's own rank, where the router is.

Capacity (switch, or any capacity_factor > 0) is decided over the global batch exactly as one process
would: the choices of every rank are gathered (K integers per token) and `capacity_keep_mask` runs on
the whole batch in its causal priority order, so dropping is identical to a single-process run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from moegpt.errors import MoegptError
from moegpt.moe.dispatch import run_experts, sort_by_expert
from moegpt.moe.experts import ExpertBank
from moegpt.moe.registry import VARIANTS
from moegpt.moe.spec import VariantSpec


@dataclass
class ExchangeMeter:
    """What the all-to-alls of a run cost: seconds inside them and bytes sent to other ranks."""

    seconds: float = 0.0
    bytes_sent: int = 0
    calls: int = 0

    def reset(self) -> None:
        self.seconds, self.bytes_sent, self.calls = 0.0, 0, 0


@dataclass
class ExpertParallelGroup:
    """The process group that splits one layer's experts, and this rank's place in it."""

    group: dist.ProcessGroup | None
    rank: int  # position in the expert-parallel group (not the global rank)
    size: int
    world_group: dist.ProcessGroup | None  # all ranks: the global batch, for capacity
    world_size: int
    meter: ExchangeMeter = field(default_factory=ExchangeMeter)


def check_expert_parallel(spec: VariantSpec, n_expert: int, ep_size: int, world_size: int) -> None:
    """Refuse a configuration that cannot be sharded, before anything is read or written."""
    if ep_size < 1:
        raise MoegptError(f"expert parallelism must be >= 1 (got {ep_size})")
    if ep_size == 1:
        return
    if not spec.expert_parallel:
        able = ", ".join(name for name, other in VARIANTS.items() if other.expert_parallel)
        raise MoegptError(f"variant {spec.name!r} cannot run expert-parallel (only token-choice variants with a few "
                          f"experts per token can: {able})")
    if n_expert % ep_size:
        raise MoegptError(f"n_expert ({n_expert}) is not divisible by the expert-parallel size ({ep_size})")
    if world_size % ep_size:
        raise MoegptError(f"the expert-parallel size ({ep_size}) does not divide the number of processes "
                          f"({world_size}); launch with torchrun --nproc_per_node a multiple of it")


def shard_bank(bank: ExpertBank, ep: ExpertParallelGroup) -> None:
    """Keep only this rank's experts of a full bank (in place: parameters replaced by their slice)."""
    local = bank.n_expert // ep.size
    start = ep.rank * local
    with torch.no_grad():
        bank.w_in = torch.nn.Parameter(bank.w_in[start:start + local].clone())
        if bank.w_out is not None:
            bank.w_out = torch.nn.Parameter(bank.w_out[start:start + local].clone())
    bank.n_expert = local


class _AllToAll(torch.autograd.Function):
    """Rows to other ranks (uneven splits); backward sends the gradients back the way they came."""

    @staticmethod
    def forward(ctx, x_MC: Tensor, out_splits: list[int], in_splits: list[int], ep: ExpertParallelGroup) -> Tensor:
        ctx.splits, ctx.ep = (out_splits, in_splits), ep
        return _exchange(x_MC, out_splits, in_splits, ep)

    @staticmethod
    def backward(ctx, grad_RC: Tensor):
        out_splits, in_splits = ctx.splits
        return _exchange(grad_RC, in_splits, out_splits, ctx.ep), None, None, None


def _exchange(x_MC: Tensor, out_splits: list[int], in_splits: list[int], ep: ExpertParallelGroup) -> Tensor:
    out_RC = x_MC.new_empty(sum(out_splits), x_MC.shape[1])
    start = time.perf_counter()
    dist.all_to_all_single(out_RC, x_MC.contiguous(), out_splits, in_splits, group=ep.group)
    ep.meter.seconds += time.perf_counter() - start
    ep.meter.calls += 1
    ep.meter.bytes_sent += (sum(in_splits) - in_splits[ep.rank]) * x_MC.shape[1] * x_MC.element_size()
    return out_RC


def exchange_counts(send_counts_E: Tensor, ep: ExpertParallelGroup) -> Tensor:
    """[E] assignments this rank sends per expert -> [P, L] rows each source rank sends per local expert."""
    recv = torch.empty_like(send_counts_E)
    dist.all_to_all_single(recv, send_counts_E, group=ep.group)
    return recv.view(ep.size, -1)


def expert_parallel_forward(x_NC: Tensor, idx_NK: Tensor, weight_NK: Tensor, bank: ExpertBank,
                            backend: str, ep: ExpertParallelGroup) -> Tensor:
    """y[n] = sum_j weight[n, j] * expert_{idx[n, j]}(x[n]) with the experts spread over the group;
    idx -1 skips a choice. Every rank of the group must call this together (it holds collectives)."""
    N = idx_NK.shape[0]
    # the two host syncs of the layer (the counts, then the received counts): split sizes must be Python ints
    # for all_to_all_single
    order, tok_M, counts = sort_by_expert(idx_NK, bank.n_expert * ep.size)
    recv_counts_PL = exchange_counts(torch.tensor(counts, device=idx_NK.device), ep)
    recv_counts = recv_counts_PL.tolist()
    send_splits = [sum(counts[p * bank.n_expert:(p + 1) * bank.n_expert]) for p in range(ep.size)]
    recv_splits = [sum(row) for row in recv_counts]
    x_RC = _AllToAll.apply(x_NC.index_select(0, tok_M), recv_splits, send_splits, ep)
    # received rows come grouped by source rank, then by local expert within each source
    local_e_R = torch.arange(bank.n_expert, device=x_NC.device).repeat(ep.size)
    local_e_R = local_e_R.repeat_interleave(recv_counts_PL.reshape(-1))
    if x_RC.shape[0]:
        y_RC = run_experts(x_RC, local_e_R[:, None], x_RC.new_ones(x_RC.shape[0], 1), bank, backend)
    else:  # nothing arrived; stay connected to x_RC so every rank's backward meets in the same all-to-alls
        y_RC = x_RC.new_zeros(0, bank.n_embd) + x_RC.sum() * 0
    y_MC = _AllToAll.apply(y_RC, send_splits, recv_splits, ep)
    y_MC = y_MC * weight_NK.reshape(-1)[order, None].to(y_MC.dtype)
    return y_MC.new_zeros(N, y_MC.shape[-1]).index_add(0, tok_M, y_MC)


def global_capacity_dropped(idx_NK: Tensor, batch: int, time_: int, keep_mask_fn, ep: ExpertParallelGroup) -> Tensor:
    """Drops decided over the whole global batch (every rank's sequences, in rank order), as one process
    on the concatenated batch would; returns this rank's rows. `keep_mask_fn(idx_GK, batch, time)`."""
    gathered = [torch.empty_like(idx_NK) for _ in range(ep.world_size)]
    dist.all_gather(gathered, idx_NK.contiguous(), group=ep.world_group)
    keep_GK = keep_mask_fn(torch.cat(gathered), batch * ep.world_size, time_)
    rank = dist.get_rank(ep.world_group) if ep.world_group is not None else dist.get_rank()
    n = idx_NK.shape[0]
    return ~keep_GK[rank * n:(rank + 1) * n]
