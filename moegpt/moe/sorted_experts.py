"""The fast path: sorted token->expert assignments through all experts in one autograd node.

Why a hand-written backward: with plain autograd, E experts cost E chunks x (gather, matmul,
activation, matmul) graph nodes, a torch.cat of the outputs, a stack of E weight gradients (unbind's
backward) and a saved copy of every intermediate. Here one node walks the expert blocks, weight
gradients land in their [E, ...] slot directly, and only the pre-activations and the row map are
saved: each block's inputs are regathered from x and its activations recomputed (keeping either
measured slower: no [M, C] or [M, H] buffer is allocated, page-faulted and streamed per step, and at
top-8 M is 8x the tokens), and the expert outputs are never needed (the gate gradient is
<a, dL/da_unweighted>). Outputs and input gradients are added to their tokens block by block.

Bucketing (bf16 on CPU): each expert's row block is padded with zero rows up to a multiple of
`bucket`, so matmul row counts come from a small set and oneDNN reuses its compiled primitives.
Padding rows are zeros whose outputs are discarded; no token is ever dropped.

Legend: N tokens, C width, E experts, M assignments (kept choices), P padded rows (P >= M), n rows of a block,
H expert hidden width, Hin = width of the first projection (2H for SwiGLU, H otherwise, C for linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moegpt.moe.experts import activate


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


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b without a temporary when dtypes agree (a weight-gradient slot of the [E, ...] bank)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _pad_rows(t_nX: Tensor, n_pad: int) -> Tensor:
    if n_pad == t_nX.shape[0]:
        return t_nX
    return torch.cat([t_nX, t_nX.new_zeros(n_pad - t_nX.shape[0], *t_nX.shape[1:])])


def _gather_rows(src_NX: Tensor, tok_n: Tensor, n_pad: int) -> Tensor:
    """src rows of one block, zero-padded to n_pad rows (bucket padding)."""
    n = tok_n.shape[0]
    if n == n_pad:
        return src_NX.index_select(0, tok_n)
    out = src_NX.new_empty(n_pad, src_NX.shape[1])
    torch.index_select(src_NX, 0, tok_n, out=out[:n])
    out[n:].zero_()
    return out


def _add_rows(out_NX: Tensor, tok_n: Tensor, rows_nX: Tensor) -> None:
    """out[tok_n[i]] += rows[i] for the block's real rows (padding rows, past len(tok_n), are skipped)."""
    n = tok_n.shape[0]
    index_add_rows_(out_NX, tok_n, rows_nX if rows_nX.shape[0] == n else rows_nX[:n])


def index_add_rows_(out_NX: Tensor, index_n: Tensor, rows_nX: Tensor) -> Tensor:
    """out.index_add_(0, index, rows), on CPU with one OpenMP thread: torch's multi-threaded CPU index_add
    costs hundreds of microseconds even for a few rows (README, "Measured on the 2-core development
    machine"), more than a one-thread add of a whole layer's rows. Same result either way."""
    if torch.compiler.is_compiling() or out_NX.device.type != "cpu" or torch.get_num_threads() == 1:
        return out_NX.index_add_(0, index_n, rows_nX)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return out_NX.index_add_(0, index_n, rows_nX)
    finally:
        torch.set_num_threads(threads)


def _padded_counts(counts_E: list[int], bucket: int) -> list[int]:
    return [-(-n // bucket) * bucket for n in counts_E]


class SortedExperts(torch.autograd.Function):
    """y_NC = sum over assignments m of gate_M[m] * expert_{e(m)}(x_NC[tok_M[m]]); tok_M sorted by expert.

    Everything happens block by block (one expert's rows at a time): the elementwise work on a block
    runs right after its matmul while the block is still in cache, which on CPU is worth more than
    fusing across experts (whole-tensor elementwise ops are memory-bound, and measured slower).
    Per-expert views come from one split/unbind per tensor: at a few microseconds of dispatch per
    view, slicing each block separately cost more than some of the small blocks' matmuls.
    """

    @staticmethod
    def forward(ctx, x_NC: Tensor, gate_M: Tensor, w_in: Tensor, w_out: Tensor | None, tok_M: Tensor,
                counts_E: list[int], bucket: int, activation: str, compute_dtype: torch.dtype) -> Tensor:
        x_c = x_NC.to(compute_dtype)
        padded_E = _padded_counts(counts_E, bucket)
        # kept for backward: the pre-activations. The gathered inputs are not kept but regathered per block
        # (an [M, C] buffer is k times the tokens; fresh each step it page-faults, and it measured slower)
        h_P = x_c.new_empty(sum(padded_E), w_in.shape[2])
        y = x_c.new_zeros(x_NC.shape[0], w_in.shape[2] if w_out is None else w_out.shape[2])
        w_in_E = w_in.to(compute_dtype).unbind(0)
        w_out_E = None if w_out is None else w_out.to(compute_dtype).unbind(0)
        gate_E = gate_M.to(compute_dtype).unsqueeze(1).split(counts_E)
        for e, (tok_n, h, n_pad) in enumerate(zip(tok_M.split(counts_E), h_P.split(padded_E), padded_E, strict=True)):
            if not n_pad:
                continue
            torch.mm(_gather_rows(x_c, tok_n, n_pad), w_in_E[e], out=h)
            gate_n1 = _pad_rows(gate_E[e], n_pad)
            if w_out_E is None:  # linear: h is the output
                out = h * gate_n1
            else:
                out = torch.mm(activate(h, activation), w_out_E[e]).mul_(gate_n1)
            # each block's weighted outputs go to their tokens right away (an [M, C] buffer scattered by
            # one index_add at the end measured slower at E=64 and no faster at E=8)
            _add_rows(y, tok_n, out)
        ctx.save_for_backward(gate_M, w_in, w_out, tok_M, x_c, h_P)
        ctx.x_dtype = x_NC.dtype
        ctx.counts_E, ctx.padded_E, ctx.activation, ctx.compute_dtype = counts_E, padded_E, activation, compute_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y_NC: Tensor):
        gate_M, w_in, w_out, tok_M, x_c, h_P = ctx.saved_tensors
        dtype, activation, counts_E, padded_E = ctx.compute_dtype, ctx.activation, ctx.counts_E, ctx.padded_E
        grad_y = grad_y_NC.to(dtype)
        grad_x = torch.zeros_like(x_c)
        grad_gate = torch.empty_like(gate_M)  # every assignment belongs to exactly one block
        # experts with rows write their whole gradient slot; only idle experts need zeros
        grad_w_in = torch.empty_like(w_in)
        grad_w_out = None if w_out is None else torch.empty_like(w_out)
        idle = [e for e, n in enumerate(counts_E) if not n]
        if idle:
            grad_w_in[idle] = 0
            if grad_w_out is not None:
                grad_w_out[idle] = 0
        w_in_t_E = w_in.to(dtype).transpose(1, 2).unbind(0)
        w_out_t_E = None if w_out is None else w_out.to(dtype).transpose(1, 2).unbind(0)
        grad_w_in_E = grad_w_in.unbind(0)
        grad_w_out_E = None if grad_w_out is None else grad_w_out.unbind(0)
        gate_E = gate_M.to(dtype).unsqueeze(1).split(counts_E)
        blocks = zip(tok_M.split(counts_E), h_P.split(padded_E), grad_gate.split(counts_E), padded_E, strict=True)
        for e, (tok_n, h, grad_gate_n, n_pad) in enumerate(blocks):
            if not n_pad:
                continue
            n = tok_n.shape[0]
            gate_n1 = _pad_rows(gate_E[e], n_pad)
            # dL/d(weighted expert output), gathered per block: one gather of all rows measured slower
            # at E=64 (a fresh [M, C] buffer per step instead of block-sized ones the allocator reuses)
            g = _gather_rows(grad_y, tok_n, n_pad)
            if w_out_t_E is None:
                grad_gate_n.copy_(torch.linalg.vecdot(h[:n], g[:n]))
                grad_h = g * gate_n1
            else:
                # dL/d(gate) = <a, g W_out^T>; the gate then scales [n, C] rows for dW_out, never [n, H]
                grad_a = g @ w_out_t_E[e]
                a, silu_gate = _activate_keep(h, activation)
                grad_gate_n.copy_(torch.linalg.vecdot(a[:n], grad_a[:n]))
                _mm_into(a.t(), g * gate_n1, grad_w_out_E[e])
                grad_h = _act_backward(grad_a.mul_(gate_n1), h, activation, silu_gate)
            _mm_into(_gather_rows(x_c, tok_n, n_pad).t(), grad_h, grad_w_in_E[e])
            _add_rows(grad_x, tok_n, grad_h @ w_in_t_E[e])
        return grad_x.to(ctx.x_dtype), grad_gate, grad_w_in, grad_w_out, None, None, None, None, None


def sorted_experts(x_NC: Tensor, tok_M: Tensor, gate_M: Tensor, counts_E: list[int],
                   w_in: Tensor, w_out: Tensor | None, activation: str, bucket: int = 1) -> Tensor:
    """Run assignments already sorted by expert (counts_E assignments per expert, in expert order).

    bucket > 1 pads every expert's block to a multiple of `bucket` rows (repeating matmul shapes).
    Under autocast the matmuls run in the autocast dtype, and so does the result.
    """
    device_type = x_NC.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_NC.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        return SortedExperts.apply(x_NC, gate_M, w_in, w_out, tok_M, list(counts_E), bucket, activation, dtype)
