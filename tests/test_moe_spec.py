"""VariantSpec and ExtraStat (moegpt/moe/spec.py)."""

from __future__ import annotations

import pytest

from moegpt.config import MoEConfig
from moegpt.moe import ExtraStat, VariantSpec
from moegpt.moe.dense import DenseFFN
from moegpt.moe.spec import top_k_problems


def test_extra_stat_kinds_are_checked():
    with pytest.raises(ValueError, match="token_mean or per_expert"):
        ExtraStat(key="x", kind="sum", label="x", description="x")


def test_width_share_defaults_to_experts_per_token():
    spec = VariantSpec(name="x", layer=DenseFFN, description="d", reference="r")
    moe = MoEConfig(top_k=3)
    assert spec.experts_per_token(moe, 16) == 3.0 and spec.width_share(moe, 16) == 3.0
    wider = VariantSpec(name="y", layer=DenseFFN, description="d", reference="r",
                        expert_width_share=lambda m: m.top_k + 1.0)
    assert wider.width_share(moe, 16) == 4.0


def test_top_k_problems():
    assert top_k_problems(MoEConfig(n_expert=4, top_k=2)) == []
    assert "moe.top_k" in top_k_problems(MoEConfig(n_expert=4, top_k=5))[0]
