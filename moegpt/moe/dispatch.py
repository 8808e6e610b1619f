"""Dispatch backends: run each token's chosen experts and sum their weighted outputs.

All backends take the same arguments and give the same result (tests check fp32 <= 1e-5 for outputs
and gradients). Legend: N tokens, K choices per token, C width, E experts, M = kept assignments.

- loop:    reference, HF-style: for each expert, find its tokens, run, index_add.
- sorted:  default: one stable sort of the N*K assignments by expert (a native counting sort on CPU), then
           every expert's contiguous row block through one hand-written autograd node
           (moe/sorted_experts.py), index_add back per block.
- bucketed: sorted, with each expert's block padded with zero rows to a multiple of 64, so matmul
           shapes repeat across steps (what bf16 on CPU needs: oneDNN compiles a primitive per shape).
- padded:  sorted, then a capacity-bounded [E, max_count, C] buffer and batched matmuls (static
           shape per step; pays for padding under imbalance).
- grouped: sorted, then torch._grouped_mm over the per-expert row groups (a real grouped GEMM on
           Hopper GPUs; on CPU it is per-group matmuls inside). Widths must be multiples of 8.
"""

from __future__ import annotations

import torch
from torch import Tensor

import moegpt.moe.native as native
from moegpt.config import DISPATCH_BACKENDS
from moegpt.errors import MoegptError
from moegpt.moe.experts import ExpertBank, activate, mlp_add_to_, mlp_apply, mlp_last_product
from moegpt.moe.sorted_experts import sorted_experts

BACKENDS = DISPATCH_BACKENDS
BUCKET_ROWS = 64
# Inference on a handful of assignments (one generated token): running each assignment on its
# expert's weights directly costs a few ops instead of a sort, a host sync and a loop over experts.
DECODE_ROWS = 16


def run_experts(x_NC: Tensor, expert_idx_NK: Tensor, weight_NK: Tensor, bank: ExpertBank,
                backend: str = "sorted") -> Tensor:
    """y[n] = sum_j weight[n, j] * expert_{idx[n, j]}(x[n]); choices with idx -1 are skipped."""
    if backend == "loop":
        return _loop(x_NC, expert_idx_NK, weight_NK, bank)
    if _few_assignment_path(backend, expert_idx_NK):
        return _few_assignments(x_NC, expert_idx_NK, weight_NK, bank)
    if backend not in _SORTED_BACKENDS:
        raise MoegptError(f"unknown dispatch backend {backend!r}; valid: {', '.join(BACKENDS)}")
    return _sorted_dispatch(x_NC, expert_idx_NK, weight_NK, bank, backend)


def add_experts_(residual_NC: Tensor, x_NC: Tensor, expert_idx_NK: Tensor, weight_NK: Tensor,
                 bank: ExpertBank, backend: str = "sorted") -> Tensor:
    """residual += run_experts(...), in place (inference: a decode step's own residual); returns residual. On
    the few-assignment path every expert's product accumulates straight onto it, with no separate sum."""
    if not _few_assignment_path(backend, expert_idx_NK):
        return residual_NC.add_(run_experts(x_NC, expert_idx_NK, weight_NK, bank, backend))
    w_in, w_out, activation = bank.w_in, bank.w_out, bank.activation  # every lookup counts at one token
    if native.serves_decode(residual_NC, x_NC, weight_NK, w_in, w_out, activation):
        # the kernel bumps the residual's version itself (a custom op's in-place write does not count)
        split = native.worth_splitting(expert_idx_NK.numel() * bank.params_per_expert)
        return torch.ops.moegpt_native.add_experts_(residual_NC, x_NC, expert_idx_NK, weight_NK, w_in, w_out,
                                                    native.ACTIVATION_CODES[activation], split)
    expert = _decode_expert_weights(bank)
    single = x_NC.shape[0] == 1
    for n, (experts, gates) in enumerate(zip(expert_idx_NK.tolist(), weight_NK.tolist(), strict=True)):
        x_1C, y_1C = (x_NC, residual_NC) if single else (x_NC[n:n + 1], residual_NC[n:n + 1])
        for e, gate in zip(experts, gates, strict=True):
            if e >= 0:
                w_in, w_out, gate_up = expert(e)
                mlp_add_to_(y_1C, x_1C, w_in, w_out, bank.activation, gate_up, alpha=gate)
    return residual_NC


def _few_assignment_path(backend: str, idx_NK: Tensor) -> bool:
    return backend in ("sorted", "bucketed") and not torch.is_grad_enabled() and idx_NK.numel() <= DECODE_ROWS


def _loop(x_NC: Tensor, idx_NK: Tensor, weight_NK: Tensor, bank: ExpertBank) -> Tensor:
    y_NC = None
    for e in range(bank.n_expert):
        tok, choice = torch.where(idx_NK == e)
        w_out = None if bank.w_out is None else bank.w_out[e]
        out = mlp_apply(x_NC[tok], bank.w_in[e], w_out, bank.activation)
        out = out * weight_NK[tok, choice, None].to(out.dtype)
        y_NC = out.new_zeros(x_NC.shape[0], out.shape[-1]) if y_NC is None else y_NC
        y_NC = y_NC.index_add(0, tok, out)
    return y_NC


def _decode_expert_weights(bank: ExpertBank):
    """e -> (w_in, w_out, (gate, up) or None) of expert e, from the bank's cached inference views (indexing the
    [E, ...] parameters per generated token would cost an op each)."""
    w_in_E, w_out_E = bank.expert_views()
    gate_up_E = bank.gate_up_views() if bank.activation == "swiglu" else None
    return lambda e: (w_in_E[e], None if w_out_E is None else w_out_E[e], None if gate_up_E is None else gate_up_E[e])


def _few_assignments(x_NC: Tensor, idx_NK: Tensor, weight_NK: Tensor, bank: ExpertBank) -> Tensor:
    # Experts and gates as Python numbers (one host copy each; inference only, so no graph is lost):
    # a gate then costs nothing, where a per-choice tensor gate costs an index, a cast and a multiply.
    # A row's output is sum_j gate_j * (a_j @ w_out[e_j]): the first product and its gate from one mm, every
    # later one accumulated by addmm (alpha scales the new product, beta what is there).
    expert = _decode_expert_weights(bank)
    single = x_NC.shape[0] == 1
    rows = []
    for n, (experts, gates) in enumerate(zip(idx_NK.tolist(), weight_NK.tolist(), strict=True)):
        x_1C = x_NC if single else x_NC[n:n + 1]
        y_1C, y_scale = None, 1.0  # y_scale: the gate y_1C still has to be multiplied by
        for e, gate in zip(experts, gates, strict=True):
            if e < 0:
                continue
            w_in, w_out, gate_up = expert(e)
            a_1X, w_XC = mlp_last_product(x_1C, w_in, w_out, bank.activation, gate_up)
            if y_1C is None:
                y_1C, y_scale = torch.mm(a_1X, w_XC), gate
            else:
                y_1C, y_scale = torch.addmm(y_1C, a_1X, w_XC, beta=y_scale, alpha=gate), 1.0
        if y_1C is None:
            y_1C = x_1C.new_zeros(1, bank.n_embd)
        elif y_scale != 1.0:
            y_1C = y_1C.mul_(y_scale)
        rows.append(y_1C)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _padded_matmuls(xs_MC: Tensor, counts: list[int], bank: ExpertBank, sorted_e_M: Tensor) -> Tensor:
    capacity = max(counts) if counts else 0
    counts_E = torch.tensor(counts, device=xs_MC.device)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    pos_M = torch.arange(xs_MC.shape[0], device=xs_MC.device) - starts_E[sorted_e_M]
    buf_EMC = xs_MC.new_zeros(bank.n_expert, capacity, xs_MC.shape[-1])
    buf_EMC = buf_EMC.index_put((sorted_e_M, pos_M), xs_MC)
    out_EMC = bank.forward_batched(buf_EMC)
    return out_EMC[sorted_e_M, pos_M]


def _grouped_matmuls(xs_MC: Tensor, counts: list[int], bank: ExpertBank) -> Tensor:
    grouped_mm = getattr(torch, "_grouped_mm", None)
    if grouped_mm is None:
        raise MoegptError(f"dispatch 'grouped' needs torch._grouped_mm, which torch {torch.__version__} lacks; "
                          "use --dispatch sorted")
    widths = [bank.n_embd, bank.w_in.shape[-1]] + ([] if bank.w_out is None else [bank.hidden])
    if any(w % 8 for w in widths):
        raise MoegptError(f"dispatch 'grouped' needs model and expert widths that are multiples of 8 (got {widths})")
    offs = torch.cumsum(torch.tensor(counts, device=xs_MC.device), 0).to(torch.int32)
    dtype = torch.get_autocast_dtype(xs_MC.device.type) if torch.is_autocast_enabled(xs_MC.device.type) \
        else xs_MC.dtype
    # autocast does not cast grouped_mm's inputs (torch 2.13), so cast by hand.
    h = activate(grouped_mm(xs_MC.to(dtype), bank.w_in.to(dtype), offs=offs), bank.activation)
    return h if bank.w_out is None else grouped_mm(h.contiguous(), bank.w_out.to(dtype), offs=offs)


def sort_by_expert(idx_NK: Tensor, n_expert: int) -> tuple[Tensor, Tensor, list[int]]:
    """The kept choices (not -1) sorted by expert, stably: (order_M, their flat indices n * K + j; tok_M, their
    tokens; counts_E, a list: one host sync). On CPU one native op (a counting sort) when the kernels are built."""
    if native.sorts_assignments(idx_NK):
        order, tok_M, counts_E = torch.ops.moegpt_native.sort_assignments(idx_NK.contiguous(), n_expert)
        return order, tok_M, counts_E.tolist()
    flat_e = idx_NK.reshape(-1)
    order = torch.argsort(flat_e, stable=True)
    # slot 0 counts the empty (-1) choices, which sort first
    counts_all = torch.bincount(flat_e + 1, minlength=n_expert + 1).tolist()
    order = order[counts_all[0]:]
    return order, torch.div(order, idx_NK.shape[1], rounding_mode="floor"), counts_all[1:]


_SORTED_BACKENDS = {"sorted": "fused", "bucketed": "fused", "padded": "padded", "grouped": "grouped"}


def _sorted_dispatch(x_NC: Tensor, idx_NK: Tensor, weight_NK: Tensor, bank: ExpertBank, backend: str) -> Tensor:
    mode = _SORTED_BACKENDS[backend]
    N = idx_NK.shape[0]
    order, tok_M, counts = sort_by_expert(idx_NK, bank.n_expert)
    if mode == "fused":
        return sorted_experts(x_NC, tok_M, weight_NK.reshape(-1)[order], counts, bank.w_in,
                              bank.w_out, bank.activation, bucket=BUCKET_ROWS if backend == "bucketed" else 1)
    xs_MC = x_NC.index_select(0, tok_M)
    if mode == "padded":
        ys_MC = _padded_matmuls(xs_MC, counts, bank, idx_NK.reshape(-1)[order])
    else:
        ys_MC = _grouped_matmuls(xs_MC, counts, bank)
    ys_MC = ys_MC * weight_NK.reshape(-1)[order, None].to(ys_MC.dtype)
    return ys_MC.new_zeros(N, ys_MC.shape[-1]).index_add(0, tok_M, ys_MC)
