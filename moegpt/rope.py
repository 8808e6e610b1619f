"""Rotary position embeddings (RoPE; Su et al. 2021) in Llama's layout.

The rotary dimensions of a head are split into two halves (not interleaved pairs): dimension i and
i + d/2 form one pair, rotated by angle pos * inv_freq[i], inv_freq[i] = theta^(-2i/d). This is
transformers' `rotate_half` convention (LlamaRotaryEmbedding; DeepseekV3 with rope_interleave=False),
so weights trained here load there without a permutation.

Legend: B batch, H heads, T time, D rotary dimensions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def inverse_frequencies(dim: int, theta: float) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions 0..max_positions-1, kept as non-persistent buffers (not in state_dict:
    they follow from the config)."""

    def __init__(self, dim: int, max_positions: int, theta: float):
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.int64).float()
        angles_TD = torch.outer(positions, inverse_frequencies(dim, theta))
        angles_TD = torch.cat((angles_TD, angles_TD), dim=-1)
        self.register_buffer("cos_TD", angles_TD.cos(), persistent=False)
        self.register_buffer("sin_TD", angles_TD.sin(), persistent=False)

    def forward(self, x_BHTD: Tensor, start: int) -> Tensor:
        """x rotated as if its T positions were start, start + 1, ..."""
        T = x_BHTD.shape[-2]
        cos = self.cos_TD[start:start + T].to(x_BHTD.dtype)
        sin = self.sin_TD[start:start + T].to(x_BHTD.dtype)
        return x_BHTD * cos + rotate_half(x_BHTD) * sin
