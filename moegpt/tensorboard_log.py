"""Optional TensorBoard logging (the `[tb]` extra), fed by the trainer's event callback.

metrics.jsonl stays the source of truth; this mirrors its records into TensorBoard event files under
`<run>/tensorboard/`, for users who already live there:
  - every number of a log record as a scalar `train/<key>` and each MoE layer's numbers as
    `layer<i>/<key>`; evaluation records as `val/val_ce` and `val/best_val_ce`;
  - per log step, the distribution over MoE layers of max/mean expert load and of drop fraction as
    histograms `load/max_mean_load` and `load/drop_frac` (how unevenly the layers are balanced).
Both use the optimizer step as TensorBoard's step. A resumed run drops events after its resume step,
as metrics.jsonl does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moegpt.errors import MoegptError

TB_DIRNAME = "tensorboard"
HISTOGRAM_KEYS = ("max_mean_load", "drop_frac")


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "layer")}


class TensorBoardLogger:
    """An `on_event(kind, payload)` callback writing the trainer's log and eval records to TensorBoard."""

    def __init__(self) -> None:
        if not tensorboard_available():
            raise MoegptError("TensorBoard logging needs the tensorboard package: pip install 'moegpt[tb]'")
        self.writer = None
        self.log_dir: Path | None = None

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "start":
            self._open(Path(payload["run_dir"]) / TB_DIRNAME, int(payload.get("start_step") or 0))
        elif self.writer is None:
            return
        elif kind == "log":
            self._log(payload)
        elif kind == "eval":
            step = int(payload["step"])
            for key in ("val_ce", "best_val_ce"):
                self.writer.add_scalar(f"val/{key}", float(payload[key]), step)
            self.writer.flush()
        elif kind == "end":
            self.close()

    def _open(self, log_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.log_dir = log_dir
        # purge_step: events a killed run logged after its last checkpoint are superseded by the resumed run
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=start_step if start_step > 0 else None)

    def _log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in _numbers(record).items():
            self.writer.add_scalar(f"train/{key}", value, step)
        layers = record.get("layers") or []
        for entry in layers:
            for key, value in _numbers(entry).items():
                self.writer.add_scalar(f"layer{entry['layer']}/{key}", value, step)
        for key in HISTOGRAM_KEYS:
            values = [float(entry[key]) for entry in layers if key in entry]
            if values:
                self.writer.add_histogram(f"load/{key}", np.asarray(values), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
