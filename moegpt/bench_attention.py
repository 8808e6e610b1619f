"""`moegpt bench sample --attention`: KV-cached greedy generation with MHA against MLA (absorbed and plain
decode) on the same trunk, MoE and weights' seed: tokens/s, cache bytes per token and cache memory.

The cases run in interleaved rounds (each round generates once with every case) so that a slow spell of
a shared machine hits all alike; `ratio_to_first` is the median over rounds of the first case's seconds
over this case's (> 1 = faster than the first case).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from moegpt.bench import interleaved_times, paired_ratio
from moegpt.config import ModelConfig, MoEConfig
from moegpt.errors import MoegptError
from moegpt.generate import generate
from moegpt.model import GPT, KVCache

ATTENTION_CASES = ("mha", "mla")


def attention_configs(model_cfg: ModelConfig, attentions: list[str]) -> dict[str, ModelConfig]:
    """One config per case on the llama trunk (MLA needs it; MHA shares it for a like-for-like comparison);
    mla expands to its two decode forms."""
    unknown = [a for a in attentions if a not in ATTENTION_CASES]
    if unknown or not attentions:
        raise MoegptError(f"unknown attention {', '.join(unknown) or '(none)'}; valid: {', '.join(ATTENTION_CASES)}")
    out = {}
    for attention in attentions:
        base = dataclasses.replace(model_cfg, arch="llama", attention=attention, bias=False)
        if attention == "mha":
            out["mha"] = base
        else:
            out["mla-absorbed"] = dataclasses.replace(base, mla_absorb=True)
            out["mla-plain"] = dataclasses.replace(base, mla_absorb=False)
    for cfg in out.values():
        problems = cfg.problems()
        if problems:
            raise MoegptError("; ".join(problems))
    return out


def full_cache_bytes(model: GPT, batch: int, device: torch.device) -> int:
    """Bytes a cache holds once it is full (block_size tokens per sequence), measured on real buffers."""
    cache = KVCache()
    with torch.inference_mode():
        model(torch.zeros(batch, model.config.block_size, dtype=torch.long, device=device), cache=cache)
    return cache.nbytes()


def bench_cached_sampling(model_cfg: ModelConfig, moe_cfg: MoEConfig, attentions: list[str], device: torch.device,
                          new_tokens: int = 256, repeats: int = 5, prompt_len: int = 16) -> dict[str, Any]:
    configs = attention_configs(model_cfg, attentions)
    models = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        models[name] = GPT(cfg, moe_cfg).to(device).eval()
    prompt = torch.randint(0, model_cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(device)
    outputs: dict[str, torch.Tensor] = {}

    def case(name: str):
        def run() -> None:
            outputs[name] = generate(models[name], prompt, new_tokens, temperature=0, use_cache=True).tokens_BL
        return run

    times = interleaved_times({name: case(name) for name in models}, repeats, warmup=1, device=device)
    first = next(iter(times))
    rows = []
    for name, model in models.items():
        rows.append({"attention": name, "tokens_per_s": round(new_tokens / min(times[name]), 1),
                     "ratio_to_first": round(paired_ratio(times[first], times[name]), 3),
                     "cache_bytes_per_token": model.kv_cache_bytes_per_token(),
                     "cache_bytes_full_context": full_cache_bytes(model, 1, device),
                     "active_params": model.num_params()["active"]})
    same = "mla-plain" not in outputs or torch.equal(outputs["mla-absorbed"], outputs["mla-plain"])
    return {"new_tokens": new_tokens, "prompt_tokens": prompt_len, "repeats": repeats,
            "block_size": model_cfg.block_size, "mla_absorbed_same_tokens_as_plain": same, "rows": rows}
