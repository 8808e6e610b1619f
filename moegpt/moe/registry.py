"""The registry of routing variants: name -> VariantSpec, and what the rest of moegpt asks of a variant.

It imports no variant module (they import it); moegpt/moe/__init__.py registers the built-in ones.
"""

from __future__ import annotations

from moegpt.config import ModelConfig, MoEConfig, RunConfig
from moegpt.errors import MoegptError
from moegpt.moe.dispatch import BACKENDS
from moegpt.moe.experts import ACTIVATIONS
from moegpt.moe.spec import VariantSpec

VARIANTS: dict[str, VariantSpec] = {}


def register(spec: VariantSpec) -> VariantSpec:
    if spec.name in VARIANTS and VARIANTS[spec.name] is not spec:
        raise MoegptError(f"variant {spec.name!r} is already registered")
    VARIANTS[spec.name] = spec
    return spec


def variant_spec(name: str) -> VariantSpec:
    if name not in VARIANTS:
        raise MoegptError(f"unknown MoE variant {name!r}; valid: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def is_causal_variant(name: str) -> bool:
    return variant_spec(name).causal


def experts_per_token(moe: MoEConfig, block_size: int) -> float:
    """Routed experts one token runs through in a MoE layer of this config, on average (1 for dense)."""
    return float(variant_spec(moe.variant).experts_per_token(moe, block_size))


def capacity_factor(moe: MoEConfig) -> float:
    """The capacity factor in force: moe.capacity_factor, or the variant's default when it is < 0. 0 = dropless."""
    spec = variant_spec(moe.variant)
    if not spec.uses_capacity:
        return 0.0
    return spec.default_capacity_factor if moe.capacity_factor < 0 else moe.capacity_factor


def expert_hidden(model: ModelConfig, moe: MoEConfig) -> int:
    """Hidden width of one routed expert: moe.expert_hidden, or the dense FFN's width split for equal active params."""
    if moe.expert_hidden:
        return moe.expert_hidden
    return max(1, int(round(model.resolved_ffn_hidden / variant_spec(moe.variant).width_share(moe, model.block_size))))


def layer_facts(model: ModelConfig, moe: MoEConfig) -> dict[str, float | int | str | bool]:
    """What banners, reports, JSON and `params` print about the MoE layers of a config, from one place."""
    spec = variant_spec(moe.variant)
    return {"variant": moe.variant, "n_expert": moe.n_expert if spec.routed else 1,
            "experts_per_token": round(experts_per_token(moe, model.block_size), 4),
            "capacity_factor": capacity_factor(moe), "expert_hidden": expert_hidden(model, moe) if spec.routed else
            model.resolved_ffn_hidden, "causal": spec.causal}


def moe_layer_indices(moe: MoEConfig, n_layer: int) -> list[int]:
    """Layer i is MoE iff the variant is routed, i >= first_dense and (i - first_dense) % moe_every == 0."""
    if not variant_spec(moe.variant).routed:
        return []
    return [i for i in range(moe.first_dense, n_layer) if (i - moe.first_dense) % moe.moe_every == 0]


def variant_problems(moe: MoEConfig) -> list[str]:
    if moe.variant not in VARIANTS:
        return [f"unknown MoE variant {moe.variant!r}; valid: {', '.join(VARIANTS)}"]
    out = []
    if moe.activation not in ACTIVATIONS:
        out.append(f"unknown activation {moe.activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if moe.dispatch not in BACKENDS:
        out.append(f"unknown dispatch backend {moe.dispatch!r}; valid: {', '.join(BACKENDS)}")
    if moe.shared_gate and not VARIANTS[moe.variant].has_shared_experts:
        with_shared = [name for name, spec in VARIANTS.items() if spec.has_shared_experts]
        out.append(f"moe.shared_gate needs a variant with shared experts ({', '.join(with_shared)}; "
                   f"got {moe.variant!r})")
    if moe.n_expert >= 1:
        out += VARIANTS[moe.variant].problems(moe)
    return out


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """The generic checks of every section plus the chosen variant's own; raises MoegptError listing them all."""
    problems = cfg.model.problems() + cfg.moe.problems() + variant_problems(cfg.moe) + cfg.train.problems()
    if problems:
        raise MoegptError("; ".join(problems))
    return cfg
