"""Figures as every report writes them: matplotlib without a display, saved atomically as PNG.

Used by the audit, training curves, evaluation, Grad-CAM and the benchmark report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.atomic import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (servers and CI have no display); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, dpi: int = 100, tight: bool = False) -> str:
    """Write `fig` atomically as a PNG and close it; returns the file name (for Markdown links)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    pyplot().close(fig)
    return Path(path).name


def draw_confusion(ax, matrix, labels, fmt: str = "{:d}", vmax: float | None = None, fontsize: float | None = None) -> None:
    """A confusion matrix (rows true, columns predicted) on `ax`: shaded cells with their values written in."""
    matrix = np.asarray(matrix)
    top = vmax if vmax is not None else max(matrix.max(), 1)
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=top)
    ax.set_xticks(range(len(labels)), labels, fontsize=fontsize)
    ax.set_yticks(range(len(labels)), labels, fontsize=fontsize)
    high = matrix.max() / 2 if matrix.max() else 0.5
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, fmt.format(v.item()), ha="center", va="center", fontsize=fontsize,
                color="white" if v > high else "black")
