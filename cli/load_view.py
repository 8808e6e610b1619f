"""The live per-layer load-balance view under `moegpt train`'s progress bar.

One small bar per MoE layer, updated at each log step: the layer's max/mean expert load on a log
scale from 1 (every expert equally busy) to E (everything on one expert), so the early, common
imbalances of 1.2-3 are visible rather than squeezed against the left end.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from rich.console import RenderableType
from rich.progress import Progress
from rich.text import Text

MAX_WIDTH = 100  # the view stays inside a 100-column terminal whatever the console's width
BAR_WIDTH = 10
CELL_WIDTH = 26  # "L11 ▕██████████▏ 12.34 d12%" plus a gap
PARTIALS = " ▏▎▍▌▋▊▉█"


def load_fraction(max_mean_load: float, n_expert: int) -> float:
    """Position of max/mean load between balanced (1 -> 0.0) and collapsed (E -> 1.0), log scale."""
    if n_expert <= 1 or max_mean_load <= 1:
        return 0.0
    return min(1.0, math.log(max_mean_load) / math.log(n_expert))


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    eighths = round(fraction * width * 8)
    full, rest = divmod(eighths, 8)
    return ("█" * full + (PARTIALS[rest] if rest else "")).ljust(width)


def load_style(max_mean_load: float) -> str:
    return "green" if max_mean_load < 1.5 else "yellow" if max_mean_load < 3 else "red"


def load_view(layers: list[dict[str, Any]], n_expert: int, width: int) -> Text:
    """The layers of one log record as rows of cells `L3 ▕███▌      ▏ 1.42 d2%` fitting `width` columns."""
    per_line = max(1, (min(width, MAX_WIDTH) - 5) // CELL_WIDTH)
    text = Text()
    for i, entry in enumerate(layers):
        if i % per_line == 0:
            text.append("\n" if i else "")
            text.append("load ", style="dim")
        load = float(entry.get("max_mean_load", 0.0))
        drop = float(entry.get("drop_frac", 0.0))
        text.append(f"L{entry['layer']:<2} ▕")
        text.append(bar(load_fraction(load, n_expert)), style=load_style(load))
        text.append(f"▏{load:5.2f}")
        text.append(f" d{drop:.0%}".ljust(5) if drop > 0 else " " * 5, style="yellow")
        text.append(" ")
    return text


class LoadProgress(Progress):
    """A rich Progress that draws the latest load view below its task bar."""

    def __init__(self, *columns: Any, n_expert: int, **kwargs: Any) -> None:
        self.n_expert = n_expert
        self.layers: list[dict[str, Any]] = []
        super().__init__(*columns, **kwargs)  # draws once: the attributes above must exist

    def show_layers(self, layers: list[dict[str, Any]]) -> None:
        self.layers = layers
        self.refresh()

    def get_renderables(self) -> Iterable[RenderableType]:
        yield from super().get_renderables()
        if self.layers:
            yield load_view(self.layers, self.n_expert, self.console.width)
