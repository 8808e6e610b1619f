"""The fast path: sorted token->expert assignments through all experts in one autograd node.

Why a hand-written backward: with plain autograd, E experts cost E chunks x (gather, matmul,
activation, matmul) graph nodes, a torch.cat of the outputs, a stack of E weight gradients (unbind's
backward) and a saved copy of every intermediate. Here one node walks the expert blocks, weight
gradients land in their [E, ...] slot directly, and only x, the pre-activations and the row map are
saved: the gathered inputs and activations are recomputed, and the expert outputs are never needed
(the gate gradient is <a, dL/da_unweighted>).

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


def _act_backward(grad_a_PH: Tensor, h_PHin: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        gate, up = h_PHin.chunk(2, dim=-1)
        grad_h = torch.empty_like(h_PHin)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad_a_PH, F.silu(gate), out=grad_up)
        grad_gate.copy_(torch.ops.aten.silu_backward(grad_a_PH * up, gate))
        return grad_h
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad_a_PH, h_PHin)
    if activation == "relu":
        return grad_a_PH * (h_PHin > 0)
    return grad_a_PH


def _blocks(counts_E: list[int], bucket: int) -> list[tuple[int, int, int, int, int]]:
    """(expert, first assignment, assignments, first padded row, padded rows) of each non-empty block."""
    out, start, start_pad = [], 0, 0
    for e, n in enumerate(counts_E):
        if n:
            n_pad = -(-n // bucket) * bucket
            out.append((e, start, n, start_pad, n_pad))
            start_pad += n_pad
        start += n
    return out


def _gather_rows(src_NX: Tensor, tok_n: Tensor, n_pad: int) -> Tensor:
    """src rows of one block, zero-padded to n_pad rows."""
    if n_pad == tok_n.shape[0]:
        return src_NX.index_select(0, tok_n)
    out = src_NX.new_zeros(n_pad, src_NX.shape[1])
    torch.index_select(src_NX, 0, tok_n, out=out[:tok_n.shape[0]])
    return out


class SortedExperts(torch.autograd.Function):
    """y_NC = sum over assignments m of gate_M[m] * expert_{e(m)}(x_NC[tok_M[m]]); tok_M sorted by expert.

    Everything happens block by block (one expert's rows at a time): the elementwise work on a block
    runs right after its matmul while the block is still in cache, which on CPU is worth more than
    fusing across experts (whole-tensor elementwise ops are memory-bound).
    """

    @staticmethod
    def forward(ctx, x_NC: Tensor, gate_M: Tensor, w_in: Tensor, w_out: Tensor | None, tok_M: Tensor,
                blocks: list[tuple[int, int, int, int, int]], activation: str, compute_dtype: torch.dtype) -> Tensor:
        x_c = x_NC.to(compute_dtype)
        n_rows = sum(b[4] for b in blocks)
        h_P = x_c.new_empty(n_rows, w_in.shape[2])  # pre-activations, the only intermediate kept
        y = None
        for e, start, n, start_pad, n_pad in blocks:
            tok_n = tok_M[start:start + n]
            h = torch.mm(_gather_rows(x_c, tok_n, n_pad), w_in[e].to(compute_dtype),
                         out=h_P[start_pad:start_pad + n_pad])
            out = h if w_out is None else activate(h, activation) @ w_out[e].to(compute_dtype)
            out = out[:n] * gate_M[start:start + n, None].to(compute_dtype)
            y = out.new_zeros(x_NC.shape[0], out.shape[1]) if y is None else y
            y.index_add_(0, tok_n, out)
        if y is None:
            width = w_in.shape[2] if w_out is None else w_out.shape[2]
            y = x_c.new_zeros(x_NC.shape[0], width)
        ctx.save_for_backward(x_NC, gate_M, w_in, w_out, tok_M, h_P)
        ctx.blocks, ctx.activation, ctx.compute_dtype = blocks, activation, compute_dtype
        return y

    @staticmethod
    def backward(ctx, grad_y_NC: Tensor):
        x_NC, gate_M, w_in, w_out, tok_M, h_P = ctx.saved_tensors
        dtype, activation = ctx.compute_dtype, ctx.activation
        x_c, grad_y = x_NC.to(dtype), grad_y_NC.to(dtype)
        grad_x = torch.zeros_like(x_c)
        grad_gate = torch.empty_like(gate_M)  # every assignment belongs to exactly one block
        # every expert with rows writes its whole gradient slot; only the idle ones need zeros
        idle = sorted(set(range(w_in.shape[0])) - {blk[0] for blk in ctx.blocks})
        grad_w_in = torch.empty_like(w_in)
        grad_w_in[idle] = 0
        grad_w_out = None
        if w_out is not None:
            grad_w_out = torch.empty_like(w_out)
            grad_w_out[idle] = 0
        for e, start, n, start_pad, n_pad in ctx.blocks:
            tok_n = tok_M[start:start + n]
            gate = gate_M[start:start + n, None].to(dtype)
            if n_pad > n:
                gate = torch.cat([gate, gate.new_zeros(n_pad - n, 1)])
            h = h_P[start_pad:start_pad + n_pad]
            g = _gather_rows(grad_y, tok_n, n_pad)  # dL/d(weighted expert output)
            if w_out is None:
                grad_gate[start:start + n] = (h * g).sum(-1)[:n].to(grad_gate.dtype)
                grad_h = g * gate
            else:
                grad_a_raw = g @ w_out[e].to(dtype).t()
                a = activate(h, activation)  # recomputed: cheaper than keeping it
                grad_gate[start:start + n] = (a * grad_a_raw).sum(-1)[:n].to(grad_gate.dtype)
                grad_w_out[e] = ((a * gate).t() @ g).to(grad_w_out.dtype)
                grad_h = _act_backward(grad_a_raw * gate, h, activation)
            grad_w_in[e] = (_gather_rows(x_c, tok_n, n_pad).t() @ grad_h).to(grad_w_in.dtype)
            grad_x.index_add_(0, tok_n, (grad_h @ w_in[e].to(dtype).t())[:n])
        return grad_x.to(x_NC.dtype), grad_gate, grad_w_in, grad_w_out, None, None, None, None


def sorted_experts(x_NC: Tensor, tok_M: Tensor, gate_M: Tensor, counts_E: list[int],
                   w_in: Tensor, w_out: Tensor | None, activation: str, bucket: int = 1) -> Tensor:
    """Run assignments already sorted by expert (counts_E assignments per expert, in expert order).

    bucket > 1 pads every expert's block to a multiple of `bucket` rows (repeating matmul shapes).
    Under autocast the matmuls run in the autocast dtype, and so does the result.
    """
    device_type = x_NC.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_NC.dtype
    with torch.autocast(device_type=device_type, enabled=False):
        return SortedExperts.apply(x_NC, gate_M, w_in, w_out, tok_M, _blocks(counts_E, bucket), activation, dtype)


def padding_fraction(counts_E: list[int], bucket: int) -> float:
    """Share of the padded rows that are padding (0 when bucket == 1)."""
    real = sum(counts_E)
    padded = sum(-(-n // bucket) * bucket for n in counts_E)
    return (padded - real) / padded if padded else 0.0
