"""LoRA extraction: the truncated SVD of a run's ΔW at rank r, written as an ordinary LoRA
adapter (PEFT's files) on the run's base model. For each changed linear layer,
ΔW ≈ U_r·S_r·V_rᵀ = B·A with B = U_r·√S_r and A = √S_r·V_rᵀ, alpha = r (scaling 1); by
Eckart–Young no rank-r matrix is closer to ΔW in Frobenius norm. The changed biases of those
layers are kept exactly (bias="lora_only") and modules the task trains whole (a classification
head) are saved whole (modules_to_save), as PEFT does; changes to embeddings and norms are not
representable as LoRA on linear layers and are dropped — `delta.RunDeltas.energy_split` says
how much of the update that is.

`extract_lora` writes one adapter folder per rank under `out`, evaluates each on the run's own
eval split (the metric the run reported), and writes summary.json, extract.md and a plot of the
metric against the rank next to the run itself (and any reference runs, e.g. a LoRA trained at
the same rank)."""
from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.analyze.delta import LayerDelta, RunDeltas, load_run_deltas
from deltatune.errors import ConfigError
from deltatune.fileio import checked_output_folder, move_folder_into_place, write_json, write_text


@dataclass
class ExtractRequest:
    """`run`: a finished run directory; `ranks`: the LoRA ranks to extract; `references`: other
    run directories whose final metric is shown next to the extracted adapters."""
    run: str
    ranks: list[int]
    out: str
    evaluate: bool = True
    references: list[str] = field(default_factory=list)
    overwrite: bool = False
    progress: bool = True


def factor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, energy kept) of the best rank-`rank` approximation B·A of `delta`."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    kept = float(s[:rank].pow(2).sum() / s.pow(2).sum()) if s.pow(2).sum() > 0 else 1.0
    return (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float(), kept


def lora_from_deltas(deltas: RunDeltas, rank: int, progress: bool = False):
    """A LoRA handle on a copy of the base model whose factors are ΔW's rank-`rank` SVD;
    returns (handle, per-layer energy kept)."""
    import deltatune
    from deltatune.methods.lora import LoraConfig

    limit = min(min(layer.weight.shape) for layer in deltas.layers)
    if rank > limit:
        raise ConfigError(f"rank {rank} is more than the smallest changed layer allows "
                          f"({limit}); rank {limit} is already exact: use ranks up to {limit}")
    model = copy.deepcopy(deltas.base.model)
    has_bias = any(layer.bias is not None for layer in deltas.layers)
    config = LoraConfig(r=rank, alpha=rank, targets=[layer.name for layer in deltas.layers],
                        bias="lora_only" if has_bias else "none",
                        modules_to_save=list(deltas.whole_modules))
    handle = deltatune.apply(model, config)
    modules = dict(model.named_modules())
    kept: dict[str, float] = {}
    for layer in _bar(deltas.layers, progress, f"rank {rank}"):
        kept[layer.name] = _set_factors(modules[layer.name], layer, rank)
    tuned = dict(deltas.tuned.model.named_modules())
    with torch.no_grad():
        for name in deltas.whole_modules:
            modules[name].load_state_dict(tuned[name].state_dict())
    return handle, kept


def _set_factors(wrapped: torch.nn.Module, layer: LayerDelta, rank: int) -> float:
    a, b, kept = factor(layer.weight, rank)
    with torch.no_grad():
        wrapped.lora_A.weight.copy_(a)
        wrapped.lora_B.weight.copy_(b)
        if layer.bias is not None:
            wrapped.base_layer.bias.add_(layer.bias.to(wrapped.base_layer.bias.dtype))
    return kept


def _bar(items, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, desc=f"extracting {description}", unit="layer")


def extract_lora(request: ExtractRequest) -> dict[str, Any]:
    """Writes the extracted adapters and the report into `request.out`; returns the summary."""
    ranks = _checked_ranks(request.ranks)
    references = [_reference(path) for path in request.references]
    out = checked_output_folder(request.out, request.overwrite, [request.run], "the run")
    started = time.perf_counter()
    deltas = load_run_deltas(request.run)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".extract", dir=out.parent))
    try:
        folder = staging / out.name
        folder.mkdir()
        rows = [_extract_rank(request, deltas, rank, folder) for rank in ranks]
        summary = _summary(request, deltas, rows, references)
        summary["seconds"] = round(time.perf_counter() - started, 1)
        write_json(folder / "summary.json", summary)
        write_text(folder / "extract.md", _markdown(summary))
        _plot(summary, folder / "metric_vs_rank.png")
        move_folder_into_place(folder, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _checked_ranks(ranks: list[int]) -> list[int]:
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ConfigError(f"ranks must be positive integers, got {ranks}; e.g. --ranks 1,4,16")
    return sorted(set(ranks))


def _reference(path: str) -> dict[str, Any]:
    summary_path = Path(path) / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"reference {path} has no summary.json; pass a finished run directory")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return {"run": str(path), "method": summary.get("method"),
            "trainable_parameters": summary.get("trainable_parameters"),
            "metrics": summary.get("final_metrics", {})}


def _extract_rank(request: ExtractRequest, deltas: RunDeltas, rank: int,
                  folder: Path) -> dict[str, Any]:
    from deltatune.methods.adapter_io import WEIGHTS_NAME, save_adapter

    handle, kept = lora_from_deltas(deltas, rank, request.progress)
    adapter = folder / f"r{rank}"
    save_adapter(handle, adapter, base_model_name_or_path=deltas.spec.model)
    row: dict[str, Any] = {
        "rank": rank, "adapter": adapter.name,
        "parameters": sum(p.numel() for p in handle.trainable_parameters()),
        "bytes": (adapter / WEIGHTS_NAME).stat().st_size,
        "energy_kept_mean": round(sum(kept.values()) / len(kept), 6),
        "energy_kept_min": round(min(kept.values()), 6)}
    if request.evaluate:
        row["metrics"] = _evaluate(request.run, adapter, request.progress)
    return row


def _evaluate(run: str, adapter: Path, progress: bool) -> dict[str, Any]:
    from deltatune.jobs import EvalRequest, evaluate_saved
    metrics = evaluate_saved(EvalRequest(run=run, adapter=str(adapter), progress=progress))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _summary(request, deltas: RunDeltas, rows, references) -> dict[str, Any]:
    run_summary = json.loads((Path(request.run) / "summary.json").read_text(encoding="utf-8"))
    return {"run": str(request.run), "model": deltas.spec.model, "method": deltas.spec.method,
            "layers": len(deltas.layers), "modules_saved_whole": deltas.whole_modules,
            "energy_split": deltas.energy_split,
            "run_metrics": run_summary.get("final_metrics", {}),
            "run_trainable_parameters": run_summary.get("trainable_parameters"),
            "baseline_metrics": run_summary.get("baseline_metrics", {}),
            "ranks": rows, "references": references}


def headline_metric(metrics: dict[str, Any]) -> str | None:
    for name in ("accuracy", "exact_match", "perplexity"):
        if name in metrics:
            return name
    return None


def _markdown(summary: dict[str, Any]) -> str:
    metric = headline_metric(summary["run_metrics"]) or "metric"
    lines = [f"# LoRA extracted from {summary['run']} ({summary['method']}, "
             f"{summary['model']})", "",
             f"| adapter | {metric} | parameters | MB | energy kept (mean / min) |",
             "|---|---:|---:|---:|---:|",
             f"| the run itself | {_value(summary['run_metrics'], metric)} | "
             f"{_count(summary['run_trainable_parameters'])} | | 1 |"]
    for row in summary["ranks"]:
        lines.append(f"| extracted r={row['rank']} | {_value(row.get('metrics', {}), metric)} | "
                     f"{row['parameters']:,} | {row['bytes'] / 1e6:.2f} | "
                     f"{row['energy_kept_mean']:.3f} / {row['energy_kept_min']:.3f} |")
    for ref in summary["references"]:
        lines.append(f"| reference {ref['run']} ({ref['method']}) | "
                     f"{_value(ref['metrics'], metric)} | {_count(ref['trainable_parameters'])} "
                     "| | |")
    split = summary["energy_split"]
    if "linear_weights" in split:
        lines += ["", f"Share of the update's squared norm: linear weights "
                  f"{split['linear_weights']:.3f}, their biases {split['linear_biases']:.3f}, "
                  f"modules saved whole {split['whole_modules']:.3f}, other (embeddings, norms; "
                  f"dropped) {split['other']:.3f}."]
    return "\n".join(lines) + "\n"


def _count(value: int | None) -> str:
    return "" if value is None else f"{value:,}"


def _value(metrics: dict[str, Any], name: str) -> str:
    value = metrics.get(name)
    return "" if value is None else f"{value:.4f}"


def _plot(summary: dict[str, Any], path: Path) -> None:
    from deltatune.report.curves import Series, plot_curves
    metric = headline_metric(summary["run_metrics"])
    rows = [row for row in summary["ranks"] if metric and metric in row.get("metrics", {})]
    if not rows:
        return
    ranks = [row["rank"] for row in rows]
    series = [Series("extracted LoRA", [(r["rank"], r["metrics"][metric]) for r in rows]),
              Series(f"the run ({summary['method']})",
                     [(rank, summary["run_metrics"].get(metric)) for rank in ranks])]
    for ref in summary["references"]:
        series.append(Series(f"{Path(ref['run']).name} ({ref['method']})",
                             [(rank, ref["metrics"].get(metric)) for rank in ranks]))
    plot_curves(series, path, "LoRA rank (log)", metric,
                f"LoRA extracted from {Path(summary['run']).name}", log_x=True)
