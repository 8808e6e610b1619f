"""SoftmaxTopKMoE: the base of the variants that route by softmax top-k with the Switch balance loss and the
router z-loss (topk, switch, shared). Their routing has a native path: on CPU in fp32 the softmax, the choices,
the gates and both losses run as one op each way (native.NativeSoftmaxTopK), in place of some fifty small
ops forward and backward, a large part of a MoE layer's fixed cost per step. Where the kernel does not serve
(no library, CUDA, torch.compile, generation, losses over several ranks, fewer than SMALL_BATCH tokens) the
Python path of RoutedMoE runs. Both give the same losses and gates to float rounding, and the same choices
except where two experts' probabilities round to the same float32 value (the kernel ranks the logits; the
Python path ranks the probabilities, and its tie may go either way).

Legend: B batch, T time, C width, N = B*T tokens, E experts, K choices per token.
"""

from __future__ import annotations

from torch import Tensor

import moegpt.moe.native as native
from moegpt.moe.global_batch import is_global
from moegpt.moe.router import SMALL_BATCH, RoutedMoE, softmax_topk
from moegpt.moe.stats import is_generating


class SoftmaxTopKMoE(RoutedMoE):
    """select: the top-k of the softmax over experts, renormalised over the k kept when `renormalizes`."""

    @property
    def renormalizes(self) -> bool:
        return self.normalize_topk

    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        return softmax_topk(logits_NE, self.top_k, self.renormalizes, self.softmax)

    def choose_with_losses(self, logits_NE: Tensor, x_NC: Tensor, mask_BT: Tensor | None, B: int,
                           T: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        if not self._routes_natively(logits_NE):
            return super().choose_with_losses(logits_NE, x_NC, mask_BT, B, T)
        token_weights_N = None if mask_BT is None else mask_BT.reshape(-1).float()
        idx_NK, weight_NK, probs_NE, balance, z = native.NativeSoftmaxTopK.apply(
            logits_NE, self.top_k, self.renormalizes, token_weights_N)
        # the stats' router probabilities (self.softmax) are the kernel's
        self._forward_memo.update(logits_NE=logits_NE, probs_NE=probs_NE)
        return idx_NK, self.scaled_gates(weight_NK), (balance, z, balance.new_zeros(()))

    def _routes_natively(self, logits_NE: Tensor) -> bool:
        """The kernel computes this process's losses over its own tokens: not for expert parallelism or a
        global batch (losses over every rank's tokens), nor while generating (no losses; a generated token's
        few rows take the plain two-op selection). serves_routing first: it refuses torch.compile, which cannot
        trace the generation flag."""
        if not native.serves_routing(logits_NE) or logits_NE.shape[0] < SMALL_BATCH:
            return False
        return self.expert_parallel is None and not is_global() and not is_generating()
