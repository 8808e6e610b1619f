"""What a resumed run starts from: the run's own saved config, and its learning-rate schedule.

A resume takes the run's saved `config.toml` as its base (data, model, MoE, optimisation), so `moegpt
train --name X --resume` works as printed for a run on any corpus; flags given with it override only
what they name, and the trainer still refuses changes that resuming does not allow. A longer or shorter
`max_iters` on resume keeps the cosine decay's saved horizon, unless `train.lr_decay_iters` is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moegpt.config import RunConfig

CONFIG_NAME = "config.toml"
# train-section keys a resumed run may change; everything else must match the checkpoint
RESUMABLE_TRAIN_KEYS = {"max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
                        "keep_ckpts", "device", "compile", "name", "runs_root", "lr_decay_iters",
                        "expert_parallel"}


def config_differences(saved: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """Keys whose values differ between a checkpoint's config and this run's (run-length keys excepted)."""
    out = []
    for section in ("model", "moe", "data", "train"):
        old, new = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in RESUMABLE_TRAIN_KEYS:
                continue
            if old.get(key) != new.get(key):
                out.append(f"{section}.{key} ({old.get(key)!r} -> {new.get(key)!r})")
    return out


def saved_config_path(cfg: RunConfig) -> Path | None:
    """runs_root/<name>/config.toml of the run a resume would continue, when it exists."""
    name = cfg.train.name or cfg.moe.variant  # an unnamed resume continues runs/<variant>
    path = Path(cfg.train.runs_root) / name / CONFIG_NAME
    return path if path.is_file() else None


# How a run is launched, not what it trains: a resume takes these from its own command line (or their
# defaults), never from the saved run, since the same run may continue on another number of processes.
LAUNCH_KEYS = ("train.expert_parallel",)


def resume_config(cfg: RunConfig, given: set[str]) -> RunConfig:
    """The saved run's config as the base of a resume, with the launch keys not given on this command line
    back at their defaults."""
    defaults = RunConfig()
    for dotted in LAUNCH_KEYS:
        if dotted not in given:
            section, key = dotted.split(".")
            setattr(getattr(cfg, section), key, getattr(getattr(defaults, section), key))
    return cfg


def keep_decay_horizon(cfg: RunConfig, saved: dict[str, Any]) -> str | None:
    """Keep the checkpoint's cosine horizon when only max_iters changed; a note saying what happened."""
    saved_train = saved.get("train", {})
    saved_horizon = int(saved_train.get("lr_decay_iters") or saved_train.get("max_iters") or 0)
    t = cfg.train
    if not saved_horizon:
        return None
    if t.lr_decay_iters:
        if t.lr_decay_iters == saved_horizon:
            return None
        return (f"note: the cosine learning-rate decay now ends at step {t.lr_decay_iters} "
                f"(it ended at step {saved_horizon})")
    if t.max_iters == saved_horizon:
        return None
    t.lr_decay_iters = saved_horizon
    return (f"note: max_iters changed from {saved_train.get('max_iters')} to {t.max_iters}; the learning rate "
            f"keeps its cosine decay to step {saved_horizon} (set train.lr_decay_iters to reshape it)")
