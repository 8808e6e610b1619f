"""The native decode attention kernel (moegpt/moe/csrc/decode_attention.cpp): a generated token's whole
attention sublayer on the gpt2 trunk against the Python path of CausalSelfAttention.decode (itself tested
against the cached forward in test_model.py)."""

from __future__ import annotations

import os

import pytest
import torch
from test_moe_dispatch import native_kernel_off

from moegpt.config import ModelConfig
from moegpt.kv_cache import KVCache
from moegpt.model import CausalSelfAttention
from moegpt.moe import native
from moegpt.op_count import count_ops

if os.environ.get(native.DISABLE_ENV, "1").strip().lower() in native.OFF_VALUES:
    pytest.skip(f"{native.DISABLE_ENV} turns the native kernels off", allow_module_level=True)

C, BLOCK = 24, 12


def attention(bias: bool, n_head: int) -> CausalSelfAttention:
    torch.manual_seed(n_head + 10 * bias)
    attn = CausalSelfAttention(ModelConfig(n_embd=C, n_head=n_head, block_size=BLOCK, bias=bias)).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)
    attn.c_attn._in_out(), attn.c_proj._in_out()  # the [in, out] weight copies, made once per weight
    return attn


def filled_cache(rows: int, length: int, seed: int) -> KVCache:
    cache = KVCache()
    cache.start(1)
    gen = torch.Generator().manual_seed(seed)
    cache.kv[0] = torch.randn(rows, BLOCK, 2 * C, generator=gen)
    cache.lengths[0] = length
    return cache


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n_head", [1, 4])
@pytest.mark.parametrize("rows,past", [(1, 0), (3, 5), (2, BLOCK - 1)])
def test_native_decode_attention_is_the_python_sublayer(bias, n_head, rows, past):
    """One op; the same residual update and the same cache row as the Python path, other rows untouched; from
    an empty cache (the token attends to itself), mid-way, and into the last row."""
    attn = attention(bias, n_head)
    gen = torch.Generator().manual_seed(rows * 100 + past)
    h, x = torch.randn(rows, C, generator=gen), torch.randn(rows, C + 4, generator=gen)[:, :C]
    with torch.inference_mode():
        mine, theirs = filled_cache(rows, past, 1), filled_cache(rows, past, 1)
        x_mine, x_theirs = x.clone(), x.clone()
        ops = count_ops(lambda: attn.decode(h, x_mine, mine, 0))
        with native_kernel_off():
            attn.decode(h, x_theirs, theirs, 0)
    assert ops == {"moegpt_native.decode_attention_.default": 1}
    assert mine.lengths == theirs.lengths == [past + 1]
    torch.testing.assert_close(x_mine, x_theirs, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(mine.kv[0][:, past], theirs.kv[0][:, past], atol=2e-5, rtol=2e-5)
    assert torch.equal(mine.kv[0][:, :past], theirs.kv[0][:, :past])
    assert torch.equal(mine.kv[0][:, past + 1:], theirs.kv[0][:, past + 1:])


def test_native_decode_attention_refuses_what_it_cannot_read():
    attn = attention(False, 4)
    w_qkv, w_proj = attn.c_attn._in_out()[1], attn.c_proj._in_out()[1]
    x, h, kv = torch.randn(2, C), torch.randn(2, C), torch.randn(2, BLOCK, 2 * C)
    op = torch.ops.moegpt_native.decode_attention_
    for args in ((x, h, w_qkv, None, w_proj, None, kv, BLOCK, 4),  # past the cache's rows
                 (x, h, w_qkv, None, w_proj, None, kv, -1, 4),
                 (x, h, w_qkv, None, w_proj, None, kv, 0, 5),  # heads that do not divide the width
                 (x, h, w_qkv.t(), None, w_proj, None, kv, 0, 4),
                 (x, h[:1], w_qkv, None, w_proj, None, kv, 0, 4),
                 (x, h, w_qkv, torch.zeros(C), w_proj, None, kv, 0, 4),
                 (x, h, w_qkv, None, w_proj, None, kv[:1], 0, 4),
                 (x.double(), h, w_qkv, None, w_proj, None, kv, 0, 4)):
        before = x.clone()
        with pytest.raises(RuntimeError):
            op(*args)
        assert torch.equal(x, before)


def test_native_decode_attention_refuses_overlapping_outputs():
    attn = attention(False, 4)
    w_qkv, w_proj = attn.c_attn._in_out()[1], attn.c_proj._in_out()[1]
    kv = torch.randn(2, BLOCK, 2 * C)
    op = torch.ops.moegpt_native.decode_attention_
    h, flat = torch.randn(2, C), torch.randn(2 * C + 1)
    for x, h_in in ((kv[:, 0, :C], h),  # the residual inside the cache
                    (h, kv[:, 1, :C]),  # h inside the cache
                    (torch.randn(1, C).expand(2, C), h),  # two residual rows on one memory
                    (flat[:-1].view(2, C), flat[1:].view(2, C))):  # x a shifted view of h
        with pytest.raises(RuntimeError, match="overlap|memory location"):
            op(x, h_in, w_qkv, None, w_proj, None, kv, 0, 4)
    same = torch.randn(2, C)  # x may be h itself: each row of h is read whole before its row of x is written
    want = same.clone()
    with torch.no_grad():
        op(same, same, w_qkv, None, w_proj, None, kv.clone(), 0, 4)
        op(want, want.clone(), w_qkv, None, w_proj, None, kv.clone(), 0, 4)
    assert torch.equal(same, want)


def test_the_write_is_seen_by_autograd_and_rotary_attention_stays_in_python():
    attn = attention(True, 4)
    x, h = torch.randn(1, C), torch.randn(1, C)
    cache = filled_cache(1, 3, 2)
    versions = (x._version, cache.kv[0]._version)
    with torch.no_grad():
        ops = count_ops(lambda: attn.decode(h, x, cache, 0))
    assert ops == {"moegpt_native.decode_attention_.default": 1}  # the kernel's own bump, not the Python path's
    assert x._version > versions[0] and cache.kv[0]._version > versions[1]
    llama = CausalSelfAttention(ModelConfig(n_embd=C, n_head=4, block_size=BLOCK, arch="llama")).eval()
    with torch.inference_mode():
        ops = count_ops(lambda: llama.decode(h, x.clone(), filled_cache(1, 3, 3), 0))
    assert "moegpt_native.decode_attention_.default" not in ops
