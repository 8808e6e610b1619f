"""VariantSpec: everything that is specific to one routing variant, declared beside its class.

A variant is one file holding its layer class and a `SPEC = VariantSpec(...)`, plus one line in the
registry (moegpt/moe/__init__.py). Everything outside moegpt/moe/ asks the spec (through the registry's
functions) instead of testing a variant's name: experts per token, expert width, capacity default,
causality, validation of the variant's own knobs, report notes and extra statistics.

Hooks that act on a layer's state (aux-free's bias update after an optimizer step, noisy-topk's
parameter init) are methods of the layer, declared on `FFNLayer` with no-op defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from moegpt.config import MoEConfig


@dataclass(frozen=True)
class ExtraStat:
    """A variant's own per-layer statistic, carried in `RouterStats.extras[key]`.

    kind "token_mean": a scalar per forward, reported as its token-weighted mean over the batches seen.
    kind "per_expert": an [E] vector (a state of the layer), reported as its latest value.
    `label` names it in the terminal report; `description` documents the JSON field.
    """

    key: str
    kind: str
    label: str
    description: str

    def __post_init__(self) -> None:
        if self.kind not in ("token_mean", "per_expert"):
            raise ValueError(f"ExtraStat kind must be token_mean or per_expert (got {self.kind!r})")


def _top_k(moe: MoEConfig, block_size: int) -> float:
    return float(moe.top_k)


def _no_problems(moe: MoEConfig) -> list[str]:
    return []


@dataclass(frozen=True)
class VariantSpec:
    """What the rest of moegpt knows about a routing variant.

    experts_per_token(moe, block_size): routed experts a token runs through on average, the one answer that
        banners, reports, JSON fields and `params` print (block_size: for layers whose work is per sequence).
    expert_width_share(moe): how many expert-widths the dense FFN's hidden size is split into when
        moe.expert_hidden = 0 (equal active parameters); defaults to experts_per_token.
    default_capacity_factor: used when moe.capacity_factor < 0 ("the variant's default"); 0 = dropless.
    uses_capacity: whether moe.capacity_factor means anything to this variant.
    routed: False for the dense baseline (its layers are not MoE layers).
    has_shared_experts: the variant has always-on shared experts, so moe.shared_gate means something.
    expert_parallel: each token picks a few experts (a RoutedMoE), so experts can live on other processes and
        tokens travel to them by all-to-all (moe/expert_parallel.py).
    problems: the variant's own validation of its knobs (messages name config keys, not CLI flags).
    """

    name: str
    layer: type[nn.Module]
    description: str
    reference: str
    causal: bool = True
    routed: bool = True
    experts_per_token: Callable[[MoEConfig, int], float] = _top_k
    expert_width_share: Callable[[MoEConfig], float] | None = None
    default_capacity_factor: float = 0.0
    uses_capacity: bool = True
    has_shared_experts: bool = False  # always-on shared experts (moe.n_shared, moe.shared_gate apply)
    expert_parallel: bool = False  # experts may be sharded over processes (train --expert-parallel)
    problems: Callable[[MoEConfig], list[str]] = _no_problems
    report_notes: tuple[str, ...] = ()
    extra_stats: tuple[ExtraStat, ...] = field(default_factory=tuple)

    def width_share(self, moe: MoEConfig, block_size: int) -> float:
        if self.expert_width_share is not None:
            return self.expert_width_share(moe)
        return self.experts_per_token(moe, block_size)


def top_k_problems(moe: MoEConfig) -> list[str]:
    """The check every variant that selects top_k experts per token shares."""
    if moe.n_expert >= 1 and not 1 <= moe.top_k <= moe.n_expert:
        return [f"moe.top_k must be in [1, n_expert={moe.n_expert}] (got {moe.top_k})"]
    return []
