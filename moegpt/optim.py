"""The optimizer and the learning-rate schedule of a run."""

from __future__ import annotations

import math

import torch

from moegpt.config import RunConfig, TrainConfig


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at lr_decay_iters (default max_iters)."""
    t = cfg.train
    decay_iters = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.lr * (step + 1) / t.warmup_iters
    if step >= decay_iters:
        return t.lr * t.min_lr_ratio
    progress = (step - t.warmup_iters) / max(1, decay_iters - t.warmup_iters)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def build_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices (and expert banks) only; gains and biases don't decay.

    fused=True on CPU and CUDA: one kernel per parameter instead of a dozen elementwise passes (README,
    "Dispatch backends", has the measured gain); MoE gains most because it holds several times the
    parameters of its dense twin.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)
