"""The fast path: sorted token->expert assignments through all experts in one autograd node.

Why a hand-written backward: with plain autograd, E experts cost E chunks x (gather, matmul,
activation, matmul) graph nodes, a torch.cat of the outputs, a stack of E weight gradients (unbind's
backward) and a saved copy of every intermediate. Here one node walks the experts, weight gradients land
in their [E, ...] slots directly, and only the pre-activations, activations and row map are saved: each
block's inputs are regathered from x (at top-8 an [M, C] copy would be 8x the tokens), and the expert
outputs are never needed (the gate gradient is <a, dL/da_unweighted>).

Ranges: consecutive experts whose blocks are about the same size run as one range (`plan_ranges`): every
expert of the range is padded to the range's largest block, so each projection is one batched matmul and
each elementwise step one op for the whole range. At small blocks (a few hundred rows) the per-op cost,
not the FLOPs, is what a MoE layer pays; at large blocks a range is one expert, so that the elementwise
work on a block runs while it is still in cache. Outputs and input gradients are added to their tokens
range by range. Padding rows point at token 0 with gate 0: their outputs, and so all gradients through
them, are exact zeros.

On CPU in fp32 `sorted_experts` hands the call to the native kernel (native.py: one parallel region per
direction, each thread on its own share of the assignments) when it is built; everything below is the
Python path that serves every other call (bf16, bucketing, CUDA, torch.compile, no compiler).

Bucketing (bf16 on CPU): each expert's block is padded up to a multiple of `bucket` rows, so matmul row
counts come from a small set and oneDNN reuses its compiled primitives. No token is ever dropped.

Legend: N tokens, C width, E experts, M assignments (kept choices), P padded rows (P >= M), G experts of a
range, H expert hidden width, Hin = width of the first projection (2H for SwiGLU, H otherwise, C for linear).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import moegpt.moe.native as native
from moegpt.moe.experts import activate
from moegpt.runtime import on_one_thread

# A range of experts may pad each expert to its largest block while the padding stays within
# PADDING_SLACK of its real rows, or within PADDING_ROWS rows whatever the slack (below that, padding rows cost
# less than the ops of another range), and while its pre-activations stay within MAX_RANGE_BYTES (larger, the
# elementwise steps over the range fall out of cache).
PADDING_SLACK = 0.125
PADDING_ROWS = 128
MAX_RANGE_BYTES = 2 << 20
# Up to this many padded rows the row map is built on the host (see padded_slots).
HOST_SLOTS = 1024
# Below this many added values index_add runs on one OpenMP thread (see index_add_rows_).
ONE_THREAD_ADD_VALUES = 1 << 16


def _activate_keep(h_nHin: Tensor, activation: str) -> tuple[Tensor, Tensor | None]:
    """activate(h), plus silu(gate) for SwiGLU so its backward need not compute it again."""
    if activation != "swiglu":
        return activate(h_nHin, activation), None
    gate, up = h_nHin.chunk(2, dim=-1)
    silu_gate = F.silu(gate)
    return silu_gate * up, silu_gate


def _act_backward(grad_a_nH: Tensor, h_nHin: Tensor, activation: str, silu_gate: Tensor | None) -> Tensor:
    """dL/dh from dL/da for a = activate(h); SwiGLU writes both halves in place (no concatenation)."""
    if activation == "swiglu":
        gate, up = h_nHin.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # dynamo cannot trace out= into a non-contiguous half (a graph break)
            return torch.cat([torch.ops.aten.silu_backward(grad_a_nH * up, gate), grad_a_nH * silu_gate], dim=-1)
        grad_h = torch.empty_like(h_nHin)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_a_nH, silu_gate, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad_a_nH * up, gate, grad_input=grad_gate)
        return grad_h
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_a_nH, h_nHin)
    if activation == "relu":
        return grad_a_nH * (h_nHin > 0)
    return grad_a_nH


def _bmm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b (batched) without a temporary when dtypes agree (a range of the [E, ...] gradient bank)."""
    if out.dtype == a.dtype:
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b))


def index_add_rows_(out_NX: Tensor, index_n: Tensor, rows_nX: Tensor) -> Tensor:
    """out.index_add_(0, index, rows); a small add (fewer than ONE_THREAD_ADD_VALUES values) on CPU runs on one
    OpenMP thread, where handing a few rows to a second thread costs more than the add. Large blocks keep every
    thread: on one thread the other sleeps through the add and must be woken for the next op (README, the
    index_add note at the end of "Measured on the 2-core development machine"). Same result either way."""
    if (torch.compiler.is_compiling() or out_NX.device.type != "cpu" or torch.get_num_threads() == 1
            or rows_nX.numel() >= ONE_THREAD_ADD_VALUES):
        return out_NX.index_add_(0, index_n, rows_nX)
    return on_one_thread(out_NX.index_add_, 0, index_n, rows_nX)


@dataclass(frozen=True)
class ExpertRange:
    """Experts first..stop-1 run together: each gets `cap` rows (its assignments, then zero-gated padding)
    at padded rows offset..offset + (stop - first) * cap, one batched matmul per projection."""

    first: int
    stop: int
    cap: int
    offset: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def plan_ranges(counts_E: list[int], bucket: int = 1, max_rows: int = 1 << 62) -> list[ExpertRange]:
    """Consecutive experts grouped so that padding every expert of a group to the group's largest block
    (rounded up to `bucket`) stays within PADDING_SLACK of the group's real rows or within PADDING_ROWS, and
    a group holds at most `max_rows` padded rows unless one expert alone exceeds it. Idle experts get no
    rows unless a group spans them (then their padding counts like any other)."""
    ranges: list[ExpertRange] = []
    first, cap, real, offset = -1, 0, 0, 0
    for e, n in enumerate(counts_E):
        if first >= 0:
            new_cap = _round_up(max(cap, n), bucket)
            padded = new_cap * (e + 1 - first)
            if padded - (real + n) <= max(PADDING_SLACK * (real + n), PADDING_ROWS) and padded <= max_rows:
                cap, real = new_cap, real + n
                continue
            ranges.append(ExpertRange(first, e, cap, offset))
            offset += cap * (e - first)
            first = -1
        if n:
            first, cap, real = e, _round_up(n, bucket), n
    if first >= 0:
        ranges.append(ExpertRange(first, len(counts_E), cap, offset))
    return ranges


def padded_slots(counts_E: list[int], ranges: list[ExpertRange], device: torch.device) -> Tensor:
    """For every padded row, the assignment it holds (an index into the expert-sorted assignments), or M
    (one past the last assignment) for a padding row."""
    M = sum(counts_E)
    starts_E = [0]
    for n in counts_E[:-1]:
        starts_E.append(starts_E[-1] + n)
    experts = [e for r in ranges for e in range(r.first, r.stop)]
    caps = [r.cap for r in ranges for _ in range(r.first, r.stop)]
    offsets = [r.offset + i * r.cap for r in ranges for i in range(r.stop - r.first)]
    P = sum(caps)
    # a few hundred rows (generation's windows): one tensor from a list beats the ops below (not under compile,
    # where the counts are symbolic)
    if P <= HOST_SLOTS and not torch.compiler.is_compiling():
        slots: list[int] = []
        for e, cap in zip(experts, caps, strict=True):
            slots.extend(range(starts_E[e], starts_E[e] + counts_E[e]))
            slots.extend([M] * (cap - counts_E[e]))
        return torch.tensor(slots, dtype=torch.long, device=device)
    table = torch.tensor([[starts_E[e] for e in experts], [counts_E[e] for e in experts], caps, offsets],
                         dtype=torch.long, device=device)
    starts_G, counts_G, caps_G, offsets_G = table.unbind(0)
    expert_P = torch.repeat_interleave(torch.arange(len(experts), device=device), caps_G, output_size=P)
    row_P = torch.arange(P, device=device) - offsets_G[expert_P]
    slot_P = starts_G[expert_P] + row_P
    return slot_P.masked_fill_(row_P >= counts_G[expert_P], M)


def _split_rows(t_P: Tensor, ranges: list[ExpertRange]) -> tuple[Tensor, ...]:
    """Each range's padded rows of t, as views made by one op (a slice per range cost an op each)."""
    return t_P.split([(r.stop - r.first) * r.cap for r in ranges])


def _split_experts(bank: Tensor | None, ranges: list[ExpertRange]) -> list[Tensor | None]:
    """Each range's experts of an [E, ...] bank, as views made by one op; idle experts between ranges are
    skipped. None for a missing bank (the linear activation has no second projection)."""
    if bank is None:
        return [None] * len(ranges)
    sizes, picks, at = [], [], 0
    for r in ranges:
        if r.first > at:
            sizes.append(r.first - at)
        picks.append(len(sizes))
        sizes.append(r.stop - r.first)
        at = r.stop
    if at < bank.shape[0]:
        sizes.append(bank.shape[0] - at)
    parts = bank.split(sizes)
    return [parts[i] for i in picks]


class SortedExperts(torch.autograd.Function):
    """y_NC = sum over assignments m of gate_M[m] * expert_{e(m)}(x_NC[tok_M[m]]); tok_M sorted by expert.

    Work goes range by range (`plan_ranges`): a range's experts each get the same number of rows, so every
    projection of the range is one batched matmul over [G, cap, .] blocks and every elementwise step one op,
    instead of a handful of ops per expert (at small blocks the per-op cost, not the FLOPs, dominated).
    Padding rows point at token 0 with gate 0: their outputs, and so all their gradients, are exact zeros.
    """

    @staticmethod
    def forward(ctx, x_NC: Tensor, gate_M: Tensor, w_in: Tensor, w_out: Tensor | None, tok_M: Tensor,
                counts_E: list[int], bucket: int, activation: str, compute_dtype: torch.dtype) -> Tensor:
        x_c = x_NC.to(compute_dtype)
        ranges = plan_ranges(counts_E, bucket, max(1, MAX_RANGE_BYTES // (w_in.shape[2] * x_c.element_size())))
        slot_P = padded_slots(counts_E, ranges, x_NC.device)
        tok_P = F.pad(tok_M, (0, 1)).index_select(0, slot_P)
        gate_P = F.pad(gate_M.to(compute_dtype), (0, 1)).index_select(0, slot_P).unsqueeze(1)
        # kept for backward: the pre-activations; the activations too for GELU, whose erf costs more to recompute
        # than to keep (SwiGLU's silu-times-up is recomputed: keeping it measured slower for large blocks). The
        # gathered inputs are not kept but regathered per range (at top-8 they are 8x the tokens)
        kept: list[Tensor] = []
        h_P = x_c.new_empty(slot_P.shape[0], w_in.shape[2])
        y = x_c.new_zeros(x_NC.shape[0], w_in.shape[2] if w_out is None else w_out.shape[2])
        w_out_R = _split_experts(None if w_out is None else w_out.to(compute_dtype), ranges)
        for r, tok_r, gate_r, h_r, w_in_G, w_out_G in zip(
                ranges, _split_rows(tok_P, ranges), _split_rows(gate_P, ranges), _split_rows(h_P, ranges),
                _split_experts(w_in.to(compute_dtype), ranges), w_out_R, strict=True):
            G = r.stop - r.first
            h = h_r.view(G, r.cap, -1)
            torch.bmm(x_c.index_select(0, tok_r).view(G, r.cap, -1), w_in_G, out=h)
            if w_out_G is None:  # linear: h is the output (kept for backward, so not scaled in place)
                out = h_r * gate_r
            else:
                a = activate(h, activation)
                if activation == "gelu":
                    kept.append(a)
                out = torch.bmm(a, w_out_G).view(-1, w_out_G.shape[-1]).mul_(gate_r)
            index_add_rows_(y, tok_r, out)
        ctx.save_for_backward(w_in, w_out, tok_P, slot_P, gate_P, x_c, h_P, *kept)
        ctx.ranges, ctx.gate_dtype, ctx.x_dtype = ranges, gate_M.dtype, x_NC.dtype
        ctx.activation, ctx.compute_dtype, ctx.n_assignments = activation, compute_dtype, gate_M.shape[0]
        return y

    @staticmethod
    def backward(ctx, grad_y_NC: Tensor):
        w_in, w_out, tok_P, slot_P, gate_P, x_c, h_P, *kept = ctx.saved_tensors
        dtype, activation, ranges = ctx.compute_dtype, ctx.activation, ctx.ranges
        grad_y = grad_y_NC.to(dtype)
        grad_x = torch.zeros_like(x_c)
        grad_gate_P = gate_P.new_empty(gate_P.shape[0])
        grad_w_in = _zeros_outside(w_in, ranges)
        grad_w_out = None if w_out is None else _zeros_outside(w_out, ranges)
        per_range = zip(ranges, _split_rows(tok_P, ranges), _split_rows(gate_P, ranges), _split_rows(h_P, ranges),
                        _split_rows(grad_gate_P, ranges), _split_experts(w_in.to(dtype).transpose(1, 2), ranges),
                        _split_experts(grad_w_in, ranges), _split_experts(grad_w_out, ranges),
                        _split_experts(None if w_out is None else w_out.to(dtype).transpose(1, 2), ranges), strict=True)
        for i, (r, tok_r, gate_r, h_r, grad_gate_r, w_in_t_G, grad_w_in_G, grad_w_out_G, w_out_t_G) \
                in enumerate(per_range):
            G = r.stop - r.first
            gate_r, h = gate_r.view(G, r.cap, 1), h_r.view(G, r.cap, -1)
            g = grad_y.index_select(0, tok_r).view(G, r.cap, -1)  # dL/d(weighted expert output)
            if w_out_t_G is None:
                grad_gate_r.copy_(torch.linalg.vecdot(h, g).view(-1))
                grad_h = g * gate_r
            else:
                # dL/d(gate) = <a, g W_out^T>; the gate then scales [cap, C] rows for dW_out, never [cap, H]
                grad_a = torch.bmm(g, w_out_t_G)
                a, silu_gate = (kept[i], None) if kept else _activate_keep(h, activation)
                grad_gate_r.copy_(torch.linalg.vecdot(a, grad_a).view(-1))
                _bmm_into(a.transpose(1, 2), g * gate_r, grad_w_out_G)
                grad_h = _act_backward(grad_a.mul_(gate_r), h, activation, silu_gate)
            _bmm_into(x_c.index_select(0, tok_r).view(G, r.cap, -1).transpose(1, 2), grad_h, grad_w_in_G)
            grad_rows = torch.bmm(grad_h, w_in_t_G)
            index_add_rows_(grad_x, tok_r, grad_rows.view(-1, grad_rows.shape[-1]))
        # every assignment has exactly one padded row; padding rows all land on the discarded slot M
        grad_gate = grad_gate_P.new_empty(ctx.n_assignments + 1).index_copy_(0, slot_P, grad_gate_P)
        return (grad_x.to(ctx.x_dtype), grad_gate[:-1].to(ctx.gate_dtype), grad_w_in, grad_w_out,
                None, None, None, None, None)


def _zeros_outside(w: Tensor, ranges: list[ExpertRange]) -> Tensor:
    """An uninitialised gradient for the [E, ...] bank, zeroed on the experts no range covers (idle ones):
    the ranges write their slots whole."""
    grad = torch.empty_like(w)
    covered = [False] * w.shape[0]
    for r in ranges:
        covered[r.first:r.stop] = [True] * (r.stop - r.first)
    idle = [e for e, c in enumerate(covered) if not c]
    if idle:
        grad[idle] = 0
    return grad


def sorted_experts(x_NC: Tensor, tok_M: Tensor, gate_M: Tensor, counts_E: list[int],
                   w_in: Tensor, w_out: Tensor | None, activation: str, bucket: int = 1) -> Tensor:
    """Run assignments already sorted by expert (counts_E assignments per expert, in expert order).

    bucket > 1 pads every expert's block to a multiple of `bucket` rows (repeating matmul shapes).
    Under autocast the matmuls run in the autocast dtype, and so does the result.
    """
    device_type = x_NC.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_NC.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        if native.serves(x_NC, gate_M, w_in, w_out, dtype, bucket, activation):
            return native.NativeSortedExperts.apply(x_NC.contiguous(), gate_M.contiguous(), w_in.contiguous(),
                                                    None if w_out is None else w_out.contiguous(), tok_M.contiguous(),
                                                    list(counts_E), activation)
        return SortedExperts.apply(x_NC, gate_M, w_in, w_out, tok_M, list(counts_E), bucket, activation, dtype)
