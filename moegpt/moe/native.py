"""The native CPU kernels of the experts (csrc/), built on first use.

csrc/sorted_experts.cpp runs a whole layer's expert blocks in one parallel region per direction (the sorted
dispatch, training and full forwards): every intra-op thread takes a contiguous share of the expert-sorted
assignments and runs its experts with single-threaded kernels, and no Python runs between the ops; a block's
token rows are gathered, gate-scaled and added back by plain loops (csrc/segment_rows.h), and the activations
(SwiGLU both ways, GELU's backward) run as one vectorised pass per block with the gate folded in
(csrc/fused_activation.cpp). For generation's decode steps, csrc/decode_experts.cpp adds a token's chosen
experts onto its residual in one call, csrc/decode_attention.cpp runs its attention sublayer (gpt2 trunk) in
one call, and csrc/decode_matmul.cpp multiplies its few rows by a large matrix (the output head); the experts
and the head may split their products with a helper thread of their own (csrc/helper_thread.cpp; see
DECODE_SPLIT_VALUES). A layer's softmax top-k routing and its two router losses run as one op each way
(csrc/softmax_topk_routing.cpp, `NativeSoftmaxTopK`), and the sorted dispatch sorts the choices by expert
with a counting sort (csrc/sort_assignments.cpp). They are compiled on first use into one library
(native_build.py).

Nothing depends on them: without a compiler, with a failed build, or with MOEGPT_NATIVE=0 in the
environment, the dispatch and the router run their Python paths (same results to float rounding; see
softmax_routing.py for the one way the routing's choices may differ), and `reason()` says why.

Registered ops: torch.ops.moegpt_native.sorted_experts_forward / sorted_experts_backward / add_experts_ /
decode_attention_ / rows_matmul / softmax_topk_routing / softmax_topk_routing_backward / sort_assignments (and
region_threads, halves_on_two_threads, for tests).
"""
from __future__ import annotations

import os
import sys

import torch

import moegpt.moe.native_build as native_build
from moegpt.runtime import caller_threads, on_one_thread

DISABLE_ENV = "MOEGPT_NATIVE"
OFF_VALUES = ("0", "false", "off", "no")
# Activation codes the kernels take (csrc/activation.h).
ACTIVATION_CODES = {"linear": 0, "gelu": 1, "relu": 2, "swiglu": 3}

# Fewer assignments than this run on the Python path: they make one share, on one thread, where each
# expert's small products pay the matmul library's own thread hand-off, while the Python path's expert
# ranges batch all experts into one product (README, dispatch backends).
MIN_ASSIGNMENTS = 128
_FLOAT32 = torch.float32
# The decode kernels split a product of one generated token with their helper thread (csrc/helper_thread.cpp)
# when the code around the decode step, which runs on one thread (`runtime.one_thread`), has more than one:
# at one row a product is bound by how fast a core streams its weights, and two cores stream them faster.
# Below this many weight values the hand-off costs about what it saves (README, "Threads").
DECODE_SPLIT_VALUES = 1 << 15
HINT = "a C++ compiler with OpenMP builds it; MOEGPT_NATIVE=0 skips it"

_state: dict[str, object] = {}


def reason() -> str | None:
    """None when the native kernels are loaded; otherwise why not (loads, or builds, them on the first call)."""
    if "reason" not in _state:
        if (setting := os.environ.get(DISABLE_ENV, "1")).strip().lower() in OFF_VALUES:
            _state["reason"] = f"{DISABLE_ENV}={setting}"
        else:
            _state["reason"] = why = native_build.load_library() or _thread_pool_problem()
            if why is not None:
                print(f"moegpt: the native kernels are unavailable ({why}); routing, experts and decode steps run on "
                      f"their Python paths ({HINT})", file=sys.stderr, flush=True)
    return _state["reason"]  # type: ignore[return-value]


def _thread_pool_problem() -> str | None:
    """The kernels' OpenMP must be torch's own, the one pool torch.set_num_threads governs (a torch built
    with another OpenMP runtime would give the library a second pool)."""
    if on_one_thread(torch.ops.moegpt_native.region_threads, 2) != 1:
        return "its OpenMP runtime is not torch's (torch.set_num_threads does not govern it)"
    return None


def available() -> bool:
    return reason() is None


def prepare(device: torch.device | str) -> None:
    """Build (or load) the kernels now when they would serve this device: before a run's clock starts, not
    inside its first step."""
    status(device)


def status(device: torch.device | str | None) -> str | None:
    """For banners and bench headers: "on", or "off: why", on CPU (or an unknown device); None elsewhere
    (the kernels are CPU-only)."""
    if device is not None and torch.device(device).type != "cpu":
        return None
    why = reason()
    return "on" if why is None else f"off: {why}"


class NativeSortedExperts(torch.autograd.Function):
    """SortedExperts' contract (y_NC = sum over assignments m of gate_M[m] * expert_{e(m)}(x_NC[tok_M[m]]),
    tok_M sorted by expert) through the native kernel: fp32 on CPU, one parallel region per direction."""

    @staticmethod
    def forward(ctx, x_NC, gate_M, w_in, w_out, tok_M, counts_E, activation):
        code = ACTIVATION_CODES[activation]
        y_NC, h_MHin, a_MH = torch.ops.moegpt_native.sorted_experts_forward(
            x_NC, tok_M, gate_M, counts_E, w_in, w_out, code)
        ctx.save_for_backward(x_NC, gate_M, w_in, w_out, tok_M, h_MHin, a_MH)
        ctx.counts_E, ctx.code = counts_E, code
        return y_NC

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y_NC):
        x_NC, gate_M, w_in, w_out, tok_M, h_MHin, a_MH = ctx.saved_tensors
        grad_x, grad_gate, grad_w_in, grad_w_out = torch.ops.moegpt_native.sorted_experts_backward(
            grad_y_NC.contiguous(), x_NC, tok_M, gate_M, ctx.counts_E, w_in, w_out, h_MHin, a_MH, ctx.code)
        return grad_x, grad_gate, grad_w_in, None if w_out is None else grad_w_out, None, None, None


class NativeSoftmaxTopK(torch.autograd.Function):
    """Softmax top-k routing with the Switch balance loss and the router z-loss (csrc/softmax_topk_routing.cpp),
    one op each way: (idx_NK, gate_NK, probs_NE, balance, z) from fp32 CPU logits; probs and idx carry no
    gradient. token_weights_N: 1.0 for real tokens, 0.0 for ignored ones, or None when all are real."""

    @staticmethod
    def forward(ctx, logits_NE, k, normalize, token_weights_N):
        idx_NK, gate_NK, probs_NE, lse_N, fraction_E, balance, z = torch.ops.moegpt_native.softmax_topk_routing(
            logits_NE, k, normalize, token_weights_N)
        ctx.save_for_backward(probs_NE, lse_N, idx_NK, gate_NK, fraction_E, token_weights_N)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(idx_NK, probs_NE)
        return idx_NK, gate_NK, probs_NE, balance, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, _grad_idx, grad_gate_NK, _grad_probs, grad_balance, grad_z):
        probs_NE, lse_N, idx_NK, gate_NK, fraction_E, token_weights_N = ctx.saved_tensors
        grad_logits_NE = torch.ops.moegpt_native.softmax_topk_routing_backward(
            grad_gate_NK.contiguous(), grad_balance, grad_z, probs_NE, lse_N, idx_NK, gate_NK, fraction_E,
            token_weights_N, ctx.normalize)
        return grad_logits_NE, None, None, None


def serves_routing(logits_NE: torch.Tensor) -> bool:
    """Whether the routing kernel takes a layer's softmax top-k routing: fp32 CPU logits, eager mode, a built
    library (the caller checks that its losses are local: no expert parallelism, no global batch)."""
    return _takes("linear", logits_NE)


def serves(x_NC: torch.Tensor, gate_M: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor | None,
           compute_dtype: torch.dtype, bucket: int, activation: str) -> bool:
    """Whether the sorted kernel takes this call: fp32 on CPU, at least MIN_ASSIGNMENTS assignments, no
    bucketing, not under torch.compile."""
    if gate_M.shape[0] < MIN_ASSIGNMENTS or bucket != 1 or compute_dtype != torch.float32:
        return False
    return _takes(activation, x_NC, gate_M, w_in, w_out)


def serves_decode(residual_NC: torch.Tensor, x_NC: torch.Tensor, gate_NK: torch.Tensor, w_in: torch.Tensor,
                  w_out: torch.Tensor | None, activation: str) -> bool:
    """Whether the decode kernel takes this call: fp32 on CPU, contiguous expert banks, rows of contiguous
    values, not under torch.compile."""
    if not (w_in.is_contiguous() and (w_out is None or w_out.is_contiguous())):
        return False
    if residual_NC.stride(-1) != 1 or x_NC.stride(-1) != 1:
        return False
    return _takes(activation, residual_NC, x_NC, gate_NK, w_in, w_out)


def serves_decode_attention(x_BC: torch.Tensor, h_BC: torch.Tensor, w_qkv: torch.Tensor,
                            w_proj: torch.Tensor) -> bool:
    """Whether the decode attention kernel takes a decode step's attention sublayer (the caller checks the
    trunk: no rotary positions): fp32 on CPU, eager mode, a built library."""
    if x_BC.stride(-1) != 1 or h_BC.stride(-1) != 1:
        return False
    return _takes("linear", x_BC, h_BC, w_qkv, w_proj)


def sorts_assignments(idx_NK: torch.Tensor) -> bool:
    """Whether the dispatch's sort of a layer's choices by expert is the native counting sort: CPU, eager mode,
    a built library, int64 choices."""
    if torch.compiler.is_compiling() or not idx_NK.is_cpu or idx_NK.dtype != torch.int64:
        return False
    return available()


def worth_splitting(weight_values: int) -> bool:
    """Whether a decode kernel should split a product over this many weight values with its helper thread:
    at least DECODE_SPLIT_VALUES of them, and more than one thread around the decode step."""
    return weight_values >= DECODE_SPLIT_VALUES and caller_threads() > 1


def splits_rows_matmul(x_NI: torch.Tensor, w_IO: torch.Tensor) -> bool:
    """Whether a few rows' x @ w (inference, w contiguous [in, out]) goes to the native kernel, split with the
    helper thread (`worth_splitting`)."""
    if w_IO.numel() < DECODE_SPLIT_VALUES or x_NI.stride(-1) != 1 or not w_IO.is_contiguous():
        return False
    # _takes first: it checks for torch.compile, under which asking for the thread count breaks the graph
    return _takes("linear", x_NI, w_IO) and worth_splitting(w_IO.numel())


def _takes(activation: str, *tensors: torch.Tensor | None) -> bool:
    """The kernels' common ground: fp32 CPU tensors, a known activation, eager mode, a built library."""
    if torch.compiler.is_compiling() or activation not in ACTIVATION_CODES:
        return False
    for t in tensors:  # a loop, not any(genexpr), and is_cpu, not device.type: this runs per layer and token
        if t is not None and (t.dtype is not _FLOAT32 or not t.is_cpu):
            return False
    return available()
