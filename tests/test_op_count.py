"""moegpt.op_count: counting aten ops, and the op budget of a KV-cached decode step (the per-token overhead
of generation on a CPU, where a one-token step's ops cost their dispatch rather than their FLOPs)."""

from __future__ import annotations

import pytest
import torch

from moegpt.errors import MoegptError
from moegpt.model import GPT
from moegpt.op_count import count_ops, decode_ops_per_token
from moegpt.presets import resolve_config

# Ops per generated token of the cpu preset's model (4 layers, topk 8x2, SwiGLU): a ceiling that a change
# adding ops to the decode step trips (the count is deterministic; README "Decode ops per token").
CPU_PRESET_DECODE_OPS = 160


def test_count_ops_counts_each_dispatched_aten_op():
    a = torch.ones(3)
    counts = count_ops(lambda: (a + 1) * 2)
    assert counts == {"aten.add.Tensor": 1, "aten.mul.Tensor": 1}


def test_decode_step_of_the_cpu_preset_stays_within_its_op_budget():
    cfg = resolve_config("cpu")
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    ops = decode_ops_per_token(model, list(range(16)), new_tokens=4)
    assert sum(ops.values()) <= CPU_PRESET_DECODE_OPS, ops
    n_layer = cfg.model.n_layer
    # per layer: one attention, one router top-k; the lm head once per token
    assert ops["aten.scaled_dot_product_attention.default"] == n_layer
    assert ops["aten.topk.default"] == n_layer and ops["aten.argmax.default"] == 1
    # the inference fast path: no loss tensors made per token (generation reads none)
    assert "aten.new_zeros.default" not in ops and "aten.zeros.default" not in ops


def test_decode_op_count_refuses_a_window_that_would_slide():
    cfg = resolve_config("tiny")
    model = GPT(cfg.model, cfg.moe)
    with pytest.raises(MoegptError, match="block_size"):
        decode_ops_per_token(model, list(range(30)), new_tokens=4)
