"""The comparison report's figures, as PNG files (matplotlib, Agg backend, atomic writes): every
run's training loss per step, and the compared metric against each cost — trainable parameters,
peak memory, training wall time — with the Pareto front marked (filled points joined by a
dashed line; dominated variants hollow). The Markdown report links the files; the HTML report
embeds the same bytes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from deltatune.fileio import atomic_path
from deltatune.report.comparison import COSTS, Comparison, Row
from deltatune.report.curves import Series, plot_curves
from deltatune.report.pareto import Point, pareto_optimal

# Loss curves with more logged points than this are drawn without markers.
MARKER_LIMIT = 40
_COST_SCALE = {"trainable_parameters": (1.0, "count"), "peak_memory_bytes": (2 ** 20, "MiB"),
               "train_wall_seconds": (1.0, "s")}


@dataclass
class Figure:
    key: str
    title: str
    path: Path


def write_figures(comparison: Comparison, out: Path) -> list[Figure]:
    figures = [_loss_figure(comparison.rows, out)]
    for key, label, short in COSTS:
        path = out / f"metric_vs_{short}.png"
        title = f"{comparison.metric} vs {label} (Pareto front marked)"
        _scatter(comparison, key, label, path, title)
        figures.append(Figure(f"metric-vs-{short}", title, path))
    return figures


def _loss_figure(rows: Sequence[Row], out: Path) -> Figure:
    series = [Series(row.name, row.run.losses) for row in rows if row.run.losses]
    longest = max((len(s.points) for s in series), default=0)
    path = out / "loss_curves.png"
    title = "training loss per optimizer step"
    plot_curves(series, path, "optimizer step", "training loss", title,
                marker="o" if longest <= MARKER_LIMIT else None)
    return Figure("loss-curves", title, path)


def _scatter(comparison: Comparison, key: str, label: str, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    scale, unit = _COST_SCALE[key]
    rows = [r for r in comparison.rows if r.metric is not None and r.run.number(key) is not None]
    xs = [r.run.number(key) / scale for r in rows]
    ys = [r.metric for r in rows]
    front = set(pareto_optimal([Point(y, (x,)) for x, y in zip(xs, ys)],
                               comparison.higher_is_better))
    figure, axes = pyplot.subplots(figsize=(6.4, 4.2), dpi=110)
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (row, x, y) in enumerate(zip(rows, xs, ys)):
        color = colors[index % len(colors)]
        on_front = index in front
        axes.scatter([x], [y], s=70, color=color if on_front else "white", edgecolors=color,
                     linewidths=2, zorder=3, label=row.name + (" (Pareto)" if on_front else ""))
        axes.annotate(row.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ordered = sorted((xs[i], ys[i]) for i in front)
    if len(ordered) > 1:
        axes.plot([x for x, _ in ordered], [y for _, y in ordered], linestyle="--",
                  color="0.4", linewidth=1, zorder=2, drawstyle="steps-post")
    if key == "trainable_parameters" and xs and min(xs) > 0:
        axes.set_xscale("log")
    else:
        axes.ticklabel_format(axis="x", useOffset=False, style="plain")
    axes.ticklabel_format(axis="y", useOffset=False)
    axes.set_xlabel(f"{label} ({unit}{', log scale' if axes.get_xscale() == 'log' else ''})")
    better = "higher" if comparison.higher_is_better else "lower"
    axes.set_ylabel(f"{comparison.metric} ({better} is better)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.15, y=0.15)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    pyplot.close(figure)
