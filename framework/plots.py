"""Pictures written to the output directory (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def plot_lr_curves(panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path,
                   steps_per_epoch: int | None = None, columns: int = 4) -> Path:
    """One subplot per panel, one line per curve (LR against optimizer step); returns the PNG's path."""
    plt = _pyplot()
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
    return _save(figure, path)


def plot_lr_finder(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                   suggestions: Mapping[str, float], path: str | Path) -> Path:
    """The LR range test: loss and smoothed loss against LR (log axis), the suggested LRs as dashed lines."""
    figure, ax = _pyplot().subplots(figsize=(6.5, 4))
    ax.plot(lrs, losses, alpha=0.3, label="loss")
    ax.plot(lrs, smoothed, label="smoothed loss")
    for color, (name, lr) in zip(("C2", "C3"), suggestions.items()):
        ax.axvline(lr, linestyle="--", color=color, label=f"{name}: {lr:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_ylim(min(smoothed) * 0.9, min(max(smoothed), 4 * min(smoothed)) * 1.1)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return _save(figure, path)


def plot_image_grid(rows: Sequence[Sequence], column_titles: Sequence[str], path: str | Path) -> Path:
    """Images as a grid (each a (C, H, W) tensor in [0, 1]), one title per column; returns the PNG's path."""
    plt = _pyplot()
    columns = len(rows[0])
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.3 * len(rows)), squeeze=False)
    for row, images in zip(axes, rows):
        for ax, image in zip(row, images):
            pixels = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            ax.imshow(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], column_titles):
        ax.set_title(title, fontsize="small")
    return _save(figure, path)


def plot_gradient_flow(stats: Mapping[str, tuple[float, float]], path: str | Path,
                       title: str = "gradient flow") -> Path:
    """The classic gradient-flow figure: per layer (input to output), a bar of max |grad| behind a bar of mean |grad|,
    on a log axis (a vanishing gradient shows as bars falling by decades towards the input). A layer whose gradient
    is exactly zero has no height on a log axis: it is marked with a red x on the floor. Returns the PNG's path."""
    plt = _pyplot()
    names = list(stats)
    means = [float(mean) for mean, _ in stats.values()]
    maxima = [float(top) for _, top in stats.values()]
    positive = [v for v in means + maxima if v > 0]
    floor = min(positive) / 10 if positive else 1e-12
    figure, ax = plt.subplots(figsize=(min(max(6.0, 0.3 * len(names) + 2), 30.0), 4.5))
    x = range(len(names))
    ax.bar(x, [max(v, floor) for v in maxima], color="C0", alpha=0.35, label="max |grad|")
    ax.bar(x, [max(v, floor) for v in means], color="C0", alpha=0.9, width=0.5, label="mean |grad|")
    zeros = [i for i, top in enumerate(maxima) if top <= 0]
    if zeros:
        ax.plot(zeros, [floor] * len(zeros), "x", color="C3", markersize=9, label="zero gradient")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize="small")
    ax.set_xlim(-0.75, len(names) - 0.25)
    ax.set_ylabel("|gradient|")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over a bar
    return _save(figure, path)
