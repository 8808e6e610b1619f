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
        # rotate_half(x) = roll(x, d/2) with its first half negated: the sign folded into the sine (rotate_one)
        sign_D = torch.cat((-torch.ones(dim // 2), torch.ones(dim // 2)))
        self.register_buffer("signed_sin_TD", self.sin_TD * sign_D, persistent=False)

    def forward(self, x_BHTD: Tensor, start: int) -> Tensor:
        """x rotated as if its T positions were start, start + 1, ..."""
        T = x_BHTD.shape[-2]
        cos = self.cos_TD[start:start + T].to(x_BHTD.dtype)
        sin = self.sin_TD[start:start + T].to(x_BHTD.dtype)
        return x_BHTD * cos + rotate_half(x_BHTD) * sin

    def rows(self, position: int) -> tuple[Tensor, Tensor]:
        """The cosine and signed sine [D] of one position, for `rotate_rows` (a decode step rotates queries and
        keys at the same position with them)."""
        return self.cos_TD[position], self.signed_sin_TD[position]

    def rotate_rows(self, x_D: Tensor, cos_sin: tuple[Tensor, Tensor]) -> Tensor:
        """forward at one position (`rows`) for x of any shape ending in D, in fewer ops: the rotation is a roll
        times the signed sine, which gives forward's numbers exactly."""
        cos_D, signed_sin_D = cos_sin
        if cos_D.dtype != x_D.dtype:
            cos_D, signed_sin_D = cos_D.to(x_D.dtype), signed_sin_D.to(x_D.dtype)
        return x_D * cos_D + x_D.roll(x_D.shape[-1] // 2, -1) * signed_sin_D
