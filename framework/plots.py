"""Pictures written to the output directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_lr_curves(panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                   steps_per_epoch: int | None = None, columns: int = 4) -> Path:
    """One subplot per panel, one line per curve (LR against optimizer step); returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        for label, lrs in curves.items():
            ax.plot(range(len(lrs)), lrs, label=label, linewidth=1.6)
        ax.set_title(title)
        ax.set_xlabel("optimizer step" + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else ""))
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
