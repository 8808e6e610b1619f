"""The per-layer load bars under `moegpt train`'s progress bar."""

from __future__ import annotations

import io
import math

import pytest
from rich.console import Console, Group

from moegpt.cli.load_view import load_fraction, load_view
from moegpt.cli.train import TrainRenderer
from moegpt.moe import layer_facts
from moegpt.presets import resolve_config


def layers(n: int, load: float = 2.0, drop: float = 0.0) -> list[dict]:
    return [{"layer": i, "max_mean_load": load + i / 10, "drop_frac": drop} for i in range(n)]


def test_fraction_is_log_scaled_between_balanced_and_collapsed():
    assert load_fraction(1.0, 8) == 0.0 and load_fraction(8.0, 8) == 1.0 and load_fraction(20.0, 8) == 1.0
    assert load_fraction(2.0, 8) == pytest.approx(math.log(2) / math.log(8))
    assert load_fraction(0.0, 8) == 0.0 and load_fraction(3.0, 1) == 0.0


@pytest.mark.parametrize("width", [60, 80, 100, 200])
def test_view_fits_the_terminal_and_never_exceeds_100_columns(width):
    text = load_view(layers(12, drop=0.12), n_expert=8, width=width).plain
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= min(width, 100)
    assert all(f"L{i} " in text for i in range(12)) and "d12%" in text and "2.00" in text


def start_payload(variant: str = "topk") -> dict:
    cfg = resolve_config("tiny", sets=[f"moe.variant={variant}"])
    return {"config": cfg.to_dict(), "moe_facts": layer_facts(cfg.model, cfg.moe),
            "params": {"total": 1, "active": 1}, "run_dir": "runs/x", "device": "cpu",
            "precision": "fp32", "world_size": 1, "resumed_from": None, "start_step": 0, "moe_layers": [0, 1]}


def log_payload() -> dict:
    return {"step": 5, "loss": 3.0, "loss_ce": 2.9, "lr": 1e-3, "tokens_per_s": 100.0, "layers": layers(2)}


def rendered(renderer: TrainRenderer) -> str:
    out = Console(file=io.StringIO(), width=100, record=True)
    out.print(Group(*renderer.progress.get_renderables()))
    return out.export_text()


@pytest.mark.parametrize("width, flag, shown", [(100, None, True), (80, None, False), (80, True, True),
                                                (120, False, False)])
def test_bars_follow_the_flag_or_the_terminal_width(width, flag, shown):
    console = Console(file=io.StringIO(), force_terminal=True, width=width)
    renderer = TrainRenderer(console, max_iters=10, show_load=flag)
    renderer.on_start(start_payload())
    renderer.on_log(log_payload())
    try:
        assert ("L1  ▕" in rendered(renderer)) == shown
    finally:
        renderer.stop()


def test_no_bars_when_output_is_not_a_terminal():
    out = io.StringIO()
    renderer = TrainRenderer(Console(file=out, width=200), max_iters=10, show_load=True)
    renderer.on_start(start_payload())
    renderer.on_log(log_payload())
    assert renderer.progress is None and "▕" not in out.getvalue() and "max/mean load 2.00 2.10" in out.getvalue()
