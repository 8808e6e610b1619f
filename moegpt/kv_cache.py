"""KVCache: what generation keeps per layer of the tokens seen so far (keys and values, or MLA's latents).

Legend: B batch, T new tokens, S tokens stored so far, X values per token (a row); C model width, R and P
MLA's latent and rotary key widths (moegpt.mla).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class KVCache:
    """Per-layer rows of the tokens seen so far.

    One buffer per layer, [B, block_size, X], one row per token: MHA's keys then values of all heads (X = 2C),
    MLA's compressed latent and rotary key (X = R + P). Allocated on first use and filled in place: a generated
    token costs one row write per layer instead of re-concatenating the whole cache. Token-major rows let a
    decode step project its new keys and values straight into the buffer (mm's `out=`); attention reads
    strided views of it. `decode_views` holds, per layer, views of the buffer that every decode step of this
    cache reuses (built by the attention on its first decode step).
    """

    kv: list[Tensor | None] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    decode_views: list[Any] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.lengths[0] if self.lengths else 0

    def start(self, n_layer: int) -> None:
        if not self.kv:
            self.kv, self.lengths, self.decode_views = [None] * n_layer, [0] * n_layer, [None] * n_layer

    def _buffer(self, layer: int, like: Tensor, width: int, capacity: int) -> Tensor:
        """layer's [B, capacity, width] buffer (B = like's first dimension), made on first use."""
        buf = self.kv[layer]
        if buf is None:
            buf = self.kv[layer] = like.new_empty(like.shape[0], capacity, width)
        return buf

    def append(self, layer: int, rows_BTX: Tensor, capacity: int) -> Tensor:
        """Store the new rows of `layer`; return all rows so far [B, S, X] (a view of the buffer)."""
        buf = self._buffer(layer, rows_BTX, rows_BTX.shape[-1], capacity)
        past, T = self.lengths[layer], rows_BTX.shape[1]
        buf[:, past:past + T] = rows_BTX
        self.lengths[layer] = past + T
        return buf[:, :past + T]

    def next_row(self, layer: int, like: Tensor, width: int, capacity: int) -> Tensor:
        """The row [B, X] of `layer`'s buffer that the next token goes into (a view; B = like's rows), counted
        as stored: the caller fills it in place."""
        buf, row = self.claim_row(layer, like, width, capacity)
        return buf[:, row]

    def claim_row(self, layer: int, like: Tensor, width: int, capacity: int) -> tuple[Tensor, int]:
        """`layer`'s whole buffer [B, capacity, X] and the index of the row the next token goes into, counted as
        stored: for a kernel that writes the row itself (no view made)."""
        buf = self._buffer(layer, like, width, capacity)
        row = self.lengths[layer]
        self.lengths[layer] = row + 1
        return buf, row

    def nbytes(self) -> int:
        """Bytes of the cached entries (the filled part of every layer's buffer)."""
        return sum(buf.shape[0] * n * buf.shape[2] * buf.element_size()
                   for buf, n in zip(self.kv, self.lengths, strict=True) if buf is not None)
