"""Multi-head Latent Attention (MLA; DeepSeek-V2 2024, DeepSeek-V3 2024) with a compressed KV cache.

Per token the residual x is projected once to a latent c_kv of width r = kv_lora_rank (then RMSNorm)
and to one rotary key k_pe of width dr = qk_rope_head_dim shared by all heads. Per head, keys are
[k_nope, k_pe] with k_nope = W_UK c_kv, and values are v = W_UV c_kv (kv_b_proj holds [W_UK; W_UV] per
head). Queries are [q_nope, q_pe], straight from x (q_proj) or through a low-rank path
(q_a_proj -> RMSNorm -> q_b_proj) when q_lora_rank > 0. q_pe and k_pe carry the position (RoPE,
moegpt.rope's half-split layout = transformers' DeepseekV3 with rope_interleave=False); q_nope and
k_nope carry none ("decoupled RoPE"). Softmax scale 1/sqrt(dn + dr) (no YaRN mscale: no rope scaling).

The KV cache stores only [RMSNorm(c_kv), rotated k_pe]: r + dr values per token per layer, against
2 * n_embd for MHA. Two ways to attend over it:
  plain: expand the cached latents into per-head keys and values (kv_b_proj), then ordinary attention;
  absorbed (decode steps, `mla_absorb`): q_nope.k_nope = (W_UK^T q_nope).c_kv, so W_UK folds into the
    query and the scores are taken against the latents themselves; the softmax-weighted sum of latents is
    mapped by W_UV afterwards (folded into the output). Nothing per cached token is expanded.

Parameter names follow transformers' DeepseekV3Attention. Legend: B batch, T new tokens, S tokens attended
(cached + new), H heads, R = kv_lora_rank, P = qk_rope_head_dim, N = qk_nope_head_dim, V = v_head_dim,
L = R + P (one cached row), D a head's query/key (or key/value) width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moegpt.config import ModelConfig
from moegpt.model import KVCache, Linear, causal_attention
from moegpt.moe.experts import storage_cached
from moegpt.rmsnorm import RMSNorm
from moegpt.rope import RotaryEmbedding


def kv_cache_values_per_token(cfg: ModelConfig, attention: str) -> int:
    """Cached values per token over all layers for `attention` ("mha" or "mla") with cfg's dimensions."""
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if attention == "mla" else 2 * cfg.n_embd
    return cfg.n_layer * per_layer


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        C, H = cfg.n_embd, cfg.n_head
        self.n_head, self.block_size = H, cfg.block_size
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank, self.q_lora_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank > 0:
            self.q_a_proj = Linear(C, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = Linear(self.q_lora_rank, H * qk_dim, bias=False)
        else:
            self.q_proj = Linear(C, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(C, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.norm_eps)
        self.kv_b_proj = Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, C, bias=False)
        self.rope = RotaryEmbedding(self.rope_dim, cfg.block_size, cfg.rope_theta)
        self.scale = qk_dim ** -0.5
        self.absorb = cfg.mla_absorb
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    @property
    def cache_values_per_token(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @property
    def score_value_width(self) -> int:
        return self.n_head * (self.nope_dim + self.rope_dim + self.v_dim)

    def queries(self, x_BTC: Tensor) -> Tensor:
        if self.q_lora_rank > 0:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTC)))
        return self.q_proj(x_BTC)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, _ = x.shape
        past = 0 if cache is None else cache.lengths[layer]
        q_BHTD = self.queries(x).view(B, T, self.n_head, -1).transpose(1, 2)
        q_nope, q_pe = q_BHTD.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = self.rope(q_pe, past)
        c_kv_BTR, k_pe_BTP = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent_BTL = torch.cat((self.kv_a_layernorm(c_kv_BTR), self.rope(k_pe_BTP, past)), dim=-1)
        if cache is not None:
            latent_BTL = cache.append(layer, latent_BTL, self.block_size)
        if cache is not None and T == 1 and self.absorb:
            y_BHTV = self.absorbed(q_nope, q_pe, latent_BTL[:, None])
        else:
            y_BHTV = self.plain(q_nope, q_pe, latent_BTL, past)
        y = self.o_proj(y_BHTV.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))
        return self.resid_dropout(y) if self.dropout else y

    def decode(self, h_BC: Tensor, x_BC: Tensor, cache: KVCache, layer: int) -> Tensor:
        """x += attention of one new token per sequence (h = the normed x, rows [B, C]) over the cache, in place;
        inference only: the new latent row is written straight into the cache (cat's out=), and the absorbed
        form (when `absorb`) attends over views of the whole buffer made once per cache (`decode_views`)."""
        B, H = h_BC.shape[0], self.n_head
        pos = cache.lengths[layer]
        q_nope, q_pe = self.queries(h_BC).view(B, H, 1, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        cos_sin = self.rope.rows(pos)
        c_kv_BR, k_pe_BP = self.kv_a_proj_with_mqa(h_BC).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        row_BL = cache.next_row(layer, h_BC, self.kv_lora_rank + self.rope_dim, self.block_size)
        torch.cat((self.kv_a_layernorm(c_kv_BR), self.rope.rotate_rows(k_pe_BP, cos_sin)), dim=-1, out=row_BL)
        q_pe = self.rope.rotate_rows(q_pe, cos_sin)
        if self.absorb:
            views = cache.decode_views[layer]
            if views is None:
                keys_B1cL = cache.kv[layer][:, None]
                views = cache.decode_views[layer] = (keys_B1cL, keys_B1cL.transpose(-1, -2))
            y_BHTV = self.absorbed(q_nope, q_pe, views[0][:, :, :pos + 1], views[1][..., :pos + 1])
        else:
            y_BHTV = self.plain(q_nope, q_pe, cache.kv[layer][:, :pos + 1], pos)
        return self.o_proj.add_to_(x_BC, y_BHTV.reshape(B, H * self.v_dim))

    def plain(self, q_nope: Tensor, q_pe: Tensor, latent_BSL: Tensor, past: int) -> Tensor:
        """Latents expanded into per-head keys and values, then causal attention."""
        B, S, _ = latent_BSL.shape
        c_kv_BSR, k_pe_BSP = latent_BSL.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv_BHSD = self.kv_b_proj(c_kv_BSR).view(B, S, self.n_head, -1).transpose(1, 2)
        k_nope, v_BHSV = kv_BHSD.split([self.nope_dim, self.v_dim], dim=-1)
        k_BHSD = torch.cat((k_nope, k_pe_BSP[:, None].expand(B, self.n_head, S, self.rope_dim)), dim=-1)
        q_BHTD = torch.cat((q_nope, q_pe), dim=-1)
        pad = q_BHTD.shape[-1] - self.v_dim
        if pad > 0:  # SDPA's fused CPU kernel wants values as wide as keys; its generic path is slower
            v_BHSV = torch.nn.functional.pad(v_BHSV, (0, pad))
        y = causal_attention(q_BHTD, k_BHSD, v_BHSV, past, self.dropout if self.training else 0.0, self.scale)
        return y[..., :self.v_dim] if pad > 0 else y

    def absorbed(self, q_nope_BH1N: Tensor, q_pe_BH1P: Tensor, keys_B1SL: Tensor,
                 keys_B1LS: Tensor | None = None) -> Tensor:
        """One new token per sequence against the cached latents (keys [B, 1, S, L], optionally also their
        transposed view), W_UK folded into the query and W_UV into the output. The H heads become H queries
        of one head over shared keys [c_kv, k_pe] (an MQA-shaped attention), and a single query sees every
        cached token: no mask."""
        B, H = q_nope_BH1N.shape[:2]
        w_uk_HNR, w_uv_HRV = self.absorbed_weights()
        q_lat_BH1R = q_nope_BH1N @ w_uk_HNR
        q_B1HL = torch.cat((q_lat_BH1R, q_pe_BH1P), dim=-1).view(B, 1, H, -1)
        # written out rather than through SDPA: with values narrower than keys SDPA takes its generic path,
        # which expands the shared keys per query and is slower than these three ops
        keys_B1LS = keys_B1SL.transpose(-1, -2) if keys_B1LS is None else keys_B1LS
        scores_B1HS = (q_B1HL @ keys_B1LS).mul_(self.scale)
        probs_B1HS = torch.softmax(scores_B1HS, dim=-1)
        if self.training and self.dropout:
            probs_B1HS = torch.nn.functional.dropout(probs_B1HS, self.dropout)
        # the values are the latents' first R columns: multiplying by whole contiguous rows and dropping the
        # rotary columns afterwards avoids copying a strided slice of the cache every step
        out_B1HR = (probs_B1HS @ keys_B1SL)[..., :self.kv_lora_rank]
        return out_B1HR.reshape(B, H, 1, self.kv_lora_rank) @ w_uv_HRV

    def absorbed_weights(self) -> tuple[Tensor, Tensor]:
        """W_UK [H, N, R] and W_UV^T [H, R, V] as views of kv_b_proj's weight; without autograd made once per
        weight storage (a decode step would otherwise slice them every time)."""
        weight = self.kv_b_proj.weight
        if torch.is_grad_enabled():
            return _absorbed_views(weight, self.n_head, self.nope_dim)
        return storage_cached(self, "_absorbed_views", weight.data_ptr(),
                              lambda: _absorbed_views(weight, self.n_head, self.nope_dim))


def _absorbed_views(weight: Tensor, n_head: int, nope_dim: int) -> tuple[Tensor, Tensor]:
    w_HDR = weight.view(n_head, -1, weight.shape[-1])
    return w_HDR[:, :nope_dim], w_HDR[:, nope_dim:].transpose(1, 2)
