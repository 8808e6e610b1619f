"""moegpt.op_count: counting aten ops, and the op budget of a KV-cached decode step (the per-token overhead
of generation on a CPU, where a one-token step's ops cost their dispatch rather than their FLOPs)."""

from __future__ import annotations

import pytest
import torch

from moegpt.errors import MoegptError
from moegpt.generate import generate
from moegpt.model import GPT
from moegpt.moe import native
from moegpt.op_count import count_ops, decode_ops_per_token
from moegpt.presets import resolve_config

# Ops per generated token of the cpu preset's model (4 layers, aux-free 8x2, SwiGLU) in steady cached
# generation, the refilling pass amortised: a ceiling that a change adding ops to the decode step trips (the
# count is deterministic; README "Decode ops per token"). With the native kernels a layer's attention and its
# chosen experts are one op each; on the Python path (no compiler, MOEGPT_NATIVE=0) the attention is about
# five and each chosen expert five. (aux-free counts 60.0 / 141.6; topk routing: 40.1 / 121.8.)
CPU_PRESET_DECODE_OPS = 62
CPU_PRESET_DECODE_OPS_PYTHON = 144


def test_count_ops_counts_each_dispatched_aten_op():
    a = torch.ones(3)
    counts = count_ops(lambda: (a + 1) * 2)
    assert counts == {"aten.add.Tensor": 1, "aten.mul.Tensor": 1}


@pytest.mark.parametrize("kernel", ["native", "python"])
def test_decode_step_of_the_cpu_preset_stays_within_its_op_budget(monkeypatch, kernel):
    if kernel == "python":
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available():
        pytest.skip(f"the native kernel is not built: {native.reason()}")
    cfg = resolve_config("cpu")
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe)
    ops = decode_ops_per_token(model, list(range(16)))
    assert sum(ops.values()) <= (CPU_PRESET_DECODE_OPS if kernel == "native" else CPU_PRESET_DECODE_OPS_PYTHON), ops
    n_layer = cfg.model.n_layer
    # per layer one attention (the native sublayer, or SDPA) and one router top-k, the lm head's argmax once per
    # token (the refilling pass adds its own once per cycle: a fraction per token)
    attention = "moegpt_native.decode_attention_.default" if kernel == "native" else \
        "aten.scaled_dot_product_attention.default"
    assert round(ops[attention]) == n_layer
    assert round(ops["aten.topk.default"]) == n_layer and round(ops["aten.argmax.out"]) == 1
    # the inference fast path: no loss tensors made per decode step (generation reads none; what the refilling
    # pass allocates once per cycle is a fraction per token)
    assert ops.get("aten.new_zeros.default", 0) < 1 and ops.get("aten.zeros.default", 0) < 1


def test_the_count_charges_the_refilling_pass_to_the_tokens_it_serves():
    cfg = resolve_config("tiny")  # block_size 32
    torch.manual_seed(0)
    model = GPT(cfg.model, cfg.moe).eval()
    prompt = list(range(8))

    def generation_ops(new_tokens: int) -> int:
        return sum(count_ops(lambda: generate(model, prompt, new_tokens, temperature=0, use_cache=True)).values())

    generation_ops(3)  # per-model caches, uncounted
    one_step = generation_ops(3) - generation_ops(2)  # the third token: a plain decode step
    steady = sum(decode_ops_per_token(model, prompt).values())
    every_token_a_full_pass = sum(decode_ops_per_token(model, prompt, context_keep=32).values())
    assert one_step < steady < every_token_a_full_pass


def test_decode_op_count_refuses_a_bad_context_keep():
    cfg = resolve_config("tiny")
    model = GPT(cfg.model, cfg.moe)
    with pytest.raises(MoegptError, match="context_keep"):
        decode_ops_per_token(model, list(range(8)), context_keep=33)
