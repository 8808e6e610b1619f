"""`inspect-routing --png`: a matplotlib heatmap of expert load per MoE layer (the `[plot]` extra)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from moegpt.errors import MoegptError, WriteFailed
from moegpt.safe_io import write_bytes


def require_matplotlib() -> None:
    """Fail early, in one line, when the optional plotting dependency is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoegptError("--png needs matplotlib, which is not installed: pip install 'moegpt[plot]'") from None


def write_heatmap_png(report: dict[str, Any], path: str | Path) -> Path:
    """Layers x experts, colour = load before drops relative to the uniform share (1 = fair share)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    layers = report["layers"]
    E = layers[0]["n_expert"]
    rel = [[load * E for load in layer["load_before_drops"]] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * E + 2), max(2.0, 0.45 * len(layers) + 1.5)))
    vmax = max(2.0, max(max(row) for row in rel))
    image = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_xticks(range(E))
    ax.set_yticks(range(len(layers)), [f"L{layer['layer']}" for layer in layers])
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    run = report["run"]
    ax.set_title(f"{run['variant']} E={E}: load / uniform share ({report['data']['tokens']:,} "
                 f"{report['data']['split']} tokens)", fontsize=9)
    for y, layer in enumerate(layers):
        for e in layer["dead_experts"]:
            ax.text(e, y, "×", ha="center", va="center", color="red", fontsize=10)
    fig.colorbar(image, ax=ax, label="load × E")
    fig.tight_layout()
    out = Path(path)
    try:
        image_png = io.BytesIO()  # rendered in memory: matplotlib can leave a write failure unreported
        fig.savefig(image_png, format="png", dpi=120)
        write_bytes(out, image_png.getvalue())
    except OSError as exc:
        raise WriteFailed(f"--png: cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out
