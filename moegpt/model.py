"""nanoGPT-style decoder whose FFN blocks come from the MoE registry.

Two trunks (model.arch): gpt2 = pre-LayerNorm blocks, learned positions, tied input/output embeddings;
llama = pre-RMSNorm blocks, rotary positions in the attention (moegpt.rope), no biases, tied or untied
head. Attention (model.attention): mha = causal self-attention through scaled_dot_product_attention,
or mla = Multi-head Latent Attention (moegpt.mla, llama trunk only). Both trunks use nanoGPT's
initialisation (residual projections scaled by 1/sqrt(2 * n_layer)). Legend: B batch, T time, C width, V vocab.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moegpt.config import ModelConfig, MoEConfig
from moegpt.errors import MoegptError
from moegpt.kv_cache import KVCache
from moegpt.moe import FFNLayer, RouterStats, build_ffn, moe_layer_indices, native
from moegpt.moe.layer import AllReduce
from moegpt.rmsnorm import RMSNorm
from moegpt.rope import RotaryEmbedding
from moegpt.runtime import one_thread

IGNORE_INDEX = -1


class Linear(nn.Linear):
    """nn.Linear (same parameters and state_dict) with faster paths for generated tokens (inference).

    For a few rows without autograd on CPU, MKL's matrix-vector product is faster with the weight laid out
    [in, out] than with nn.Linear's [out, in] (README, "Dispatch backends", has the figures), so such
    calls multiply by a transposed copy of the weight (on other devices: a transposed view). The copy is keyed
    by the weight's storage and in-place version: any update (optimizer step, load_state_dict, .to())
    rebuilds it, and with it the column blocks that decode steps project onto (`columns`). A large such
    product (the output head of a decode step) is split with the native kernels' helper thread when the code
    around the decode step has threads to spare (`native.splits_rows_matmul`).
    """

    FEW_ROWS = 8

    def _in_out(self) -> tuple[Any, Tensor, dict]:
        weight = self.weight
        key = (weight.data_ptr(), weight._version, weight.dtype)
        cached = self.__dict__.get("_weight_in_out")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor even under inference_mode
                in_out = weight.t().contiguous() if weight.device.type == "cpu" else weight.t()
            cached = (key, in_out, {})
            self.__dict__["_weight_in_out"] = cached  # a plain attribute: not a parameter, not in state_dict
        return cached

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or torch.is_grad_enabled() or x.numel() > self.FEW_ROWS * self.in_features:
            return super().forward(x)
        in_out = self._in_out()[1]
        if self.bias is None:
            if x.dim() == 2 and native.splits_rows_matmul(x, in_out):
                return torch.ops.moegpt_native.rows_matmul(x, in_out, True)
            return x @ in_out
        return torch.addmm(self.bias, x.reshape(-1, self.in_features), in_out).view(*x.shape[:-1], -1)

    def columns(self, widths: tuple[int, ...]) -> tuple[tuple[Tensor, Tensor | None], ...]:
        """Inference only: per block of output features (`widths` sum to out_features), the [in, width] columns
        of the [in, out] weight and the block of the bias (None without one), made once per weight: a decode
        step projects onto each block without slicing the weight or the output per token."""
        _, in_out, blocks = self._in_out()
        bias = self.bias
        key = (widths, None if bias is None else bias.data_ptr())
        found = blocks.get(key)
        if found is None:
            with torch.inference_mode(False), torch.no_grad():
                biases = (None,) * len(widths) if bias is None else bias.split(widths)
                found = blocks[key] = tuple(zip(in_out.split(widths, dim=1), biases, strict=True))
        return found

    def add_to_(self, residual_NO: Tensor, x_NI: Tensor) -> Tensor:
        """Inference, 2-D rows: residual += self(x) in place, the product accumulated by one addmm_; returns
        residual."""
        residual_NO.addmm_(x_NI, self._in_out()[1])
        return residual_NO if self.bias is None else residual_NO.add_(self.bias)


def project(x_NI: Tensor, weight_IO: Tensor, bias_O: Tensor | None, out: Tensor | None = None) -> Tensor:
    """x @ W (+ b) for a decode step, optionally written into `out` (e.g. a KV cache row)."""
    if bias_O is None:
        return torch.mm(x_NI, weight_IO, out=out)
    return torch.addmm(bias_O, x_NI, weight_IO, out=out)


@dataclass
class GPTOutput:
    logits: Tensor
    loss: Tensor | None  # cross-entropy only; aux losses are summed by `aux_losses`
    router_stats: list[RouterStats]  # one per layer (dense layers report empty stats)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, past: int, dropout: float = 0.0,
                     scale: float | None = None) -> Tensor:
    """SDPA of T new queries at positions past..past+T-1 over past+T keys, each seeing keys up to its own."""
    T = q.shape[-2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    if T == 1:  # one new query sees every cached key: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)
    allowed = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale)


class CausalSelfAttention(nn.Module):
    """Multi-head attention; on the llama trunk q and k are rotated (RoPE) before keys enter the cache."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_embd, self.block_size = cfg.n_head, cfg.n_embd, cfg.block_size
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rope = RotaryEmbedding(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta) \
            if cfg.arch == "llama" else None

    @property
    def cache_values_per_token(self) -> int:
        return 2 * self.n_embd  # a key and a value per head

    @property
    def score_value_width(self) -> int:
        """Summed width of q.k and of the values over heads (for the attention FLOPs estimate)."""
        return 2 * self.n_embd

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        past = 0 if cache is None else cache.lengths[layer]
        if self.rope is not None or cache is None:
            # [B, T, 3C] -> [3, B, n_head, T, head_dim] as one view: q, k, v without a split and six reshapes
            q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
            if self.rope is not None:
                q, k = self.rope(q, past), self.rope(k, past)
            if cache is not None:  # rotated keys and values back to token-major rows for the cache
                k, v = self.heads(cache.append(layer, torch.stack((k, v), 2).transpose(1, 3).reshape(B, T, 2 * C),
                                               self.block_size))
        else:
            q = qkv[..., :C].view(B, T, self.n_head, -1).transpose(1, 2)
            k, v = self.heads(cache.append(layer, qkv[..., C:], self.block_size))
        y = causal_attention(q, k, v, past, self.dropout if self.training else 0.0)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return self.resid_dropout(y) if self.dropout else y

    def heads(self, rows_BSX: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [B, n_head, S, head_dim] as views of cache rows [B, S, 2C] (keys, then values)."""
        B, S, X = rows_BSX.shape
        k, v = rows_BSX.view(B, S, 2, self.n_head, X // (2 * self.n_head)).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def decode(self, h_BC: Tensor, x_BC: Tensor, cache: KVCache, layer: int) -> Tensor:
        """x += attention of one new token per sequence (h = the normed x, rows [B, C]) over the cache, in place
        (x is the step's own residual); inference.

        On the gpt2 trunk in fp32 on CPU the native kernel runs the whole sublayer in one op (projections, the
        cache row, attention, output product; moegpt/moe/csrc/decode_attention.cpp). Otherwise the new keys
        and values are projected straight into their cache row (mm's out=), the query into a buffer already
        viewed per head, and the keys and values attended are slices of per-head views of the whole cache
        buffer: those views are made once per cache (`decode_views`), not per token."""
        B, C = h_BC.shape
        if self.rope is None:  # the native kernel: the whole sublayer in one op
            w_qkv, w_proj = self.c_attn._in_out()[1], self.c_proj._in_out()[1]
            if native.serves_decode_attention(x_BC, h_BC, w_qkv, w_proj):
                kv, pos = cache.claim_row(layer, h_BC, 2 * C, self.block_size)
                return torch.ops.moegpt_native.decode_attention_(x_BC, h_BC, w_qkv, self.c_attn.bias, w_proj,
                                                                 self.c_proj.bias, kv, pos, self.n_head)
        (w_q, b_q), (w_kv, b_kv) = self.c_attn.columns((C, 2 * C))
        pos = cache.lengths[layer]
        row_BX = cache.next_row(layer, h_BC, 2 * C, self.block_size)
        views = cache.decode_views[layer]
        if views is None:
            q_BC = h_BC.new_empty(B, C)
            views = cache.decode_views[layer] = (*self.heads(cache.kv[layer]), q_BC,
                                                 q_BC.view(B, self.n_head, 1, C // self.n_head))
        k_BHSD, v_BHSD, q_BC, q = views
        project(h_BC, w_q, b_q, out=q_BC)
        if self.rope is None:
            project(h_BC, w_kv, b_kv, out=row_BX)
        else:  # keys enter the cache rotated
            cos_sin = self.rope.rows(pos)
            q = self.rope.rotate_rows(q, cos_sin)
            k_BC, v_BC = project(h_BC, w_kv, b_kv).split(C, dim=1)
            k_BHD = self.rope.rotate_rows(k_BC.view(B, self.n_head, C // self.n_head), cos_sin)
            torch.cat((k_BHD.view(B, C), v_BC), dim=1, out=row_BX)
        y = F.scaled_dot_product_attention(q, k_BHSD[:, :, :pos + 1], v_BHSD[:, :, :pos + 1])
        return self.c_proj.add_to_(x_BC, y.reshape(B, C))


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.arch == "llama" else nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "mla":
        from moegpt.mla import MultiHeadLatentAttention  # local: moegpt.mla builds on this module's Linear

        return MultiHeadLatentAttention(cfg)
    return CausalSelfAttention(cfg)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = build_attention(cfg)
        self.ln_2 = make_norm(cfg)
        self.ffn = build_ffn(cfg, moe_cfg, layer_idx)
        self.ffn_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor | None = None, cache: KVCache | None = None,
                layer: int = 0) -> tuple[Tensor, RouterStats]:
        x = x + self.attn(self.ln_1(x), cache, layer)
        y, stats = self.ffn(self.ln_2(x), mask)
        # an inactive Dropout still costs a module call per block per generated token
        return x + (self.ffn_dropout(y) if self.ffn_dropout.p else y), stats

    def decode(self, x_BC: Tensor, cache: KVCache, layer: int, capture: bool) -> tuple[Tensor, RouterStats | None]:
        """One new token per sequence through the block (GPT.decode): rows [B, C] in and out, each sublayer's
        output added onto the residual (in place) by its last product; the FFN's stats only when `capture`."""
        x_BC = self.attn.decode(self.ln_1(x_BC), x_BC, cache, layer)
        return self.ffn.decode(self.ln_2(x_BC), x_BC, capture)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig):
        super().__init__()
        self.config, self.moe_config = cfg, moe_cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        # learned positions on gpt2; the llama trunk rotates queries and keys inside the attention instead
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.arch == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, moe_cfg, i) for i in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_module)
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        # projections that write into the residual stream: attention's c_proj (MLA's o_proj) and the FFNs'
        # last matrix (w_out, or w_in for the single-matrix `linear` expert)
        last_ffn = "w_in" if moe_cfg.activation == "linear" else "w_out"
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "o_proj.weight")) or name.endswith(last_ffn):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    @staticmethod
    def _init_module(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        for name, p in module.named_parameters(recurse=False):
            if name in ("w_in", "w_out"):  # expert banks and dense MLPs
                nn.init.normal_(p, mean=0.0, std=0.02)
        if isinstance(module, FFNLayer):
            module.init_parameters()

    def after_optimizer_step(self, all_reduce: AllReduce) -> None:
        """Every FFN layer's hook (e.g. aux-free's bias update); `all_reduce` sums a tensor over the DP ranks."""
        for block in self.blocks:
            block.ffn.after_optimizer_step(all_reduce)

    @property
    def moe_layers(self) -> list[int]:
        return moe_layer_indices(self.moe_config, len(self.blocks))

    def decode(self, idx_B: Tensor, cache: KVCache, capture: bool = False) -> tuple[Tensor, list | None]:
        """Logits [B, V] of one new token per sequence (ids [B]) following the cached ones, in inference (eval
        mode, no autograd), and with `capture` each layer's RouterStats (routing facts only; None for layers
        that route nothing), else None.

        The lean twin of forward(idx[:, None], cache=cache) that generation steps through: rows [B, C]
        throughout, each sublayer's output added onto the residual by its last product, no losses and no
        stats unless captured. Under autocast it is that forward (in-place cache writes would bypass the casts).

        On CPU it runs with one intra-op thread: a one-token step's ops are far too small to share, and handing
        one to a second OpenMP thread costs a hand-off or a wake-up each (README, "Threads"). Two products are
        big enough to stream faster from two cores, a token's experts and the output head: the native kernels
        split them with their own spinning helper thread when the caller has more than one
        (`runtime.caller_threads`).
        """
        past = cache.length
        if past + 1 > self.config.block_size:
            raise MoegptError(f"sequence of {past + 1} tokens exceeds block_size {self.config.block_size}")
        if self.training or torch.is_grad_enabled():
            raise MoegptError("decode is for inference: call it in eval mode under no_grad or inference_mode")
        if torch.is_autocast_enabled(idx_B.device.type):
            out = self(idx_B[:, None], cache=cache)
            return out.logits[:, -1], [s if s.is_routed else None for s in out.router_stats] if capture else None
        cache.start(len(self.blocks))
        with one_thread() if idx_B.device.type == "cpu" else contextlib.nullcontext():
            x = self.wte(idx_B)
            if self.wpe is not None:
                x = x + self.wpe.weight[past]
            stats: list[RouterStats | None] | None = [] if capture else None
            for layer, block in enumerate(self.blocks):
                x, layer_stats = block.decode(x, cache, layer, capture)
                if stats is not None:
                    stats.append(layer_stats)
            return self.lm_head(self.ln_f(x)), stats

    def forward(self, idx: Tensor, targets: Tensor | None = None, cache: KVCache | None = None,
                all_logits: bool = False) -> GPTOutput:
        """Logits, cross-entropy (targets of IGNORE_INDEX are skipped) and per-layer RouterStats.

        Without targets only the last position's logits are computed unless `all_logits`.
        With a cache, `idx` holds the new tokens only and positions continue from the cache.
        """
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.config.block_size:
            raise MoegptError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        if cache is not None:
            cache.start(len(self.blocks))
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe.weight[past:past + T]  # = wpe(arange(past, past + T)), one op cheaper
        x = self.drop(x) if self.drop.p else x
        mask = None if targets is None else targets != IGNORE_INDEX
        if mask is not None and (not self.moe_layers or (mask.device.type == "cpu" and not torch.compiler.is_compiling()
                                                         and bool(mask.all()))):
            # no ignored targets (the usual batch): router losses skip their token weights. Only checked on
            # CPU outside torch.compile: elsewhere the check is a host sync (or a graph break) per step
            mask = None
        stats = []
        for layer, block in enumerate(self.blocks):
            x, layer_stats = block(x, mask, cache, layer)
            stats.append(layer_stats)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            return GPTOutput(logits, loss, stats)
        logits = self.lm_head(x if all_logits else x[:, -1:, :])
        return GPTOutput(logits, None, stats)

    # ---- accounting -----------------------------------------------------------------------------
    def num_params(self) -> dict[str, int]:
        """Total parameters, and active ones (what one token runs through), both counting embeddings once."""
        total = sum(p.numel() for p in self.parameters())
        ffn_total = sum(p.numel() for b in self.blocks for p in b.ffn.parameters())
        ffn_active = sum(b.ffn.active_params(self.config.block_size) for b in self.blocks)
        active = total - ffn_total + ffn_active
        embeddings = self.wte.weight.numel() + (0 if self.wpe is None else self.wpe.weight.numel())
        return {"total": total, "active": active, "embedding": embeddings,
                "active_non_embedding": active - embeddings}

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward): 6 * active non-embedding params + attention
        (6 * block_size * the q.k and value widths per layer: 12 * n_layer * n_embd * block_size for
        MHA), the nanoGPT/PaLM estimate, plus the tied output head (an untied one is already counted)."""
        cfg = self.config
        n = self.num_params()
        head = cfg.n_embd * cfg.vocab_size if cfg.tie_embeddings else 0
        attention = 6 * cfg.block_size * sum(b.attn.score_value_width for b in self.blocks)
        return 6 * (n["active_non_embedding"] + head) + attention

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 4) -> int:
        """What generation caches per token, over all layers: keys and values (MHA) or latent + rotary key (MLA)."""
        return bytes_per_value * sum(b.attn.cache_values_per_token for b in self.blocks)


def aux_losses(stats: list[RouterStats], moe_cfg: MoEConfig) -> dict[str, Tensor]:
    """Sum each router loss over layers (never pooling tokens across layers), then scale.

    Returns the unscaled sums (for logging) and `total` = a*sum(balance) + b*sum(z) + g*sum(seq_balance).
    """
    balance = torch.stack([s.balance for s in stats]).sum()
    z = torch.stack([s.z for s in stats]).sum()
    seq = torch.stack([s.seq_balance for s in stats]).sum()
    total = moe_cfg.balance_coef * balance + moe_cfg.z_coef * z + moe_cfg.seq_balance_coef * seq
    return {"balance": balance, "z": z, "seq_balance": seq, "total": total}
