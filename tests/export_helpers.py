"""Runs for the export tests: trained for a few steps by the real CLI, then given sharper weights.

A few steps leave weights near their initialisation, where logits are nearly flat and any greedy path
looks alike; noise on every weight makes logit and generation comparisons able to fail.
"""

from __future__ import annotations

from pathlib import Path

import torch
from typer.testing import CliRunner

from moegpt.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from moegpt.cli.main import app

runner = CliRunner()
BLOCK_SIZE = 48  # room for an 8-token prompt and 32 generated tokens


def train_run(data_root: Path, data_name: str, runs_root: Path, name: str, *flags: str, noise: float = 0.3) -> Path:
    result = runner.invoke(app, ["train", "--preset", "tiny", "--data", data_name, "--data-root", str(data_root),
                                 "--set", f"train.runs_root={runs_root}", "--name", name, "--max-iters", "2",
                                 "--block-size", str(BLOCK_SIZE), *flags])
    assert result.exit_code == 0, result.output
    run = runs_root / name
    if noise:
        path = resolve_checkpoint(run)
        state = load_checkpoint(path)
        generator = torch.Generator().manual_seed(0)
        for tensor in state["model"].values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * noise)
        save_checkpoint(path, state)
    return run
