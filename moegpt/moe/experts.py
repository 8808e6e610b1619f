"""Expert MLPs: one activation function, a dense FFN, and a bank of E experts as stacked weights.

Legend: M rows, C model width, H hidden width, E experts. SwiGLU keeps gate and up projections
fused in one [C, 2H] matrix (one matmul instead of two).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegpt.config import ACTIVATIONS  # noqa: F401  (re-exported by moegpt.moe)


def in_width(activation: str, n_embd: int, hidden: int) -> int:
    if activation == "linear":
        return n_embd
    return 2 * hidden if activation == "swiglu" else hidden


def activate(h_MH: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        H = h_MH.shape[-1] // 2  # two slices cost less than chunk's split into narrows
        return F.silu(h_MH[..., :H]) * h_MH[..., H:]
    if activation == "gelu":
        return F.gelu(h_MH)
    if activation == "relu":
        return F.relu(h_MH)
    return h_MH


def mlp_apply(x_MC: Tensor, w_in_CH: Tensor, w_out_HC: Tensor | None, activation: str) -> Tensor:
    """One expert (or the dense FFN) on a block of rows; `linear` is a single C->C projection."""
    h = activate(x_MC @ w_in_CH, activation)
    return h if w_out_HC is None else h @ w_out_HC


def mlp_last_product(x_MC: Tensor, w_in_CH: Tensor, w_out_HC: Tensor | None, activation: str,
                     gate_up: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Inference: (a, w) with mlp_apply(x) == a @ w, everything but the last matmul, so that a caller can
    accumulate that product with one addmm. SwiGLU takes its (gate, up) column views of w_in when given: two
    products cost fewer ops than one product and two slices of its result."""
    if w_out_HC is None:  # linear: the expert is its one matmul
        return x_MC, w_in_CH
    if gate_up is not None:
        return F.silu(torch.mm(x_MC, gate_up[0]), inplace=True).mul_(torch.mm(x_MC, gate_up[1])), w_out_HC
    return activate(torch.mm(x_MC, w_in_CH), activation), w_out_HC


def mlp_add_to_(residual_MC: Tensor, x_MC: Tensor, w_in_CH: Tensor, w_out_HC: Tensor | None, activation: str,
                gate_up: tuple[Tensor, Tensor] | None = None, alpha: float = 1.0) -> Tensor:
    """Inference: residual += alpha * mlp_apply(x) in place, the last product accumulated onto the residual
    by one addmm_; returns residual."""
    return residual_MC.addmm_(*mlp_last_product(x_MC, w_in_CH, w_out_HC, activation, gate_up), alpha=alpha)


def storage_cached(owner: nn.Module, name: str, key: object, build: Callable[[], Any]) -> Any:
    """build() made once per `key` (the weights' storage) and kept on owner as a plain attribute (never a
    parameter or state): inference views of weights that indexing per generated token would cost an op each."""
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = owner.__dict__[name] = (key, build())
    return cached[1]


def _gate_up_split(w_in_CH: Tensor) -> tuple[Tensor, Tensor]:
    H = w_in_CH.shape[-1] // 2  # activate's split: silu of the first half times the second
    return w_in_CH[:, :H], w_in_CH[:, H:]


class DenseMLP(nn.Module):
    """A plain FFN with 2-D weights (the dense baseline, and the shared experts of `shared`)."""

    def __init__(self, n_embd: int, hidden: int, activation: str):
        super().__init__()
        self.activation = activation
        self.w_in = nn.Parameter(torch.empty(n_embd, in_width(activation, n_embd, hidden)))
        self.w_out = None if activation == "linear" else nn.Parameter(torch.empty(hidden, n_embd))

    def forward(self, x: Tensor) -> Tensor:
        return mlp_apply(x, self.w_in, self.w_out, self.activation)

    def add_to_(self, residual_MC: Tensor, x_MC: Tensor) -> Tensor:
        """Inference: residual += self(x) in place (mlp_add_to_), SwiGLU's gate and up views made once per weight
        storage."""
        gate_up = None if self.activation != "swiglu" else \
            storage_cached(self, "_gate_up_views", self.w_in.data_ptr(), lambda: _gate_up_split(self.w_in))
        return mlp_add_to_(residual_MC, x_MC, self.w_in, self.w_out, self.activation, gate_up)


class ExpertBank(nn.Module):
    """E expert MLPs stored as stacked weights w_in [E, C, H_in] and w_out [E, H, C]."""

    def __init__(self, n_expert: int, n_embd: int, hidden: int, activation: str):
        super().__init__()
        self.n_expert, self.n_embd, self.hidden, self.activation = n_expert, n_embd, hidden, activation
        self.w_in = nn.Parameter(torch.empty(n_expert, n_embd, in_width(activation, n_embd, hidden)))
        self.w_out = None if activation == "linear" else nn.Parameter(torch.empty(n_expert, hidden, n_embd))

    def expert_views(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...] | None]:
        """Per-expert views (w_in[e], w_out[e]) for inference, made once per weight storage: indexing a
        weight per generated token and choice costs an op each. Only for use without autograd."""
        key = (self.w_in.data_ptr(), None if self.w_out is None else self.w_out.data_ptr())
        return storage_cached(self, "_expert_views", key,
                              lambda: (self.w_in.unbind(0), None if self.w_out is None else self.w_out.unbind(0)))

    def gate_up_views(self) -> tuple[tuple[Tensor, Tensor], ...]:
        """SwiGLU only: per-expert (gate, up) column views of w_in[e], made once per weight storage like
        `expert_views`: two matmuls of one token cost fewer ops than one matmul and two slices of its result."""
        return storage_cached(self, "_gate_up_views", self.w_in.data_ptr(),
                              lambda: tuple(_gate_up_split(w) for w in self.w_in.unbind(0)))

    @functools.cached_property
    def params_per_expert(self) -> int:
        """Values of one expert's weights (fixed by the shapes: decode asks per generated token)."""
        w_in, w_out = self.w_in.shape, self.w_out  # from the shapes: indexing a bank would be an op
        return w_in[1] * w_in[2] + (0 if w_out is None else w_out.shape[1] * w_out.shape[2])

    def forward_batched(self, x_EMC: Tensor) -> Tensor:
        """All experts on equally many rows each: [E, M, C] -> [E, M, C] by batched matmul."""
        h = activate(torch.bmm(x_EMC, self.w_in), self.activation)
        return h if self.w_out is None else torch.bmm(h, self.w_out)
