"""The run folder: which folder a run writes to, and its metrics.jsonl cut back to a resume step."""

from __future__ import annotations

import json
from pathlib import Path

from moegpt.config import RunConfig
from moegpt.errors import MoegptError
from moegpt.safe_io import read_jsonl, write_text_atomic


def resolve_run_dir(cfg: RunConfig, resume: str) -> Path:
    """runs/<name>. Without --name the variant names the run and a fresh run never reuses a folder."""
    root = Path(cfg.train.runs_root)
    if cfg.train.name:
        run_dir = root / cfg.train.name
        if resume == "no" and has_checkpoints(run_dir):
            raise MoegptError(f"{run_dir} already has checkpoints: pass --resume to continue it, "
                              "or --name NEW for a new run")
        return run_dir
    base = root / cfg.moe.variant
    if resume != "no":
        return base
    run_dir, n = base, 2
    while run_dir.exists() and any(run_dir.iterdir()):
        run_dir, n = root / f"{cfg.moe.variant}-{n}", n + 1
    return run_dir


def has_checkpoints(run_dir: Path) -> bool:
    return (run_dir / "ckpt").is_dir() and any((run_dir / "ckpt").glob("*.pt"))


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Drop records after the resume step (a run killed after its last checkpoint logged more), and a
    last line torn by a kill or a full disk."""
    if not path.exists():
        return
    if keep_through_step == 0:
        path.unlink()
        return
    kept = [record for record in read_jsonl(path) if record.get("step", 0) <= keep_through_step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
