"""The router machinery of the routed variants: fp32 router logits, softmax top-k, capacity in causal
priority order, and RoutedMoE, the base class whose subclasses only say how they select experts.

Legend: B batch, T time, C width, N = B*T tokens, E experts, K choices per token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moegpt.config import ModelConfig, MoEConfig
from moegpt.moe.dispatch import add_experts_, run_experts
from moegpt.moe.expert_parallel import ExpertParallelGroup, expert_parallel_forward, global_capacity_dropped
from moegpt.moe.experts import ExpertBank
from moegpt.moe.global_batch import losses_over_ranks
from moegpt.moe.layer import FFNLayer
from moegpt.moe.losses import router_z_loss, switch_balance_loss
from moegpt.moe.registry import capacity_factor, expert_hidden
from moegpt.moe.stats import RouterStats, is_generating

# Below this many tokens (generation) the router takes the plain one-op layouts: the [E, N] layouts
# below win only once the matmul and softmax have enough rows to amortise a transpose.
SMALL_BATCH = 64


def expert_capacity(n_tokens: int, top_k: int, n_expert: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_expert))


def capacity_keep_mask(expert_idx_NK: Tensor, batch: int, time: int, n_expert: int, capacity: int) -> Tensor:
    """Which choices fit their expert's capacity, filling experts in causal priority order.

    Priority is position-major across the batch (every sequence's position 0, then position 1, ...)
    with a token's K choices together in rank order, so whether a choice is kept depends only on
    tokens at the same or earlier positions: dropping stays causal within every sequence.
    """
    N, K = expert_idx_NK.shape
    device = expert_idx_NK.device
    # flat index of (n = b*T + t, j) in priority order t-major, then b, then j
    t_idx = torch.arange(time, device=device).repeat_interleave(batch)
    b_idx = torch.arange(batch, device=device).repeat(time)
    token_in_priority = b_idx * time + t_idx
    prio_order = (token_in_priority[:, None] * K + torch.arange(K, device=device)).reshape(-1)
    e_prio = expert_idx_NK.reshape(-1)[prio_order]
    # stable sort by expert keeps priority order within each expert
    sorted_e, perm = torch.sort(e_prio, stable=True)
    counts = torch.bincount(sorted_e + 1, minlength=n_expert + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(N * K, device=device) - starts[sorted_e + 1]
    pos = torch.empty_like(pos_sorted)
    pos[prio_order[perm]] = pos_sorted
    return ((pos < capacity) & (expert_idx_NK.reshape(-1) >= 0)).reshape(N, K)


class RoutedMoE(FFNLayer):
    """Base of the variants with a router over an expert bank: subclasses define `select(logits, x)` ->
    (idx_NK, weight_NK); expert-choice overrides the whole forward."""

    expert_parallel: ExpertParallelGroup | None = None  # set on a layer whose experts were sharded

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, top_k: int | None = None):
        super().__init__()
        C = model_cfg.n_embd
        self.n_expert = moe_cfg.n_expert
        self.top_k = moe_cfg.top_k if top_k is None else top_k
        self.dispatch = moe_cfg.dispatch
        self.normalize_topk = moe_cfg.normalize_topk
        self.jitter = moe_cfg.router_jitter
        self.capacity_factor = capacity_factor(moe_cfg)
        self.routed_scaling_factor = moe_cfg.routed_scaling_factor
        self.router = nn.Linear(C, self.n_expert, bias=False)
        self.experts = ExpertBank(self.n_expert, C, expert_hidden(model_cfg, moe_cfg), moe_cfg.activation)
        # tensors of the current forward shared between its steps (cleared when it ends). A dict, mutated in
        # place: assigning a Module attribute goes through nn.Module.__setattr__, slow per generated token
        self._forward_memo: dict[str, Tensor] = {}

    def router_logits(self, x_NC: Tensor) -> Tensor:
        """Router in fp32 whatever the autocast state: routing decisions must not flip with precision."""
        device_type = x_NC.device.type
        # entering an autocast context costs more than the router matmul of one generated token
        ctx = torch.autocast(device_type=device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
            else contextlib.nullcontext()
        with ctx:
            x, w = _fp32(x_NC), _fp32(self.router.weight)
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            if x.shape[0] < SMALL_BATCH:  # a generated token: one op
                return torch.nn.functional.linear(x, w)
            # computed as [E, N] and viewed as [N, E]: the skinny matmul is faster this way round on CPU,
            # and expert_softmax then needs no transposing copy
            return (w @ x.t()).t()

    def softmax(self, logits_NE: Tensor) -> Tensor:
        """Softmax over experts of this forward's router logits, computed once for selection, the
        balance loss and the stats (each of which used to compute its own)."""
        memo = self._forward_memo
        if memo.get("logits_NE") is logits_NE:
            return memo["probs_NE"]
        probs_NE = memo["probs_NE"] = expert_softmax(logits_NE)
        memo["logits_NE"] = logits_NE
        return probs_NE

    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def router_losses(self, logits_NE: Tensor, idx_NK: Tensor, mask_BT: Tensor | None,
                      B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
        """(balance, z, seq_balance) of this layer, unscaled; subclasses with other losses override."""
        mask_N = None if mask_BT is None else mask_BT.reshape(-1)
        return (switch_balance_loss(logits_NE, idx_NK, mask_N, probs_NE=self.softmax(logits_NE)),
                router_z_loss(logits_NE, mask_N), logits_NE.new_zeros(()))

    def router_probs(self, logits_NE: Tensor) -> Tensor:
        return self.softmax(logits_NE)

    def capacity_dropped(self, idx_NK: Tensor, B: int, T: int) -> Tensor | None:
        if self.capacity_factor <= 0:
            return None
        if self.expert_parallel is not None:
            return global_capacity_dropped(idx_NK, B, T, self._capacity_keep_mask, self.expert_parallel)
        return ~self._capacity_keep_mask(idx_NK, B, T)

    def _capacity(self, n_tokens: int, k: int) -> int:
        return expert_capacity(n_tokens, k, self.n_expert, self.capacity_factor)

    def _capacity_keep_mask(self, idx_NK: Tensor, B: int, T: int) -> Tensor:
        capacity = self._capacity(B * T, idx_NK.shape[1])
        return capacity_keep_mask(idx_NK, B, T, self.n_expert, capacity)

    def routed_forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, RouterStats]:
        try:
            return self._routed_forward(x, mask)
        finally:
            self._forward_memo.clear()  # never keep a graph alive past the forward

    def _routed_forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, RouterStats]:
        B, T, C = x.shape
        x_NC = x.reshape(B * T, C)
        logits_NE = self.router_logits(x_NC)
        idx_NK, weight_NK, losses = self.choose_with_losses(logits_NE, x_NC, mask, B, T)
        dropped_NK = self.capacity_dropped(idx_NK, B, T)
        dispatch_idx = _without(idx_NK, dropped_NK, -1)
        ep = self.expert_parallel
        if ep is None:
            y_NC = run_experts(x_NC, dispatch_idx, weight_NK, self.experts, self.dispatch)
        else:
            y_NC = expert_parallel_forward(x_NC, dispatch_idx, weight_NK, self.experts, self.dispatch, ep)
        generating = is_generating()
        balance, z, seq_balance = losses or self._losses(logits_NE, idx_NK, mask, B, T, generating)
        stats = RouterStats(
            balance=balance, z=z, seq_balance=seq_balance,
            n_expert=self.n_expert,
            expert_idx_NK=idx_NK,
            expert_weight_NK=_detached(_without(weight_NK, dropped_NK, 0)),
            dropped_NK=dropped_NK,
            router_probs_NE=None if generating else _detached(self.router_probs(logits_NE)),
            router_logits_NE=_detached(logits_NE),
        )
        return y_NC.reshape(B, T, -1), stats

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        return self.routed_forward(x, mask)

    def choose_with_losses(self, logits_NE: Tensor, x_NC: Tensor, mask_BT: Tensor | None, B: int,
                           T: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """A forward's choices and gates from its router logits, with its (balance, z, seq_balance) when a variant
        computes them in the same go (softmax_routing.py); None here: forward computes them after the experts
        (`router_losses`)."""
        return *self._choose(logits_NE, x_NC), None

    def _losses(self, logits_NE: Tensor, idx_NK: Tensor, mask_BT: Tensor | None, B: int, T: int,
                generating: bool) -> tuple[Tensor, Tensor, Tensor]:
        """router_losses: zero while generating, over every rank's tokens under expert parallelism."""
        ep = self.expert_parallel
        if generating:
            zero = _zero(logits_NE)
            return zero, zero, zero
        if ep is None:
            return self.router_losses(logits_NE, idx_NK, mask_BT, B, T)
        with losses_over_ranks(ep.world_group):  # over the global batch, as one process would
            return self.router_losses(logits_NE, idx_NK, mask_BT, B, T)

    def _route(self, x_NC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Router logits, then the variant's choices and gates (`_choose`)."""
        logits_NE = self.router_logits(x_NC)
        return logits_NE, *self._choose(logits_NE, x_NC)

    def _choose(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        """The variant's choices and gates, the gates scaled by routed_scaling_factor (DeepSeek-V3 scales the
        routed gates after normalising them)."""
        idx_NK, weight_NK = self.select(logits_NE, x_NC)
        return idx_NK, self.scaled_gates(weight_NK)

    def scaled_gates(self, weight_NK: Tensor) -> Tensor:
        return weight_NK if self.routed_scaling_factor == 1.0 else weight_NK * self.routed_scaling_factor

    def decode(self, h_NC: Tensor, x_NC: Tensor, capture: bool) -> tuple[Tensor, RouterStats | None]:
        """FFNLayer.decode: `routed_decode`, then `add_unrouted_`; or forward when the experts live on other
        ranks (expert parallel)."""
        if self.expert_parallel is not None:
            return super().decode(h_NC, x_NC, capture)
        x_NC, stats = self.routed_decode(h_NC, x_NC, capture)
        return self.add_unrouted_(h_NC, x_NC), stats

    def add_unrouted_(self, h_NC: Tensor, x_NC: Tensor) -> Tensor:
        """Decode: what a subclass's forward adds to the routed output (shared experts), added onto x in place;
        returns x. Nothing here."""
        return x_NC

    def routed_decode(self, h_NC: Tensor, x_NC: Tensor, capture: bool) -> tuple[Tensor, RouterStats | None]:
        """x + the routed output for one new token per sequence: forward's routing and experts, the experts'
        products accumulated onto the residual x in place, no losses, and stats (routing facts only) when
        captured."""
        try:
            logits_NE, idx_NK, weight_NK = self._route(h_NC)
        finally:
            self._forward_memo.clear()
        N, K = idx_NK.shape
        # a capacity of at least every choice of the step drops nothing: skip the mask (unless it is captured)
        dropped_NK = None
        if self.capacity_factor > 0 and (capture or self._capacity(N, K) < N * K):
            dropped_NK = self.capacity_dropped(idx_NK, N, 1)
        dispatch_idx = _without(idx_NK, dropped_NK, -1)
        y_NC = add_experts_(x_NC, h_NC, dispatch_idx, weight_NK, self.experts, self.dispatch)
        if not capture:
            return y_NC, None
        zero = _zero(logits_NE)
        return y_NC, RouterStats(
            balance=zero, z=zero, seq_balance=zero, n_expert=self.n_expert, expert_idx_NK=idx_NK,
            expert_weight_NK=_without(weight_NK, dropped_NK, 0),
            dropped_NK=dropped_NK, router_logits_NE=logits_NE)

    def active_params(self, block_size: int) -> int:
        return self.router.weight.numel() + self.top_k * self.experts.params_per_expert


def _fp32(t: Tensor) -> Tensor:
    # .float() on an fp32 tensor returns it unchanged but is still an op call (a generated token makes ~10)
    return t if t.dtype == torch.float32 else t.float()


_ZEROS: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _without(t_NK: Tensor, dropped_NK: Tensor | None, fill: float) -> Tensor:
    """t with the capacity-dropped choices set to fill (-1: no expert; 0: no gate)."""
    return t_NK if dropped_NK is None else t_NK.masked_fill(dropped_NK, fill)


def _zero(like: Tensor) -> Tensor:
    """A shared 0-d zero of like's device and dtype: generation's losses, which nothing reads or writes
    (a new tensor per layer and generated token is an op each)."""
    key = (like.device, like.dtype)
    if key not in _ZEROS:
        with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, usable outside inference_mode
            _ZEROS[key] = torch.zeros((), device=like.device, dtype=like.dtype)
    return _ZEROS[key]


def _detached(t: Tensor) -> Tensor:
    # a detach is an op; under no_grad/inference_mode (generation) there is nothing to detach from
    return t.detach() if t.requires_grad else t


def expert_softmax(logits_NE: Tensor) -> Tensor:
    """Softmax over the expert dimension. On CPU torch's softmax over a short last dimension runs
    several times slower than over the first dimension of the transposed layout (README, "Dispatch
    backends"), so it is computed as [E, N] and returned as a [N, E] view."""
    if logits_NE.device.type != "cpu" or logits_NE.shape[0] < SMALL_BATCH:  # a few rows: one op is cheaper
        return torch.softmax(logits_NE, dim=-1)
    return torch.softmax(logits_NE.t().contiguous(), dim=0).t()


def softmax_topk(logits_NE: Tensor, k: int, normalize: bool,
                 softmax: Callable[[Tensor], Tensor] = expert_softmax) -> tuple[Tensor, Tensor]:
    """Top-k of the softmax over experts (computed by `softmax`, e.g. a layer's memo); renormalised
    over the k kept experts when `normalize`."""
    if normalize and logits_NE.shape[0] < SMALL_BATCH:
        # renormalised top-k of a softmax == softmax of the top-k logits: two ops instead of four, and no
        # full softmax (a generated token; for many rows the full one is computed anyway for the balance
        # loss, and a softmax over a short last dimension is slow on CPU, so the other form wins there)
        kept_NK, idx_NK = torch.topk(logits_NE, k, dim=-1)
        return idx_NK, torch.softmax(kept_NK, dim=-1)
    weight_NK, idx_NK = torch.topk(softmax(logits_NE), k, dim=-1)
    if normalize:
        weight_NK = weight_NK / weight_NK.sum(dim=-1, keepdim=True)
    return idx_NK, weight_NK
