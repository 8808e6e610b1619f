"""The optimizer and the learning-rate schedule (moegpt/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from moegpt.config import RunConfig, TrainConfig
from moegpt.optim import build_optimizer, lr_at


def cfg(**train) -> RunConfig:
    return RunConfig(train=TrainConfig(**{"lr": 1e-3, "warmup_iters": 10, "max_iters": 110, "min_lr_ratio": 0.1,
                                          **train}))


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    c = cfg()
    assert lr_at(0, c) == pytest.approx(1e-4) and lr_at(9, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(110, c) == pytest.approx(1e-4) and lr_at(500, c) == pytest.approx(1e-4)
    assert all(lr_at(s, c) >= lr_at(s + 1, c) for s in range(10, 120))


def test_lr_decay_iters_sets_the_horizon():
    c = cfg(lr_decay_iters=60)
    assert lr_at(60, c) == pytest.approx(1e-4) and lr_at(35, c) > lr_at(59, c)


def test_weight_decay_only_on_matrices():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
