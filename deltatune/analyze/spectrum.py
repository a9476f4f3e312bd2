"""`deltatune analyze spectrum`: the singular-value spectrum of every changed linear layer's
ΔW in a run, summarised per layer and per layer kind (query, value, feed-forward, ... averaged
over blocks): the rank that keeps 50 / 90 / 99 % of the energy, as a table (spectrum.md), the
numbers (spectrum.json) and a plot of the cumulative energy against the rank (spectrum.png)."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.analyze.delta import ENERGY_SHARES, layer_kind, layer_spectrum, load_run_deltas
from deltatune.fileio import checked_output_folder, move_folder_into_place, write_json, write_text

PLOTTED_RANKS = 64


@dataclass
class SpectrumRequest:
    run: str
    out: str
    overwrite: bool = False
    progress: bool = True


def analyze_spectrum(request: SpectrumRequest) -> dict[str, Any]:
    """Writes spectrum.json/.md/.png into `request.out`; returns the summary (no per-layer
    singular values: those are in the file)."""
    out = checked_output_folder(request.out, request.overwrite, [request.run], "the run")
    started = time.perf_counter()
    deltas = load_run_deltas(request.run)
    layers = [layer_spectrum(layer) for layer in _bar(deltas.layers, request.progress)]
    summary = {"run": str(request.run), "model": deltas.spec.model,
               "method": deltas.spec.method, "layers": len(layers),
               "energy_split": deltas.energy_split, "kinds": _by_kind(layers)}
    summary["seconds"] = round(time.perf_counter() - started, 1)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".spectrum", dir=out.parent))
    try:
        folder = staging / out.name
        folder.mkdir()
        write_json(folder / "spectrum.json", {**summary, "per_layer": layers})
        write_text(folder / "spectrum.md", _markdown(summary, layers))
        _plot(summary, folder / "spectrum.png")
        move_folder_into_place(folder, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _bar(items, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc="SVD of ΔW", unit="layer")


def _by_kind(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for layer in layers:
        groups.setdefault(layer_kind(layer["layer"]), []).append(layer)
    kinds = []
    for kind, members in groups.items():
        length = min(len(m["cumulative_energy"]) for m in members)
        curve = [sum(m["cumulative_energy"][i] for m in members) / len(members)
                 for i in range(min(length, PLOTTED_RANKS))]
        kinds.append({"kind": kind, "layers": len(members), "shape": members[0]["shape"],
                      **{f"rank_{round(s * 100)}_mean": round(
                          sum(m[f"rank_{round(s * 100)}"] for m in members) / len(members), 1)
                         for s in ENERGY_SHARES},
                      "mean_cumulative_energy": [round(v, 4) for v in curve]})
    return kinds


def _markdown(summary: dict[str, Any], layers: list[dict[str, Any]]) -> str:
    lines = [f"# ΔW spectrum of {summary['run']} ({summary['method']}, {summary['model']})", "",
             "Rank needed to keep 50 / 90 / 99 % of each layer's update energy (‖ΔW‖²), "
             "averaged over the blocks.", "",
             "| layer kind | layers | shape | full rank | rank 50 % | rank 90 % | rank 99 % |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for kind in summary["kinds"]:
        lines.append(f"| {kind['kind']} | {kind['layers']} | {'×'.join(map(str, kind['shape']))}"
                     f" | {min(kind['shape'])} | {kind['rank_50_mean']} | {kind['rank_90_mean']}"
                     f" | {kind['rank_99_mean']} |")
    lines += ["", "| layer | ‖ΔW‖ | rank 50 % | rank 90 % | rank 99 % |",
              "|---|---:|---:|---:|---:|"]
    for layer in layers:
        lines.append(f"| {layer['layer']} | {layer['frobenius']:.4f} | {layer['rank_50']} | "
                     f"{layer['rank_90']} | {layer['rank_99']} |")
    return "\n".join(lines) + "\n"


def _plot(summary: dict[str, Any], path: Path) -> None:
    from deltatune.report.curves import Series, plot_curves
    series = [Series(kind["kind"], [(i + 1, v) for i, v in
                                    enumerate(kind["mean_cumulative_energy"])])
              for kind in summary["kinds"]]
    plot_curves(series, path, "rank", "share of ΔW energy kept",
                f"ΔW spectrum of {Path(summary['run']).name} (mean over blocks)")
