"""Named starting configurations and the one precedence rule: preset -> config file -> flags -> --set."""

from __future__ import annotations

import dataclasses
from typing import Any

from moegpt.config import RunConfig, apply_override, read_toml, section_from_dict
from moegpt.errors import MoegptError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The default: a MoE (8 experts, top-2, experts sized for equal active params with the dense
    # FFN) that trains on the built-in corpus in minutes on a 2-core CPU (README, quick start). Aux-free routing
    # (DeepSeek-V3's bias-balanced sigmoid gate): of the layouts swept in the README, the one that beats
    # the dense model at equal training time, not only at equal steps.
    "cpu": {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "vocab_size": 2048},
        "moe": {"variant": "aux-free", "n_expert": 8, "top_k": 2},
        "train": {"max_iters": 1400, "batch_size": 16, "lr": 2e-3, "warmup_iters": 100,
                  "eval_interval": 200, "eval_iters": 20, "ckpt_interval": 500},
    },
    # A small DeepSeek-V3-shaped model for the CPU: llama trunk (RoPE, RMSNorm), Multi-head Latent
    # Attention (a KV cache of kv_lora_rank + qk_rope_head_dim values per token and layer instead of
    # 2 * n_embd), a dense first layer, then aux-free MoE with fine-grained experts (16, top-4, each a
    # quarter of the dense FFN) and group-limited routing (4 groups, the best 2 eligible). Active
    # parameters equal the cpu preset's dense model to within 0.2%; same schedule as cpu.
    "deepseek": {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "vocab_size": 2048,
                  "arch": "llama", "attention": "mla", "kv_lora_rank": 64, "q_lora_rank": 0,
                  "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32},
        "moe": {"variant": "aux-free", "n_expert": 16, "top_k": 4, "n_group": 4, "topk_group": 2,
                "first_dense": 1},
        "train": {"max_iters": 1400, "batch_size": 16, "lr": 2e-3, "warmup_iters": 100,
                  "eval_interval": 200, "eval_iters": 20, "ckpt_interval": 500},
    },
    # Seconds, for tests and smoke runs.
    "tiny": {
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 2048},
        "moe": {"variant": "topk", "n_expert": 4, "top_k": 2},
        "train": {"max_iters": 20, "batch_size": 4, "lr": 3e-3, "warmup_iters": 2,
                  "eval_interval": 10, "eval_iters": 2, "log_interval": 5, "ckpt_interval": 10},
    },
    # About an hour on one GPU.
    "gpu-small": {
        "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "vocab_size": 8192},
        "moe": {"variant": "topk", "n_expert": 8, "top_k": 2},
        "train": {"max_iters": 5000, "batch_size": 64, "lr": 1e-3, "warmup_iters": 200,
                  "eval_interval": 500, "eval_iters": 50, "ckpt_interval": 1000},
    },
}


def preset_config(name: str) -> RunConfig:
    if name not in PRESETS:
        raise MoegptError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[name])


def merge_into(cfg: RunConfig, raw: dict[str, Any]) -> RunConfig:
    """Overlay a (possibly partial) config dict on cfg; unknown sections/keys raise."""
    merged = cfg.to_dict()
    for section, values in RunConfig.from_dict(raw).to_dict().items():
        present = raw.get(section, {})
        merged[section].update({k: v for k, v in values.items() if k in present})
    return RunConfig.from_dict(merged)


def resolve_config(preset: str = "cpu", config_path: str | None = None,
                   flags: dict[str, Any] | None = None, sets: list[str] | None = None,
                   validate: bool = True) -> RunConfig:
    """Build a run config: preset, then the TOML file, then flags ("section.key" -> value, None =
    not passed, so never overrides the file), then `--set section.key=value` assignments. validate=False
    leaves checking the whole config to whoever completes it (each case of `bench_quality`)."""
    cfg = preset_config(preset)
    if config_path:
        cfg = merge_into(cfg, read_toml(config_path))
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        section, key = dotted.split(".", 1)
        target = getattr(cfg, section)
        values = {**dataclasses.asdict(target), key: value}
        setattr(cfg, section, section_from_dict(type(target), values, section))
    for assignment in sets or []:
        apply_override(cfg, assignment)
    if not validate:
        return cfg
    from moegpt.moe import validate_run_config  # the registry imports torch: not needed for `--help`

    return validate_run_config(cfg)

