"""Expert parallelism for a whole model: process-group layout, sharding, gradient sync, checkpoints.

Layout for W processes and expert-parallel size P (P divides W): ranks g*P .. g*P+P-1 form expert-parallel
group g and hold one full set of experts between them (rank r holds slice r % P of every MoE layer);
the W/P ranks holding the same slice form a replica group (data parallelism across expert copies).
Consecutive ranks share a group so that, launched with P processes per node, the all-to-all never
leaves a node.

Each rank trains on its own slice of the global batch. Every rank backpropagates its own cross-entropy
plus the router losses of the global batch; the gradients are then summed (non-expert parameters over
all ranks, expert parameters over their replica group; the all-to-all's backward already brought each
expert the gradients of every token it served in its group) and divided by W: exactly the gradient of
the single-process loss on the concatenated batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moegpt.config import RunConfig
from moegpt.errors import MoegptError
from moegpt.model import GPTOutput
from moegpt.moe import VARIANTS, RouterStats
from moegpt.moe.expert_parallel import ExpertParallelGroup, check_expert_parallel, shard_bank
from moegpt.moe.router import RoutedMoE

ROUTING_FACTS = ("expert_idx_NK", "expert_weight_NK", "dropped_NK", "router_probs_NE", "router_logits_NE")


class ExpertParallel:
    """One rank's view of an expert-parallel model: call every method on every rank (collectives)."""

    def __init__(self, model: nn.Module, ep_size: int, world_size: int, rank: int):
        self.model, self.size, self.world_size, self.rank = model, ep_size, world_size, rank
        self.device = next(model.parameters()).device  # nccl reduces device tensors only
        self.full_params = model.num_params()  # what the unsharded model counts, for reports
        self.ep_group, self.replica_group = _new_groups(ep_size, world_size, rank)
        self.group = ExpertParallelGroup(group=self.ep_group, rank=rank % ep_size, size=ep_size,
                                         world_group=None, world_size=world_size)
        self.expert_params: dict[str, int] = {}  # name -> full number of experts
        for name, layer in model.named_modules():
            if isinstance(layer, RoutedMoE):  # a variant that refuses sharding was stopped by the config check
                self.expert_params.update({f"{name}.experts.{w}": layer.experts.n_expert
                                           for w in ("w_in", "w_out") if getattr(layer.experts, w) is not None})
                shard_bank(layer.experts, self.group)
                layer.expert_parallel = self.group

    @property
    def meter(self):
        return self.group.meter

    # ---- data -----------------------------------------------------------------------------------
    def local_rows(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch (rank r takes the r-th of W equal slices)."""
        n = batch.shape[0] // self.world_size
        return batch[self.rank * n:(self.rank + 1) * n]

    def global_output(self, out: GPTOutput) -> GPTOutput:
        """This rank's forward output as one process on the global batch would report it (for logs):
        cross-entropy averaged over ranks, each layer's routing facts gathered in rank order."""
        ce = out.loss.detach().clone()
        dist.all_reduce(ce)
        return GPTOutput(out.logits, ce / self.world_size, [self._gather_stats(s) for s in out.router_stats])

    def _gather_stats(self, stats: RouterStats) -> RouterStats:
        if not stats.is_routed:
            return stats
        facts = {name: _gather_rows(getattr(stats, name), self.world_size) for name in ROUTING_FACTS
                 if getattr(stats, name) is not None}
        return dataclasses.replace(stats, **facts)

    # ---- gradients ------------------------------------------------------------------------------
    def sync_gradients(self) -> None:
        """Gradients of the single-process loss: sums over the ranks that hold each parameter, / W."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        # a parameter with a gradient on some rank (an expert slice no token reached here, say) joins the
        # sum with zeros; one with none anywhere keeps None, as in one process (AdamW then skips it)
        has_grad = torch.tensor([p.grad is not None for _, p in named], dtype=torch.uint8, device=self.device)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
        shared, experts = [], []
        for (name, p), anywhere in zip(named, has_grad.tolist(), strict=True):
            if not anywhere:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            (experts if name in self.expert_params else shared).append(p.grad)
        _sum_in_place(shared, None)
        if self.world_size > self.size:
            _sum_in_place(experts, self.replica_group)
        for g in shared + experts:
            g.div_(self.world_size)

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """clip_grad_norm_ over the full model: expert shards' squares summed over their group."""
        shared_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        expert_sq = torch.zeros((), dtype=torch.float64, device=self.device)
        grads = []
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                grads.append(p.grad)
                sq = p.grad.detach().double().square().sum()
                if name in self.expert_params:
                    expert_sq += sq
                else:
                    shared_sq += sq
        dist.all_reduce(expert_sq, group=self.ep_group)
        total = (shared_sq + expert_sq).sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        if float(coef) < 1.0:
            torch._foreach_mul_(grads, coef)
        return total

    # ---- checkpoints ----------------------------------------------------------------------------
    def full_model_state(self) -> dict[str, Tensor]:
        """The state dict of the unsharded model (every rank gets it; rank 0 writes it)."""
        return {k: self._gather(v) if k in self.expert_params else v
                for k, v in self.model.state_dict().items()}

    def local_model_state(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: self._slice(v) if k in self.expert_params else v for k, v in full.items()}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        return self._map_optimizer_state(optimizer, optimizer.state_dict(), self._gather)

    def local_optimizer_state(self, optimizer: torch.optim.Optimizer, full: dict) -> dict:
        return self._map_optimizer_state(optimizer, full, self._slice)

    def _map_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict, fn) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        out = {}
        for index, per_param in state["state"].items():
            if ordered[index] in self.expert_params:  # moments are shaped like the parameter; `step` is not
                per_param = {k: fn(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in per_param.items()}
            out[index] = per_param
        return {"state": out, "param_groups": state["param_groups"]}

    def _gather(self, shard: Tensor) -> Tensor:
        parts = [torch.empty_like(shard) for _ in range(self.size)]
        dist.all_gather(parts, shard.contiguous(), group=self.ep_group)
        return torch.cat(parts)

    def _slice(self, full: Tensor) -> Tensor:
        local = full.shape[0] // self.size
        start = self.group.rank * local
        return full[start:start + local].clone()

    # ---- agreement between ranks ----------------------------------------------------------------
    def mean_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t)
        return bool(t)

    def in_sync(self) -> bool:
        """Replicated parameters equal on all ranks, and each expert slice equal across its replicas."""
        shared = [p for n, p in self.model.named_parameters() if n not in self.expert_params]
        experts = [p for n, p in self.model.named_parameters() if n in self.expert_params]
        return _same_everywhere(shared, None, self.world_size) and \
            _same_everywhere(experts, self.replica_group, self.world_size // self.size)


def _new_groups(ep_size: int, world_size: int, rank: int):
    """(expert-parallel group, replica group) of `rank`; every rank creates every group (collective)."""
    if ep_size == world_size:
        return None, None
    ep_groups = [dist.new_group(list(range(g * ep_size, (g + 1) * ep_size))) for g in range(world_size // ep_size)]
    replica_groups = [dist.new_group(list(range(p, world_size, ep_size))) for p in range(ep_size)]
    return ep_groups[rank // ep_size], replica_groups[rank % ep_size]


def _sum_in_place(grads: list[Tensor], group: dist.ProcessGroup | None) -> None:
    """One all-reduce for a list of tensors (flattened into one buffer), results written back."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads,
                                                               strict=True)])


def _gather_rows(t: Tensor, world_size: int) -> Tensor:
    sendable = t.to(torch.uint8) if t.dtype == torch.bool else t.contiguous()  # gloo has no bool collectives
    parts = [torch.empty_like(sendable) for _ in range(world_size)]
    dist.all_gather(parts, sendable)
    return torch.cat(parts).to(t.dtype)


def _same_everywhere(params: Iterable[Tensor], group: dist.ProcessGroup | None, size: int) -> bool:
    params = list(params)
    if size <= 1 or not params:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
    gathered = [torch.zeros_like(checksum) for _ in range(size)]
    dist.all_gather(gathered, checksum, group=group)
    return all(bool(torch.equal(g, gathered[0])) for g in gathered)


def check_expert_parallel_run(cfg: RunConfig, world_size: int) -> None:
    """Refuse a run that cannot be sharded as configured (before any data is read or file written)."""
    t = cfg.train
    if t.expert_parallel <= 1:
        return
    check_expert_parallel(VARIANTS[cfg.moe.variant], cfg.moe.n_expert, t.expert_parallel, world_size)
    if t.batch_size % world_size:
        raise MoegptError(f"batch_size ({t.batch_size}) is the global batch under expert parallelism and must be "
                          f"divisible by the number of processes ({world_size})")
    if t.compile:
        raise MoegptError("torch.compile is not supported with expert parallelism (its all-to-alls have "
                          "data-dependent sizes)")
