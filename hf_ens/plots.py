"""Pyplot-free PNG figures: what the library draws with (`hf_ens.basin.plot_profile`) and the recipes too.

The recipes' own plots (learning-rate schedule, metrics vs ensemble size, the basin probe) are in
``recipes/plots.py``. Figures are built with `matplotlib.figure.Figure` (Agg canvas), never `pyplot`, so the
library neither needs a display nor changes the backend of a notebook that imports it. Files are written
atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

from ._io import atomic_file


def new_figure(ncols: int = 1, width: float = 4.5, height: float = 3.4):
    """A pyplot-free figure with `ncols` side-by-side axes (returned as a list)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` as PNG to `path` atomically (`hf_ens._io.atomic_file`: ordinary modes, old or new file)."""
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return path
