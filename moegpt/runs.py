"""Open a trained run (or one checkpoint file) for sampling and inspection, without modifying it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moegpt.checkpoint import load_checkpoint, resolve_checkpoint
from moegpt.config import RunConfig
from moegpt.errors import MoegptError
from moegpt.model import GPT
from moegpt.moe import native
from moegpt.tokenizer import Tokenizer, load_tokenizer


@dataclass
class LoadedRun:
    model: GPT  # in eval mode, on the requested device
    config: RunConfig
    checkpoint: Path
    state: dict[str, Any]  # the checkpoint's contents other than weights (step, best_val, data_ref, ...)

    @property
    def run_dir(self) -> Path:
        return self.checkpoint.parent.parent if self.checkpoint.parent.name == "ckpt" else self.checkpoint.parent

    @property
    def data_dir(self) -> Path:
        return Path(self.state["data_ref"]["data_dir"])

    def prepared_data_dir(self) -> Path:
        """The run's prepared data folder: its recorded path, else data_root/name from its config (a run
        copied to another machine, or a data folder moved with its project)."""
        for candidate in (self.data_dir, Path(self.config.data.data_root) / self.config.data.name):
            if (candidate / "meta.json").exists():
                return candidate
        raise MoegptError(f"the run's data folder {self.data_dir} is gone; re-create it with `moegpt prepare` "
                          f"(name {self.config.data.name!r})")

    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the data the run was trained on (from the checkpoint's data reference)."""
        return load_tokenizer(self.prepared_data_dir())


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A run folder resolves to its best (else latest) checkpoint; a .pt file is used as is."""
    checkpoint = resolve_checkpoint(path)
    state = load_checkpoint(checkpoint, map_location="cpu")
    for key in ("model", "config", "data_ref"):
        if key not in state:
            raise MoegptError(f"{checkpoint} is not a moegpt training checkpoint (no {key!r})")
    config = RunConfig.from_dict(state.pop("config"))
    try:
        model = GPT(config.model, config.moe)
        model.load_state_dict(state.pop("model"))
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:  # weights that do not fit the saved config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MoegptError(f"{checkpoint}: cannot load the run's model: {first}") from None
    state.pop("optimizer", None)
    state["config"] = config.to_dict()
    native.prepare(device)  # before sampling's clock starts
    return LoadedRun(model=model.to(device).eval(), config=config, checkpoint=checkpoint, state=state)
