"""A variant that exists only in the test suite, registered through the public registry API (conftest.py).

It proves that a new routing variant is one file plus one registry line: the contract, causality, report,
params and train/inspect CLI tests are parametrised over the registry and pick it up with no other edit.
Routing: sigmoid affinities, top-k, gates = the selected affinities renormalised (aux-free without its
bias), with the usual balance and z losses, and one declared extra statistic (the mean top-1 gate).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moegpt.moe import ExtraStat, RouterStats, VariantSpec
from moegpt.moe.router import RoutedMoE
from moegpt.moe.spec import top_k_problems

MEAN_TOP_GATE = ExtraStat(key="mean_top_gate", kind="token_mean", label="mean top-1 gate",
                          description="mean over tokens of the largest gate")


class SigmoidTopKMoE(RoutedMoE):
    def select(self, logits_NE: Tensor, x_NC: Tensor) -> tuple[Tensor, Tensor]:
        scores_NE = torch.sigmoid(logits_NE)
        weight_NK, idx_NK = torch.topk(scores_NE, self.top_k, dim=-1)
        return idx_NK, weight_NK / weight_NK.sum(dim=-1, keepdim=True)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RouterStats]:
        y, stats = self.routed_forward(x, mask)
        stats.extras[MEAN_TOP_GATE.key] = stats.expert_weight_NK.max(dim=-1).values.float().mean()
        return y, stats


SPEC = VariantSpec(
    name="test-sigmoid-topk", layer=SigmoidTopKMoE, description="test-only: sigmoid top-k, renormalised",
    reference="the test suite", problems=top_k_problems, extra_stats=(MEAN_TOP_GATE,), expert_parallel=True,
    report_notes=("a variant registered by the test suite",),
)
