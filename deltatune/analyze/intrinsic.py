"""`deltatune analyze intrinsic-dimension`: how many numbers fine-tuning really needs. One base
run config is trained once with full fine-tuning (the reference) and once per dimension d with
the subspace method (θ = θ₀ + P z, only the d entries of z train; deltatune/methods/subspace.py);
d90 is the smallest swept d whose metric reaches 90 % of full fine-tuning's (Li et al. 2018,
Aghajanyan et al. 2020), with a log-linear interpolation between the two swept d around it.

Each training is an ordinary run directory under the output folder (full/, d<d>/), so a sweep
that stops part-way resumes where it stopped: finished runs (summary.json present) are read, not
retrained. The curve (intrinsic.png), the table (intrinsic.md) and the numbers (summary.json) are
written under temporary names and renamed into place.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError
from deltatune.fileio import write_json, write_text

# Published d90 on MRPC (Aghajanyan et al. 2020, Table 1, structure-aware projection), shown next
# to the measured curve as the reference for its shape and scale.
PUBLISHED_MRPC_D90 = {"BERT-Base": 1608, "BERT-Large": 1037, "RoBERTa-Base": 896,
                      "RoBERTa-Large": 207}
THRESHOLD = 0.9


@dataclass
class IntrinsicRequest:
    """`base`: a run config (as `deltatune train --config` reads it: model, task, data, train,
    eval); `dimensions`: the d to sweep; `full_run`: an existing full fine-tune of the same config
    to use as the reference instead of training one; `learning_rate`: for z (it moves unit-length
    directions of the whole model, so it is far larger than a weight learning rate)."""
    base: dict[str, Any]
    dimensions: list[int]
    out: str
    full_run: str | None = None
    learning_rate: float = 0.1
    full_learning_rate: float | None = None
    projection_seed: int = 0
    include_embeddings: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def read_base_config(path: str) -> dict[str, Any]:
    from deltatune.spec import read_config_mapping
    return read_config_mapping(path, hint="pass a run config YAML (see examples/)")


def measure_intrinsic_dimension(request: IntrinsicRequest) -> dict[str, Any]:
    """Trains what is missing, then writes summary.json, intrinsic.md and intrinsic.png."""
    dimensions = _checked_dimensions(request.dimensions)
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    full = _summary_of(Path(request.full_run)) if request.full_run else \
        _train(request, out / "full", "full", {}, _full_learning_rate(request))
    metric = _headline(full["final_metrics"])
    rows = []
    for index, dimension in enumerate(dimensions):
        if request.progress:
            print(f"intrinsic dimension: d={dimension} ({index + 1}/{len(dimensions)})",
                  flush=True)
        options = {"dimension": dimension, "projection_seed": request.projection_seed,
                   "include_embeddings": request.include_embeddings}
        summary = _train(request, out / f"d{dimension}", "subspace", options,
                         request.learning_rate)
        rows.append({"dimension": dimension, "metrics": _numbers(summary["final_metrics"]),
                     "train_wall_seconds": summary["train_wall_seconds"],
                     "run": str(out / f"d{dimension}")})
    result = _result(request, full, metric, rows)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_json(out / "summary.json", result)
    write_text(out / "intrinsic.md", _markdown(result))
    _plot(result, out / "intrinsic.png")
    return result


def _full_learning_rate(request: IntrinsicRequest) -> float:
    """The reference's learning rate: the one given, else the base config's when it is a full
    fine-tune, else `deltatune compare`'s default for full fine-tuning (a LoRA config's 1e-3
    would wreck the full model)."""
    from deltatune.jobs.compare import DEFAULT_LEARNING_RATES
    if request.full_learning_rate is not None:
        return request.full_learning_rate
    configured = request.base.get("train", {}).get("learning_rate")
    if request.base.get("method") == "full" and configured is not None:
        return float(configured)
    return DEFAULT_LEARNING_RATES["full"]


def _checked_dimensions(dimensions: list[int]) -> list[int]:
    if not dimensions or any(isinstance(d, bool) or not isinstance(d, int) or d < 1
                             for d in dimensions):
        raise ConfigError(f"dimensions {dimensions} must be positive integers, e.g. "
                          "--dimensions 10,100,1000")
    return sorted(set(dimensions))


def _train(request: IntrinsicRequest, run: Path, method: str, options: dict[str, Any],
           learning_rate: float | None) -> dict[str, Any]:
    if (run / "summary.json").is_file():
        return _summary_of(run)
    from deltatune.jobs import run_training
    from deltatune.spec import parse_run_spec
    shutil.rmtree(run, ignore_errors=True)
    raw = copy.deepcopy(request.base)
    raw.update({"method": method, "method_options": options, "output_dir": str(run),
                "progress": request.progress})
    if learning_rate is not None:
        raw.setdefault("train", {})["learning_rate"] = learning_rate
    run_training(parse_run_spec(raw))
    return _summary_of(run)


def _summary_of(run: Path) -> dict[str, Any]:
    path = run / "summary.json"
    if not path.is_file():
        raise ConfigError(f"{run} has no summary.json; pass a finished run directory")
    summary = json.loads(path.read_text(encoding="utf-8"))
    summary["run"] = str(run)
    return summary


def _headline(metrics: dict[str, Any]) -> str:
    for name in ("accuracy", "exact_match"):
        if name in metrics:
            return name
    raise ConfigError(f"intrinsic dimension needs an accuracy-like metric where higher is "
                      f"better (accuracy, exact_match); the full run reported "
                      f"{sorted(metrics)}: use a classification task or an exact-match eval")


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _result(request: IntrinsicRequest, full: dict[str, Any], metric: str,
            rows: list[dict[str, Any]]) -> dict[str, Any]:
    full_value = full["final_metrics"][metric]
    target = THRESHOLD * full_value
    points = [(row["dimension"], row["metrics"][metric]) for row in rows]
    reached = [d for d, value in points if value >= target]
    return {"model": full.get("model"), "task": full.get("task"), "metric": metric,
            "full_run": full["run"], "full_metric": full_value,
            "full_trainable_parameters": full.get("trainable_parameters"),
            "threshold": THRESHOLD, "target": round(target, 6),
            "d90": reached[0] if reached else None,
            "d90_interpolated": _interpolated(points, target),
            "learning_rate": request.learning_rate, "projection_seed": request.projection_seed,
            "include_embeddings": request.include_embeddings, "dimensions": rows,
            "published_mrpc_d90": PUBLISHED_MRPC_D90}


def _interpolated(points: list[tuple[int, float]], target: float) -> float | None:
    """Where the curve crosses the target, linear in log d between the swept points around the
    first crossing; None when no swept d reaches it (or the smallest already does)."""
    for (d_low, low), (d_high, high) in zip(points, points[1:]):
        if low < target <= high:
            share = (target - low) / (high - low)
            return round(math.exp(math.log(d_low) + share * (math.log(d_high) -
                                                              math.log(d_low))), 1)
    return None


def _markdown(result: dict[str, Any]) -> str:
    metric = result["metric"]
    d90 = result["d90"]
    lines = [f"# Intrinsic dimension of {result['model']} on its task ({result['task']})", "",
             f"Full fine-tuning: {metric} {result['full_metric']:.4f} with "
             f"{result['full_trainable_parameters'] or 0:,} trainable parameters; 90 % of it is "
             f"{result['target']:.4f}.", "",
             f"**d90 = {d90 if d90 is not None else 'not reached'}**"
             + (f" (log-linear interpolation: {result['d90_interpolated']})"
                if result["d90_interpolated"] else ""), "",
             f"| d | {metric} | share of full | train s |", "|---:|---:|---:|---:|"]
    for row in result["dimensions"]:
        value = row["metrics"][metric]
        # A full fine-tune can score 0 (a tiny or broken run): no share of nothing.
        share = f"{value / result['full_metric']:.3f}" if result["full_metric"] else "—"
        lines.append(f"| {row['dimension']:,} | {value:.4f} | {share} | "
                     f"{row['train_wall_seconds']:.0f} |")
    lines += ["", "Published d90 on MRPC (Aghajanyan et al. 2020, structure-aware): " +
              ", ".join(f"{name} {value:,}" for name, value in
                        result["published_mrpc_d90"].items()) + "."]
    return "\n".join(lines) + "\n"


def _plot(result: dict[str, Any], path: Path) -> None:
    from deltatune.report.curves import Series, plot_curves
    metric = result["metric"]
    dims = [row["dimension"] for row in result["dimensions"]]
    series = [Series("subspace (d trained numbers)",
                     [(row["dimension"], row["metrics"][metric]) for row in result["dimensions"]]),
              Series("full fine-tuning", [(d, result["full_metric"]) for d in dims]),
              Series("90 % of full", [(d, result["target"]) for d in dims])]
    plot_curves(series, path, "subspace dimension d (log)", metric,
                f"Intrinsic dimension: d90 = {result['d90']}", log_x=True)
