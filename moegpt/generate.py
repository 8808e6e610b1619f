"""Text generation: sampling filters, KV-cached and recomputing loops, routing capture, UTF-8 streaming.

Legend: B batch, T time, L sequence length so far, K choices per token, V vocab.

Context window rule (shared by both loops, so they produce the same tokens):
  a prediction is conditioned on the window seq[start:L]; initially start = max(0, L0 - block_size).
  When the window would exceed block_size tokens, it slides: start = L - context_keep, i.e. only the
  newest `context_keep` tokens (default block_size // 2) are kept. Positions are learned absolute
  embeddings, so a cache cannot be shifted: the cached loop recomputes the cache on the kept tokens in
  one pass and continues one token per step until the window is full again. context_keep = block_size
  gives nanoGPT's rule (always the last block_size tokens) at the price of a full pass per token past
  block_size; the default amortises that pass over block_size // 2 tokens.
  The llama trunk (RoPE, with MHA or MLA) follows the same rule: the window's tokens take positions
  0..len-1 again after a slide, in both loops, so cached and recomputed generation see identical
  inputs. Rotary attention depends only on relative positions, so the re-based window scores like the
  unshifted one up to rounding; rebuilding (rather than keeping rotated keys at growing positions) keeps
  every position below block_size, where the rotary tables and training live.

Non-causal variants (expert-choice, soft) mix tokens of the whole window inside the FFN, so cached
activations go stale when a token is added: they recompute the window every step (`use_cache=False`).

Capacity-limited variants (switch, or capacity_factor > 0) drop tokens by expert capacity over the
tokens of one forward pass. A cached step routes only the new token (capacity >= 1, so it is never
dropped), whereas a recomputing step routes the whole window, where it may be: cached and recomputed
outputs then legitimately differ. Without drops (a capacity no expert fills) they are equal.
"""

from __future__ import annotations

import codecs
import math
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from moegpt.errors import MoegptError
from moegpt.finite import check_logits
from moegpt.inspect.stats import top1_of_choices
from moegpt.kv_cache import KVCache
from moegpt.moe import is_causal_variant
from moegpt.moe.stats import generating

if TYPE_CHECKING:  # the model imports this module lazily; a runtime import here would be a cycle
    from moegpt.model import GPT
    from moegpt.tokenizer import Tokenizer


# ---- sampling -------------------------------------------------------------------------------------------

def sampling_problems(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                      max_new_tokens: int = 0) -> dict[str, str]:
    """What is wrong with these sampling settings: {parameter name: what is wrong} (empty when fine).
    Callers prefix each message with the name they know the parameter by (an argument, a CLI flag)."""
    out = {}
    if not (math.isfinite(temperature) and temperature >= 0):
        out["temperature"] = f"must be a finite number >= 0 (got {temperature}; 0 = greedy)"
    if top_k is not None and top_k < 0:
        out["top_k"] = f"must be >= 0 (got {top_k}; 0 = off)"
    if top_p is not None and not (0.0 < top_p <= 1.0):  # also catches NaN
        out["top_p"] = f"must be in (0, 1] (got {top_p}; 1 = off)"
    if max_new_tokens < 0:
        out["max_new_tokens"] = f"must be >= 0 (got {max_new_tokens})"
    return out


def filter_logits(logits_BV: Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Scaled logits (fp32) with every token outside the top-k and the top-p nucleus set to -inf.

    The nucleus is the smallest set of most probable tokens whose mass reaches top_p (the most
    probable token is always kept). temperature must be > 0 here; 0 (greedy) is handled by `sample_next`.
    """
    logits_BV = logits_BV.float() / temperature
    V = logits_BV.shape[-1]
    if top_k and top_k < V:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, dim=-1)
        mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
        sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    return logits_BV


def sample_next(logits_BV: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, out: Tensor | None = None) -> Tensor:
    """One token id per row [B]: argmax when temperature == 0, else a draw from the filtered softmax.
    With `out` (int64 [B, 1], e.g. the next column of a token buffer) the ids are written there and it is returned."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1) if out is None else torch.argmax(logits_BV, dim=-1, keepdim=True, out=out)
    probs_BV = torch.softmax(filter_logits(logits_BV, temperature, top_k, top_p), dim=-1)
    if out is not None:
        return torch.multinomial(probs_BV, 1, generator=generator, out=out)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


# ---- routing capture ------------------------------------------------------------------------------------

@dataclass
class LayerRouting:
    """One MoE layer's choices for some tokens: experts [B, T, K] (-1 = empty slot), weights, drops."""

    expert_idx_BTK: Tensor
    expert_weight_BTK: Tensor
    dropped_BTK: Tensor | None = None

    def top1_BT(self) -> Tensor:
        """Each token's top-1 expert (moegpt.inspect.stats.top1_of_choices); -1 where no expert took it."""
        return top1_of_choices(self.expert_idx_BTK, self.expert_weight_BTK, self.dropped_BTK)


def _capture(stats: list[Any], batch: int, last: int) -> list[LayerRouting | None]:
    """Routing of the last `last` positions of a forward pass, per layer (None for dense layers, whose stats
    hold no routing or are None)."""
    out: list[LayerRouting | None] = []
    for s in stats:
        if s is None or s.expert_idx_NK is None:
            out.append(None)
            continue

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(batch, -1, t.shape[-1])[:, -last:].detach()

        out.append(LayerRouting(cut(s.expert_idx_NK), cut(s.expert_weight_NK), cut(s.dropped_NK)))
    return out


def concat_routing(parts: list[list[LayerRouting | None]]) -> list[LayerRouting | None]:
    """Per-layer routing of consecutive token spans joined along time."""
    out: list[LayerRouting | None] = []
    for layer_parts in zip(*parts, strict=True):
        if layer_parts[0] is None:
            out.append(None)
            continue
        dropped = None if layer_parts[0].dropped_BTK is None else torch.cat([p.dropped_BTK for p in layer_parts], 1)
        out.append(LayerRouting(torch.cat([p.expert_idx_BTK for p in layer_parts], 1),
                                torch.cat([p.expert_weight_BTK for p in layer_parts], 1), dropped))
    return out


# ---- the generation loop --------------------------------------------------------------------------------

@dataclass
class GenerationStep:
    """Tokens in sequence order, with their routing when asked for.

    The first step carries the prompt [B, T0]; each later step one new token [B, 1]. A token's routing
    is what the model chose when it first processed that token (for prompt tokens cropped away from a
    window longer than block_size: expert -1, weight 0). Routing needs that token to be fed back in,
    so with `capture_routing` each token is yielded one forward later (and one extra forward runs at the end).
    """

    tokens_BT: Tensor
    routing: list[LayerRouting | None] | None
    is_prompt: bool


@dataclass
class Generation:
    tokens_BL: Tensor  # prompt + generated
    prompt_len: int
    routing: list[LayerRouting | None] | None  # per layer over all L tokens; None for dense layers
    used_cache: bool
    seconds: float



def model_is_causal(model: GPT) -> bool:
    """True when every FFN of the model is causal (a KV cache is then exact)."""
    return not model.moe_layers or is_causal_variant(model.moe_config.variant)


def _resolve_cache(model: GPT, use_cache: bool | None) -> bool:
    causal = model_is_causal(model)
    if use_cache and not causal:
        raise MoegptError(f"{model.moe_config.variant} is not causal: a KV cache would reuse stale activations "
                         "(use use_cache=False or None)")
    if use_cache is None and not causal:
        warnings.warn(f"{model.moe_config.variant} is not causal: no KV cache, the window is recomputed every step",
                      stacklevel=3)
    return causal if use_cache is None else use_cache


def _as_batch(idx: Tensor | Sequence[int], device: torch.device) -> Tensor:
    idx_BT = torch.as_tensor(idx, dtype=torch.long, device=device)
    if idx_BT.dim() == 1:
        idx_BT = idx_BT[None]
    if idx_BT.dim() != 2 or idx_BT.shape[1] == 0:
        raise MoegptError(f"prompt must be [T] or [B, T] token ids with T >= 1 (got shape {tuple(idx_BT.shape)})")
    return idx_BT


def generate_steps(model: GPT, idx: Tensor | Sequence[int], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
                   use_cache: bool | None = None, context_keep: int | None = None,
                   capture_routing: bool = False) -> Iterator[GenerationStep]:
    """Generate token by token, yielding the prompt first and then each new token (see GenerationStep).

    use_cache: None = KV cache for causal models, recompute for non-causal ones (with a warning);
    context_keep: tokens kept when the window slides past block_size (default block_size // 2; module doc).
    The model runs in eval mode under inference_mode (cheaper per op than no_grad: more
    tokens/s for the default model); its previous mode is restored afterwards. The token buffer is
    made outside it, so returned tokens are ordinary tensors.
    """
    problems = [f"{name} {what}" for name, what in
                sampling_problems(temperature, top_k, top_p, max_new_tokens).items()]
    block = model.config.block_size
    keep, keep_problem = context_keep_for(block, context_keep)
    problems += [keep_problem] if keep_problem else []
    if problems:
        raise MoegptError("; ".join(problems))
    cached = _resolve_cache(model, use_cache)
    device = next(model.parameters()).device
    prompt_BT = _as_batch(idx, device)
    B, T0 = prompt_BT.shape
    seq_BL = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=device)
    seq_BL[:, :T0] = prompt_BT
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), generating():
            yield from _loop(model, seq_BL, T0, max_new_tokens, block, keep, cached, capture_routing,
                             temperature, top_k, top_p, generator)
    finally:
        model.train(was_training)


def slide_steps(prompt_len: int, block: int, keep: int) -> Iterator[int]:
    """The generation steps (0 = the prompt's pass, step s samples new token s + 1) at which the window slides
    and the cache is refilled (the module doc's rule), in order, without end."""
    L, start, step = prompt_len, max(0, prompt_len - block), 0
    while True:
        start, slide = slid_window(L, start, block, keep)
        if slide:
            yield step
        L, step = L + 1, step + 1


def slid_window(L: int, start: int, block: int, keep: int) -> tuple[int, bool]:
    """(start of the window seq[start:L], whether it slid): past block_size tokens only the newest `keep` stay."""
    return (L - keep, True) if L - start > block else (start, False)


def _loop(model: GPT, seq_BL: Tensor, T0: int, max_new: int, block: int, keep: int, cached: bool, capture: bool,
          temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> Iterator[GenerationStep]:
    B = seq_BL.shape[0]
    L, start = T0, max(0, T0 - block)
    cache: KVCache | None = None
    if not capture:  # nothing to wait for: the prompt can be shown before the first forward
        yield GenerationStep(seq_BL[:, :T0], None, True)
    # one forward per new token, plus one to route the last token when routing is captured
    for step in range(max_new + (1 if capture else 0)):
        start, slide = slid_window(L, start, block, keep)
        if cached and cache is not None and not slide:  # a decode step: the newest token on the cache
            logits_BV, stats = model.decode(seq_BL[:, L - 1], cache, capture)
        else:
            if cached:
                cache = KVCache()  # (re)fill the cache with the whole window in one pass
            out = model(seq_BL[:, start:L], cache=cache)
            logits_BV, stats = out.logits[:, -1], out.router_stats
        if capture and step == 0:
            routing = _capture(stats, B, L - start)
            if start > 0:  # prompt tokens cropped from an over-long prompt were never routed
                routing = concat_routing([[_unrouted(r, B, start) for r in routing], routing])
            yield GenerationStep(seq_BL[:, :T0], routing, True)
        elif capture:
            yield GenerationStep(seq_BL[:, L - 1:L], _capture(stats, B, 1), False)
        if L == seq_BL.shape[1]:
            break
        check_logits(logits_BV, f"at generated token {L - T0 + 1}")
        next_B1 = seq_BL[:, L:L + 1]
        sample_next(logits_BV, temperature, top_k, top_p, generator, out=next_B1)
        L += 1
        if not capture:
            yield GenerationStep(next_B1, None, False)


def context_keep_for(block: int, context_keep: int | None) -> tuple[int, str | None]:
    """Tokens kept when the window slides (default block_size // 2), and what is wrong with the request, if
    anything."""
    keep = max(1, block // 2) if context_keep is None else context_keep
    if 1 <= keep <= block:
        return keep, None
    return keep, f"context_keep must be in [1, block_size={block}] (got {context_keep})"


def _unrouted(r: LayerRouting | None, batch: int, n: int) -> LayerRouting | None:
    if r is None:
        return None
    K = r.expert_idx_BTK.shape[-1]
    idx = r.expert_idx_BTK.new_full((batch, n, K), -1)
    dropped = None if r.dropped_BTK is None else r.dropped_BTK.new_zeros((batch, n, K))
    return LayerRouting(idx, r.expert_weight_BTK.new_zeros((batch, n, K)), dropped)


def generate(model: GPT, idx: Tensor | Sequence[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool | None = None, context_keep: int | None = None,
             capture_routing: bool = False) -> Generation:
    """All of `generate_steps` collected: the tokens [B, T0 + max_new_tokens] and, if asked, the routing."""
    t0 = time.perf_counter()
    cached = _resolve_cache(model, use_cache)
    steps = list(generate_steps(model, idx, max_new_tokens, temperature, top_k, top_p, generator, cached,
                                context_keep, capture_routing))
    tokens_BL = torch.cat([s.tokens_BT for s in steps], dim=1)
    routing = concat_routing([s.routing for s in steps]) if capture_routing else None
    return Generation(tokens_BL, steps[0].tokens_BT.shape[1], routing, cached, time.perf_counter() - t0)


# ---- streaming text ---------------------------------------------------------------------------------------

class Utf8StreamDecoder:
    """Token ids in, text out as soon as it is complete: a character whose UTF-8 bytes are split across
    tokens (byte-level BPE) is held back until its last byte arrives, never printed as U+FFFD mid-stream.
    Bytes that can never form a character (the model may emit them) do become U+FFFD."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes(ids))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)


# ---- benchmark ------------------------------------------------------------------------------------------

def benchmark_generation(model: GPT, prompt_ids: Tensor | Sequence[int], new_tokens: int = 256,
                         repeats: int = 5, context_keep: int | None = None) -> dict[str, Any]:
    """Greedy generation of `new_tokens` three ways, in this process: with the KV cache; with full
    recomputation of the same window (same tokens: the fair comparison); and recomputing nanoGPT's way,
    always the last block_size tokens (differs only past block_size). Per mode the best-of-`repeats`
    seconds and tokens/s, and whether cached and recompute produced the same tokens (they should for
    causal, drop-free models).

    The modes alternate (cached, recompute, crop, cached, ...) so that a slow spell of a shared machine
    hits all alike. `speedup` (and `speedup_vs_crop`) is the median over rounds of the ratio within a
    round, as `moegpt bench layer|model` report ratios; `speedup_best` is the ratio of the best runs.
    """
    if repeats < 1 or new_tokens < 1:
        raise MoegptError(f"repeats and new_tokens must be >= 1 (got {repeats}, {new_tokens})")
    if not model_is_causal(model):
        raise MoegptError(f"{model.moe_config.variant} is not causal: it cannot use a KV cache")
    block = model.config.block_size
    keep = context_keep or max(1, block // 2)
    results: dict[str, Any] = {"new_tokens": new_tokens, "prompt_tokens": _as_batch(prompt_ids, "cpu").shape[1],
                               "repeats": repeats, "device": str(next(model.parameters()).device),
                               "context_keep": keep}
    modes = {"cached": (True, keep), "recompute": (False, keep), "recompute_crop": (False, block)}
    for use_cache, _ in modes.values():  # warm-up
        generate(model, prompt_ids, min(8, new_tokens), temperature=0, use_cache=use_cache)
    seconds: dict[str, list[float]] = {name: [] for name in modes}
    outputs = {}
    for _ in range(repeats):
        for name, (use_cache, mode_keep) in modes.items():
            gen = generate(model, prompt_ids, new_tokens, temperature=0, use_cache=use_cache, context_keep=mode_keep)
            seconds[name].append(gen.seconds)
            outputs[name] = gen.tokens_BL
    produced = new_tokens * outputs["cached"].shape[0]
    for name, runs in seconds.items():
        results[f"{name}_s"] = min(runs)
        results[f"{name}_tokens_per_s"] = produced / min(runs)
    for name, key in (("recompute", "speedup"), ("recompute_crop", "speedup_vs_crop")):
        results[key] = statistics.median(r / c for c, r in zip(seconds["cached"], seconds[name], strict=True))
    results["speedup_best"] = results["cached_tokens_per_s"] / results["recompute_tokens_per_s"]
    results["same_tokens"] = bool(torch.equal(outputs["cached"], outputs["recompute"]))
    return results
