"""RoPE (moegpt/rope.py) and RMSNorm (moegpt/rmsnorm.py) against direct references and transformers."""

from __future__ import annotations

import pytest
import torch

from moegpt.rmsnorm import RMSNorm
from moegpt.rope import RotaryEmbedding


def complex_rope_reference(x_BHTD: torch.Tensor, start: int, theta: float) -> torch.Tensor:
    """Pair i = (x[i], x[i + D/2]) read as the complex number x[i] + j x[i + D/2], multiplied by
    exp(j * position * theta^(-2i/D)), in float64."""
    D = x_BHTD.shape[-1]
    half = D // 2
    x = x_BHTD.double()
    z = torch.complex(x[..., :half], x[..., half:])
    positions = torch.arange(start, start + x.shape[-2], dtype=torch.float64)
    freqs = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / D)
    rotated = z * torch.polar(torch.ones(len(positions), half, dtype=torch.float64), torch.outer(positions, freqs))
    return torch.cat((rotated.real, rotated.imag), dim=-1)


@pytest.mark.parametrize(("dim", "start", "theta"), [(8, 0, 10000.0), (16, 5, 10000.0), (4, 20, 500.0)])
def test_rope_matches_complex_multiplication(dim, start, theta):
    rope = RotaryEmbedding(dim, max_positions=32, theta=theta)
    x = torch.randn(2, 3, 7, dim, generator=torch.Generator().manual_seed(0))
    got = rope(x, start)
    torch.testing.assert_close(got.double(), complex_rope_reference(x, start, theta), atol=2e-6, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(8, max_positions=64, theta=10000.0)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    near = (rope(q, 10) * rope(k, 7)).sum()
    far = (rope(q, 43) * rope(k, 40)).sum()
    torch.testing.assert_close(near, far, atol=1e-5, rtol=1e-5)


def test_rope_tables_are_not_saved():
    assert dict(RotaryEmbedding(8, 16, 10000.0).state_dict()) == {}


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(6, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.bfloat16()).dtype == torch.float32  # the fp32 weight promotes, as LlamaRMSNorm does


@pytest.mark.parametrize("shape", [(2, 3, 1, 16), (5, 16), (1, 4, 1, 8)])
def test_rotating_one_position_gives_forward_exactly(shape):
    rope = RotaryEmbedding(shape[-1], max_positions=32, theta=10000.0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    for position in (0, 7, 31):
        expected = rope(x.unsqueeze(-2), position).squeeze(-2)
        assert torch.equal(rope.rotate_rows(x, rope.rows(position)), expected)


def test_rmsnorm_without_autograd_gives_the_autograd_path_exactly():
    # inference takes torch's one-op rms_norm: the same numbers as the formula training differentiates
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=torch.Generator().manual_seed(2)))
    x = torch.randn(7, 3, 48, generator=torch.Generator().manual_seed(3)) * 5
    with torch.inference_mode():
        fast = norm(x)
    assert torch.equal(fast, norm(x.requires_grad_()).detach())


def test_rope_and_rmsnorm_equal_transformers_llama():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, num_attention_heads=2, rope_theta=10000.0, max_position_embeddings=64,
                         rms_norm_eps=1e-6)
    theirs = llama.LlamaRotaryEmbedding(config)
    x = torch.randn(1, 2, 40, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = theirs(x, torch.arange(3, 43)[None])
    expected, _ = llama.apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.equal(RotaryEmbedding(16, 64, 10000.0)(x, 3), expected)
    hf_norm, norm = llama.LlamaRMSNorm(32, eps=1e-6), RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        hf_norm.weight.normal_()
        norm.weight.copy_(hf_norm.weight)
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(4, 32).to(dtype)
        assert torch.equal(norm(h), hf_norm(h))
