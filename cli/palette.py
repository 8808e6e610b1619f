"""The one colour scheme for experts, shared by `sample --show-routing` and `inspect-routing`.

Expert e is EXPERT_PALETTE[e % len]: matplotlib's tab20 order (strong hues first). Text coloured by
expert uses it as a background with black text (so whitespace tokens show their expert too); legends,
table rows and heatmap headers use it as the foreground. A token with no expert (every choice dropped)
is grey in both.
"""

from __future__ import annotations

EXPERT_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                  "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94")
NO_EXPERT_STYLE = "white on grey23"


def expert_colour(expert: int) -> str:
    return EXPERT_PALETTE[expert % len(EXPERT_PALETTE)]


def expert_style(expert: int) -> str:
    """Foreground style of an expert's label (legends, tables, heatmap headers)."""
    return "dim strike" if expert < 0 else f"bold {expert_colour(expert)}"


def token_style(expert: int, prompt: bool = False) -> str:
    """Background style of a token written by `expert` (prompt tokens underlined)."""
    base = NO_EXPERT_STYLE if expert < 0 else f"black on {expert_colour(expert)}"
    return base + (" underline" if prompt else "")
