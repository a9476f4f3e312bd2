"""`deltatune interpolate`: a WiSE-FT sweep over a finished run. For each α the run's weights
become θ(α) = (1 − α)·θ0 + α·θ1 (deltatune/forgetting/wise.py: a scaled delta for adapter
methods, interpolated weights for full fine-tuning and freezing) and are measured: the run's own
task metrics on its eval split, every retention set (default: the run's own `eval.retain`), and
the forgetting probe's KL from the original model (language models; its reference is taken at
α = 0, which is the original model exactly). α = 0 is always measured, since every other α is
reported relative to it.

The output folder (default `<run>/interpolate`) holds config.json, metrics.jsonl (one line per
α), summary.json (the table, the best α for the task, and each α's task gain and retention
change over α = 0), table.md and tradeoff.png. `save_alpha` + `save_to` also write the model at
that α as a plain folder that transformers and `deltatune eval --model` load (built under a
temporary name and renamed into place), read back and compared with the in-memory model.

A new head the task added (a classifier's) has no original to interpolate towards: it stays as
trained at every α, for adapters (PEFT's modules_to_save rule) and full fine-tuning alike.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from deltatune.data import build_datasets
from deltatune.data.retain import RetainSet
from deltatune.errors import ConfigError
from deltatune.fileio import atomic_path, write_json, write_text
from deltatune.forgetting.wise import (SCALE, DeltaInterpolation, WeightInterpolation,
                                       check_same_layout, checked_alpha, interpolation_route)
from deltatune.jobs.compression_run import log_stage, reload_check, start_output_folder
from deltatune.jobs.inference import finite_or_null, load_for_inference
from deltatune.jobs.sources import say, to_fp32
from deltatune.jobs.summary import rounded
from deltatune.jobs.tasks import Task, get_task
from deltatune.models import LoadedModel, load_model
from deltatune.spec import RunSpec, read_run_spec

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
OUTPUT_FOLDER = "interpolate"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"
PLOT_FILE = "tradeoff.png"
SAVED_INFO_FILE = "interpolation.json"
# The task's headline metric and whether higher is better, in the order they are looked for.
PRIMARY_METRICS = (("exact_match", True), ("accuracy", True), ("perplexity", False),
                   ("loss", False))


@dataclass
class InterpolateRequest:
    """Sweep `alphas` over the run directory `run`. `retain` empty: the run's own retain sets.
    `batch_size` None: the run's eval batch size. `out` None: `<run>/interpolate`. `save_alpha`
    with `save_to`: also write the model at that α."""
    run: str
    alphas: list[float] = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    retain: list[RetainSet] = field(default_factory=list)
    probe: bool = True
    eval_limit: int | None = None
    batch_size: int | None = None
    out: str | None = None
    save_alpha: float | None = None
    save_to: str | None = None
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False


@dataclass
class _Sweep:
    """The loaded run and everything measured at each α."""
    request: InterpolateRequest
    spec: RunSpec
    task: Task
    loaded: LoadedModel
    handle: Any
    interpolation: DeltaInterpolation | WeightInterpolation
    eval_examples: list[dict]
    info: dict[str, Any]
    evaluate_task: Callable[[], dict[str, Any]]
    retention: Callable[[], dict[str, float]] | None
    probe: Any

    def measure(self) -> dict[str, float]:
        metrics = {k: v for k, v in self.evaluate_task().items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.retention is not None:
            metrics.update(self.retention())
        if self.probe is not None:
            metrics.update(self.probe())
        return metrics


def interpolate_run(request: InterpolateRequest) -> dict[str, Any]:
    """Runs the sweep (and the save, if asked); returns the summary (also summary.json)."""
    alphas = sweep_alphas(request.alphas)
    out = Path(request.out) if request.out else Path(request.run) / OUTPUT_FOLDER
    save_to = _checked_save(request, out)
    _check_empty(out, request.overwrite, "--out")
    spec = read_run_spec(request.run)
    sweep = _load(request, spec)
    out = start_output_folder(out, request.overwrite, dataclasses.asdict(request))
    rows = _run_sweep(sweep, alphas, out)
    summary = finite_or_null_deep(_summary(sweep, rows, out))
    write_json(out / SUMMARY_FILE, summary)
    write_text(out / TABLE_FILE, markdown_table(summary))
    plot_tradeoff(summary, out / PLOT_FILE)
    say(f"interpolation sweep: {out}")
    if save_to is not None:
        # After the sweep's files: a failed save leaves the measurements in place.
        summary["saved"] = finite_or_null_deep(_save(sweep, request.save_alpha, save_to, rows))
        write_json(out / SUMMARY_FILE, summary)
    return summary


# -- checking the request ------------------------------------------------------------------------

def sweep_alphas(alphas: list[float]) -> list[float]:
    """The α values to measure: finite, deduplicated, ascending, with 0 (the reference) added.
    Values outside [0, 1] are kept and warned about."""
    if not alphas:
        raise ConfigError("give at least one alpha: --alphas 0,0.5,1 (or 0:1:0.1)")
    checked = sorted({checked_alpha(alpha) for alpha in alphas} | {0.0})
    outside = [alpha for alpha in checked if not 0.0 <= alpha <= 1.0]
    if outside:
        say(f"warning: alpha {', '.join(f'{a:g}' for a in outside)} outside [0, 1] "
            "extrapolates: beyond the fine-tuned weights (> 1) or away from them past the "
            "original (< 0)")
    return checked


def _checked_save(request: InterpolateRequest, out: Path) -> Path | None:
    if (request.save_alpha is None) != (request.save_to is None):
        raise ConfigError("--alpha and --save go together: --alpha 0.5 --save DIR writes the "
                          "model at that alpha")
    if request.save_to is None:
        return None
    checked_alpha(request.save_alpha)
    target = Path(request.save_to).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise ConfigError(f"--save {target} is a file; give a folder path (it is created)")
    for other, what in ((Path(request.run), "the run directory"), (out, "the sweep's --out")):
        if _inside(other, target):
            raise ConfigError(f"--save {target} would hold or replace {what} {other}; choose "
                              "a folder outside it")
    _check_empty(target, request.overwrite, "--save")
    return target


def _check_empty(folder: Path, overwrite: bool, flag: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder} is a file; choose a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ConfigError(f"{flag} {folder} already exists and is not empty; choose another "
                          "folder or pass --overwrite")


def _inside(path: Path, folder: Path) -> bool:
    resolved, root = path.expanduser().resolve(), folder.resolve()
    return resolved == root or root in resolved.parents


# -- loading ---------------------------------------------------------------------------------

def _load(request: InterpolateRequest, spec: RunSpec) -> _Sweep:
    run = Path(request.run)
    if not (run / "adapter").is_dir():
        raise ConfigError(f"run {run} has no adapter/ folder: it has not finished; finish or "
                          "resume it (deltatune train --resume) first")
    task = get_task(spec.task)
    say(f"loading run {run}")
    loaded, handle, _ = load_for_inference(None, None, str(run),
                                           trust_remote_code=request.trust_remote_code)
    route = interpolation_route(handle)
    if route == SCALE:
        interpolation = DeltaInterpolation(handle)
    else:
        interpolation = _weight_interpolation(loaded, handle, spec, task, run,
                                              request.trust_remote_code)
    loaded.model.eval()
    data = task.resolve_data(spec.data)
    labels = task.saved_labels(run)
    if labels:
        data = dataclasses.replace(data, label_names=labels)
    if request.eval_limit:
        data = dataclasses.replace(data, eval_limit=request.eval_limit)
    datasets = build_datasets(data, loaded.tokenizer, task.encoding, spec.seed)
    batch_size = request.batch_size or spec.eval.batch_size
    eval_config = dataclasses.replace(spec.eval, batch_size=batch_size)
    evaluate_task = task.evaluator(loaded, datasets.eval, datasets.info, eval_config, False)
    return _Sweep(request, spec, task, loaded, handle, interpolation, datasets.eval,
                  dict(datasets.info), evaluate_task,
                  _retention(request, spec, task, loaded, data.max_length, labels, batch_size),
                  _probe(request, spec, task, loaded))


def _weight_interpolation(loaded: LoadedModel, handle: Any, spec: RunSpec, task: Task,
                          run: Path, trust_remote_code: bool) -> WeightInterpolation:
    """The run's weights (merged, plain, fp32) and the original's, interpolated in place."""
    from deltatune.jobs.export import sync_config, unwrap_merged
    handle.merge()
    unwrap_merged(loaded.model, handle)
    sync_config(loaded.model)
    to_fp32(loaded.model)
    tuned = {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}
    say(f"loading the original weights ({spec.model}"
        f"{', started from run ' + spec.init_from if spec.init_from else ''})")
    original = _original_state(spec, task, run, trust_remote_code)
    check_same_layout(original, tuned)
    for key in new_head_keys(loaded.model, task, tuned):
        original[key] = tuned[key]
    return WeightInterpolation(loaded.model, original, tuned)


def _original_state(spec: RunSpec, task: Task, run: Path, trust_remote_code: bool
                    ) -> dict[str, torch.Tensor]:
    """The weights training started from: the model, or the init_from run's weights."""
    labels = task.saved_labels(run)
    original = load_model(spec.model, task=task.model_kind,
                          num_labels=len(labels) if labels else None, label_names=labels,
                          trust_remote_code=trust_remote_code)
    if spec.init_from:
        from deltatune.jobs.starting_point import load_starting_weights
        load_starting_weights(original.model, spec.init_from, trust_remote_code)
    to_fp32(original.model)
    return {k: v.detach() for k, v in original.model.state_dict().items()}


def new_head_keys(model: torch.nn.Module, task: Task, state: dict[str, Any]) -> list[str]:
    """State keys of the head modules the task adds freshly initialised (kept as trained)."""
    heads = [name for name in task.new_head_names if name in dict(model.named_children())]
    return [key for key in state if any(key.startswith(head + ".") for head in heads)]


def _retention(request: InterpolateRequest, spec: RunSpec, task: Task, loaded: LoadedModel,
               max_length: int, labels: list[str] | None, batch_size: int
               ) -> Callable[[], dict[str, float]] | None:
    sets = list(request.retain or spec.eval.retain)
    if not sets:
        return None
    from deltatune.eval.forgetting import retention_evaluator
    kind = "language" if task.models_language else "classification"
    return retention_evaluator(loaded.model, loaded.tokenizer, sets, kind, max_length,
                               label_names=labels, batch_size=batch_size, progress=False)


def _probe(request: InterpolateRequest, spec: RunSpec, task: Task, loaded: LoadedModel) -> Any:
    if not (request.probe and task.models_language):
        return None
    from deltatune.eval.forgetting import ForgettingProbe
    return ForgettingProbe(loaded.model, loaded.tokenizer, spec.model,
                           prompts=spec.eval.probe_prompts,
                           new_tokens=spec.eval.probe_new_tokens, seed=spec.seed)


# -- the sweep -------------------------------------------------------------------------------

def _run_sweep(sweep: _Sweep, alphas: list[float], out: Path) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm
    if sweep.probe is not None:
        say("capturing the forgetting probe's reference at alpha 0 (the original model)")
        sweep.interpolation.set(0.0)
        sweep.probe.capture_reference()
    rows = []
    with sweep.interpolation:
        for alpha in tqdm(alphas, desc="alpha", disable=not sweep.request.progress):
            sweep.interpolation.set(alpha)
            row = {"alpha": alpha, **rounded(sweep.measure())}
            log_stage(out, finite_or_null(row))
            rows.append(row)
    return rows


def primary_metric(metrics: dict[str, Any]) -> tuple[str, bool]:
    """The task's headline metric among `metrics` and whether higher is better."""
    for name, higher in PRIMARY_METRICS:
        if name in metrics:
            return name, higher
    task_metrics = [name for name in metrics if not _is_retention(name)]
    if not task_metrics:
        raise ConfigError("the run's evaluator reported no task metric to interpolate on")
    return task_metrics[0], True


def _is_retention(name: str) -> bool:
    return name.startswith(("retain_", "probe_"))


def _summary(sweep: _Sweep, rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    metric, higher = primary_metric(rows[0])
    reference = rows[0]  # alpha 0: sweep_alphas always includes it, and sorts
    scored = [r for r in rows if _finite(r.get(metric))]
    # Ties go to an α inside [0, 1], then to the smallest: the one closest to the original.
    best = max(scored, key=lambda r: (r[metric] if higher else -r[metric],
                                      0.0 <= r["alpha"] <= 1.0, -r["alpha"])) \
        if scored else None
    retention = [name for name in rows[0] if _is_retention(name)]
    changes = [_changes(row, reference, metric, higher, retention) for row in rows]
    return {"run": sweep.request.run, "model": sweep.spec.model, "method": sweep.spec.method,
            "task": sweep.spec.task, "interpolation": sweep.interpolation.route,
            "alphas": [row["alpha"] for row in rows],
            "extrapolated": [row["alpha"] for row in rows if not 0.0 <= row["alpha"] <= 1.0],
            "metric": metric, "greater_is_better": higher,
            "best_alpha": best["alpha"] if best else None,
            "best": best[metric] if best else None,
            "retention_metrics": retention, "eval_examples": len(sweep.eval_examples),
            "new_head_kept": bool(sweep.task.new_head_names and
                                  new_head_keys(sweep.loaded.model, sweep.task,
                                                sweep.loaded.model.state_dict())),
            "table": rows, "relative_to_alpha_0": changes, "saved": None, "out": str(out),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _changes(row: dict[str, Any], reference: dict[str, Any], metric: str, higher: bool,
             retention: list[str]) -> dict[str, Any]:
    """An α's change over α = 0: `task_change` as measured, `task_gain` signed so that positive
    is better (a perplexity that falls is a gain), every retention metric's change."""
    change = _difference(row.get(metric), reference.get(metric))
    return {"alpha": row["alpha"], "task_change": change,
            "task_gain": None if change is None else (change if higher else -change),
            "retention_change": {name: _difference(row.get(name), reference.get(name))
                                 for name in retention}}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _difference(value: Any, reference: Any) -> float | None:
    if not (_finite(value) and _finite(reference)):
        return None
    return round(value - reference, 6)


def finite_or_null_deep(data: Any) -> Any:
    """NaN/inf anywhere in the summary become null: summary.json stays strict JSON."""
    if isinstance(data, dict):
        return {k: finite_or_null_deep(v) for k, v in data.items()}
    if isinstance(data, list):
        return [finite_or_null_deep(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


# -- saving one alpha ------------------------------------------------------------------------

class _CollectedJson:
    """What `Task.save_artifacts` writes (labels.json), kept to go into the model folder in the
    same atomic write."""

    def __init__(self):
        self.files: dict[str, Any] = {}

    def write_json(self, name: str, data: Any) -> None:
        self.files[name] = data


def _save(sweep: _Sweep, alpha: float, target: Path, rows: list[dict[str, Any]]
          ) -> dict[str, Any]:
    """Writes the model at `alpha` as a plain model folder. Last step: an adapter is merged."""
    from deltatune.jobs.export import check_plain_tree, densify_weights, sync_config, \
        unwrap_merged
    from deltatune.models.loading import write_model_folder
    model = sweep.loaded.model
    sweep.interpolation.set(alpha)
    row = next((r for r in rows if r["alpha"] == alpha), None)
    metrics = {k: v for k, v in row.items() if k != "alpha"} if row else \
        rounded(sweep.measure())
    if sweep.interpolation.route == SCALE:
        densify_weights(model)
        sweep.handle.merge()
        unwrap_merged(model, sweep.handle)
        sync_config(model)
        to_fp32(model)
    check_plain_tree(model)
    artifacts = _CollectedJson()
    sweep.task.save_artifacts(artifacts, sweep.info)
    provenance = {"wise_ft_alpha": alpha, "run": str(Path(sweep.request.run).absolute()),
                  "model": sweep.spec.model, "method": sweep.spec.method,
                  "interpolation": sweep.interpolation.route, "metrics": metrics}
    say(f"writing the model at alpha {alpha:g} to {target}")
    write_model_folder(model, sweep.loaded.tokenizer, target,
                       extra_json={SAVED_INFO_FILE: provenance, **artifacts.files})
    check = reload_check(target, model, sweep.eval_examples,
                         sweep.loaded.tokenizer.pad_token_id, sweep.task.model_kind,
                         sweep.task.models_language)
    return {"alpha": alpha, "path": str(target), "metrics": metrics,
            "reload_max_abs_logit_diff": check["reload_max_abs_logit_diff"]}


# -- table and plot ------------------------------------------------------------------------

def markdown_table(summary: dict[str, Any]) -> str:
    """One row per α: the task metrics, the retention metrics, and the changes over α = 0."""
    rows = summary["table"]
    metric = summary["metric"]
    columns = [metric] + [n for n in rows[0] if n not in ("alpha", metric)
                          and not _is_retention(n)] + summary["retention_metrics"]
    changes = {c["alpha"]: c for c in summary["relative_to_alpha_0"]}
    header = ["alpha", *columns, f"{metric} change over alpha 0"]
    lines = [f"WiSE-FT interpolation of {summary['run']} ({summary['method']}, "
             f"{summary['interpolation']}); best {metric}: alpha {summary['best_alpha']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{row['alpha']:g}", *(_cell(row.get(c)) for c in columns),
                 _cell(changes[row["alpha"]]["task_change"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any, signed: bool = False) -> str:
    if not _finite(value):
        return "–"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def plot_tradeoff(summary: dict[str, Any], path: Path) -> Path:
    """One panel per measure against α, sharing the α axis: the task metric, then each
    retention metric (perplexity/accuracy of each retain set, the probe's KL)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = summary["table"]
    retention = [n for n in summary["retention_metrics"] if not n.endswith("_loss")] or \
        summary["retention_metrics"]
    panels = [summary["metric"], *retention]
    figure, axes = pyplot.subplots(len(panels), 1, sharex=True, squeeze=False,
                                   figsize=(6.4, 1.2 + 2.0 * len(panels)), dpi=110)
    for axis, name in zip(axes[:, 0], panels):
        points = [(r["alpha"], r[name]) for r in rows if _finite(r.get(name))]
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o")
        axis.set_ylabel(name, fontsize=8)
        axis.grid(True, alpha=0.3)
        for edge in (0.0, 1.0):
            axis.axvline(edge, color="grey", linewidth=0.6, linestyle=":")
    if summary["best_alpha"] is not None:
        axes[0, 0].axvline(summary["best_alpha"], color="tab:green", linewidth=0.8,
                           label=f"best {summary['metric']}")
        axes[0, 0].legend(fontsize=7)
    axes[-1, 0].set_xlabel("alpha (0 = original, 1 = fine-tuned)")
    axes[0, 0].set_title(f"WiSE-FT: {Path(summary['run']).name} ({summary['method']})",
                         fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    pyplot.close(figure)
    return path
