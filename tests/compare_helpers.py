"""Hand-written runs for the compare tests: config.toml, metrics.jsonl and a data folder's meta.json.

THREE_RUNS is a dense, a topk and a switch run whose leaderboard values are worked out by hand in
test_compare.py (equal step 25, equal training time 3.0 s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moegpt.presets import resolve_config


def write_data_meta(data_root: Path, name: str = "tiny", source: str = "s" * 64, tokenizer: str = "t" * 64,
                    kind: str = "char", vocab: int = 28) -> Path:
    folder = data_root / name
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"source": {"sha256": source}, "tokenizer": {"kind": kind, "sha256": tokenizer, "vocab_size": vocab},
            "vocab_size": vocab}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def log_record(step: int, train_s: float | None, loss: float, loads: list[float] | None = None,
               drops: list[float] | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "tokens": step * 100, "lr": 1e-3, "loss": loss, "loss_ce": loss,
                              "balance": 0.0, "z": 0.0, "seq_balance": 0.0, "grad_norm": 1.0,
                              "tokens_per_s": 250.0 * (1 + step % 3)}
    record["layers"] = [{"layer": i, "balance": 1.0, "z": 1.0, "max_mean_load": load,
                         "drop_frac": (drops or [0.0] * len(loads))[i], "router_entropy": 0.9}
                        for i, load in enumerate(loads or [])]
    if train_s is not None:
        record.update(train_s=train_s, wall_s=train_s + 0.5)
    return record


def eval_record(step: int, train_s: float | None, val: float, best: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "tokens": step * 100, "val_ce": val, "best_val_ce": best}
    if train_s is not None:
        record.update(train_s=train_s, wall_s=train_s + 0.5)
    return record


def write_run(runs_root: Path, name: str, variant: str, records: list[dict[str, Any]], data_root: Path,
              data_name: str = "tiny", vocab: int = 28, tail: str = "") -> Path:
    run = runs_root / name
    run.mkdir(parents=True, exist_ok=True)
    cfg = resolve_config("tiny", sets=[f"moe.variant={variant}", f"data.data_root={data_root}",
                                       f"data.name={data_name}", f"model.vocab_size={vocab}", f"train.name={name}"])
    cfg.save(run / "config.toml")
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run


def three_runs(tmp_path: Path, timed: bool = True) -> tuple[Path, Path]:
    """(runs root, data root) holding runs `dense` (30 steps), `topk` (40 steps) and `switch` (25 steps)."""
    data_root, runs = tmp_path / "data", tmp_path / "runs"
    write_data_meta(data_root)

    def t(seconds: float) -> float | None:
        return seconds if timed else None

    dense = [log_record(10, t(1.0), 3.1), eval_record(10, t(1.0), 3.0, 3.0), log_record(20, t(2.0), 2.6),
             eval_record(20, t(2.0), 2.5, 2.5), log_record(30, t(3.0), 2.3), eval_record(30, t(3.0), 2.2, 2.2)]
    topk = [log_record(10, t(2.0), 3.0, [1.9, 3.0]), eval_record(10, t(2.0), 2.9, 2.9),
            log_record(20, t(4.0), 2.5, [1.7, 2.8]), eval_record(20, t(4.0), 2.4, 2.4),
            log_record(30, t(6.0), 2.1, [1.6, 2.6]), eval_record(30, t(6.0), 2.0, 2.0),
            log_record(40, t(8.0), 2.0, [1.5, 2.5]), eval_record(40, t(8.0), 1.9, 1.9)]
    switch = [log_record(10, t(1.5), 3.0, [1.4, 2.0], [0.2, 0.4]), eval_record(10, t(1.5), 2.95, 2.95),
              log_record(20, t(3.0), 2.5, [1.3, 1.9], [0.1, 0.3]),
              log_record(25, t(3.5), 2.4, [1.2, 1.8], [0.1, 0.3]), eval_record(25, t(3.5), 2.3, 2.3)]
    for name, records in (("dense", dense), ("topk", topk), ("switch", switch)):
        write_run(runs, name, name, records, data_root)
    return runs, data_root
