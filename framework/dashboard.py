"""A run's dashboard as one picture, from its metrics.jsonl (no W&B needed): loss and accuracy, LR, gradient norm
before/after clipping, throughput and data wait, memory, validation metrics.

    python -m framework.dashboard outputs/image_classification      # writes outputs/image_classification/dashboard.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from framework.plots import _pyplot, _save

PANELS = {
    "loss": ["train/loss", "val/loss"],
    "accuracy": ["train/accuracy", "val/accuracy"],
    "learning rate": ["lr"],
    "gradient norm": ["grad_norm", "grad_norm_clipped"],
    "throughput (samples/s)": ["samples_per_second"],
    "data wait (share of time)": ["perf/data_wait"],
    "memory (MB)": ["memory/rss_mb", "memory/cuda_max_allocated_mb"],
    "doctor findings": [],  # filled with the doctor/* keys present
}


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_dashboard(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per group of metrics against the optimizer step; empty panels are left out."""
    plt = _pyplot()
    doctor = sorted({key for row in rows for key in row if key.startswith("doctor/")})
    panels = {name: (keys or doctor) for name, keys in PANELS.items()}
    panels = {name: keys for name, keys in panels.items() if any(key in row for row in rows for key in keys)}
    columns = 3
    figure_rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(figure_rows, columns, figsize=(4.4 * columns, 2.9 * figure_rows), squeeze=False)
    for ax, (name, keys) in zip(axes.flat, panels.items()):
        for key in keys:
            points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float))]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        if name == "learning rate" or name == "gradient norm":
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a run's output directory (holding metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default: OUTPUT_DIR/dashboard.png)")
    args = parser.parse_args(argv)
    run = Path(args.output_dir)
    path = plot_dashboard(read_metrics(run / "metrics.jsonl"), args.out or run / "dashboard.png", title=run.name)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
