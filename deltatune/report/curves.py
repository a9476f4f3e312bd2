"""Line plots of a metric against a setting (pruning amount, training step), written as PNG with
matplotlib's non-interactive backend, under a temporary name and renamed into place."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deltatune.fileio import atomic_path


@dataclass
class Series:
    """One line: its legend label and its (x, y) points (None y values are skipped)."""
    label: str
    points: Sequence[tuple[float, float | None]]


def plot_curves(series: Sequence[Series], path: str | Path, x_label: str, y_label: str,
                title: str, log_y: bool = False, marker: str | None = "o",
                log_x: bool = False) -> Path:
    """`marker=None` draws plain lines (long curves such as training loss per step)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=110)
    for line in series:
        points = [(x, y) for x, y in line.points if y is not None]
        if points:
            axes.plot([x for x, _ in points], [y for _, y in points], marker=marker,
                      label=line.label)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.set_title(title, fontsize=10)
    if log_y:
        axes.set_yscale("log")
    if log_x:
        axes.set_xscale("log")
    axes.grid(True, alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    pyplot.close(figure)
    return path
