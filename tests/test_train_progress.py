"""The training progress bar moves every step, shows an ETA from the first steps, and keeps the step
counter and ETA visible at 80 columns."""

from __future__ import annotations

import io
import re

from rich.console import Console
from test_train import tiny_cfg

from moegpt.cli.train import progress_info, training_progress
from moegpt.train import Trainer


def test_trainer_reports_every_step(tiny_data, tmp_path, single_thread):
    cfg = tiny_cfg(tiny_data, tmp_path / "runs", max_iters=3, log_interval=10, eval_interval=10)
    events: list[tuple[str, dict]] = []
    Trainer(cfg, on_event=lambda kind, payload: events.append((kind, payload))).run()
    assert [p["step"] for kind, p in events if kind == "step"] == [1, 2, 3]


def test_step_counter_and_eta_fit_80_columns():
    clock = iter(float(t) for t in range(1000))
    console = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    progress = training_progress(console, get_time=lambda: next(clock), auto_refresh=False)
    task = progress.add_task("train", total=1400, completed=0, info="")
    for step in (1, 2, 3):
        progress.update(task, completed=step,
                        info=progress_info({"loss": 7.1234, "loss_ce": 7.0, "lr": 2e-3, "tokens_per_s": 5432.1},
                                           6.9))
    out = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    out.print(progress.make_tasks_table(progress.tasks))
    line = out.export_text().splitlines()[0]
    assert len(line) <= 80
    assert "3/1400" in line and re.search(r"\d:\d\d:\d\d", line), line
    assert "loss 7.000" in line, line
