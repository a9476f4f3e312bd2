"""`deltatune prune`: prune a model (or a trained run, its adapter merged first) at one or more
amounts, optionally heal each pruned model by a short fine-tuning (LoRA, full, or full with
distillation from the unpruned model), and measure every stage: the task's metric, parameters,
latency per batch and bytes on disk.

What is pruned is a `Pruner` object (attention heads, FFN neurons, whole layers, unstructured
magnitude or Wanda weights); the job asks it whether the result is saved sparse or physically
smaller and whether LoRA healing keeps its shape, and never compares pruner names. Each amount
gets `amount-<a>/pruned/` (a model folder `load_model` reads: deltatune.models.pruned or
.sparse_io) and, when healed, `amount-<a>/heal/` (an ordinary training run) and
`amount-<a>/healed/`. The run directory also holds config.json, metrics.jsonl, summary.json and
curve.png (the metric against the amount, pruned and healed)."""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deltatune.data import DataConfig, build_datasets
from deltatune.errors import ConfigError
from deltatune.fileio import write_json
from deltatune.eval.config import EvalConfig
from deltatune.jobs.compression_run import (FolderArtifacts, folder_bytes, log_stage,
                                             measure_model, padded_batches, reload_check,
                                             start_output_folder)
from deltatune.jobs.pruners import PRUNERS, Pruner, get_pruner
from deltatune.jobs.sources import DenseSource, load_dense_source, say, source_data
from deltatune.jobs.summary import rounded
from deltatune.quant.precision import cpu_name
from deltatune.train.config import TrainConfig

HEAL_MODES = ("none", "lora", "full", "distill")
SUMMARY_FILE = "summary.json"


@dataclass
class HealSettings:
    """How each pruned model is healed: `mode` none, lora (LoRA on all linear layers, merged
    afterwards), full, or distill (full fine-tuning plus word-level KD from the unpruned model)."""
    mode: str = "none"
    steps: int = 100
    learning_rate: float | None = None   # None: 2e-4 for LoRA, 5e-5 for full / distill
    batch_size: int = 16
    lora_rank: int = 16
    temperature: float = 2.0
    kd_weight: float = 1.0


@dataclass
class PruneRequest:
    source: str                          # model name / folder / hub id, or a run directory
    kind: str                            # a name in deltatune.jobs.pruners.PRUNERS
    amounts: list[float]                 # fractions: of heads, neurons, layers, or weights
    out: str
    task: str | None = None              # a model's task (a run has its own)
    data: DataConfig | None = None       # None: the run's data; a model needs it
    options: dict[str, Any] = field(default_factory=dict)   # the pruner's own settings
    calibration_examples: int = 128
    calibration_batch_size: int = 16
    heal: HealSettings = field(default_factory=HealSettings)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False


@dataclass
class _Context:
    """What every amount of a sweep shares."""
    request: PruneRequest
    source: DenseSource
    pruner: Pruner
    data: DataConfig
    train_examples: list[dict]
    eval_examples: list[dict]
    info: dict[str, Any]
    calibration: list[dict[str, torch.Tensor]]
    out: Path

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        loaded = dataclasses.replace(self.source.loaded, model=model)
        evaluator = self.source.task.evaluator(loaded, self.eval_examples, self.info,
                                               self.request.eval, self.request.progress)
        return evaluator()

    def loss_fn(self) -> Callable[[nn.Module, dict], torch.Tensor]:
        objective = self.source.task.objective()
        return lambda model, batch: objective(model, batch).loss


def prune_saved(request: PruneRequest) -> dict[str, Any]:
    """Runs the sweep; returns the summary (also written to summary.json)."""
    pruner = get_pruner(request.kind, request.options)
    _check_request(request, pruner)
    out = start_output_folder(request.out, request.overwrite, dataclasses.asdict(request))
    context = _context(request, pruner, out)
    model = context.source.loaded.model
    say("evaluating the unpruned model")
    baseline = {"metrics": context.evaluate(model), **_measure(context, model)}
    log_stage(out, {"amount": 0.0, "stage": "unpruned", **_flat(baseline)})
    results = [_prune_one(context, amount) for amount in request.amounts]
    summary = _summary(context, baseline, results)
    write_json(out / SUMMARY_FILE, summary)
    _plot(context, summary)
    say(f"run directory: {out}")
    return summary


def _check_request(request: PruneRequest, pruner: Pruner) -> None:
    if request.heal.mode not in HEAL_MODES:
        raise ConfigError(f"--heal {request.heal.mode!r}: choose one of {', '.join(HEAL_MODES)}")
    if not request.amounts:
        raise ConfigError("give at least one amount: --amount 0.5 (or a list: 0.2,0.4,0.6)")
    for amount in request.amounts:
        if not 0.0 < amount < 1.0:
            raise ConfigError(f"--amount {amount}: amounts are fractions between 0 and 1 "
                              "(0.5 = half of the heads / neurons / layers / weights)")
    if request.heal.mode == "lora" and pruner.saves_sparse:
        raise ConfigError(f"--heal lora cannot keep {pruner.name} sparsity: the merged LoRA "
                          "delta is dense and would fill the pruned weights again; heal with "
                          "--heal full or --heal distill (the masks are held fixed)")
    if pruner.prunes_while_healing and request.heal.mode not in ("full", "distill"):
        raise ConfigError("a gradual schedule prunes while healing: add --heal full or "
                          "--heal distill (and --heal-steps)")
    if request.heal.steps < 1:
        raise ConfigError("--heal-steps must be at least 1")


def _context(request: PruneRequest, pruner: Pruner, out: Path) -> _Context:
    source = load_dense_source(request.source, request.task, request.trust_remote_code)
    data = source_data(source, request.source, request.data, request.seed,
                       "pruning (calibration and evaluation)")
    datasets = build_datasets(data, source.loaded.tokenizer, source.task.encoding, request.seed)
    calibration = padded_batches(datasets.train[:request.calibration_examples],
                           request.calibration_batch_size, source.loaded.tokenizer.pad_token_id)
    return _Context(request, source, pruner, data, datasets.train, datasets.eval,
                    dict(datasets.info), calibration, out)


def _prune_one(context: _Context, amount: float) -> dict[str, Any]:
    folder = context.out / f"amount-{amount:.2f}"
    original = context.source.loaded.model
    model = copy.deepcopy(original)
    say(f"pruning {context.pruner.name} at {amount:.0%}")
    details = context.pruner.prune(model, context.calibration, context.loss_fn(), amount)
    say(f"evaluating the model pruned at {amount:.0%}")
    pruned = {"metrics": context.evaluate(model), **_measure(context, model)}
    pruned["bytes_on_disk"] = _save(context, model, folder / "pruned", details)
    log_stage(context.out, {"amount": amount, "stage": "pruned", **_flat(pruned)})
    result = {"amount": amount, "details": details, "pruned": pruned, "healed": None}
    if context.request.heal.mode != "none":
        healed_model, heal_summary, schedule = _heal(context, folder, original, amount)
        healed = {"metrics": context.evaluate(healed_model), **_measure(context, healed_model),
                  "heal_train_loss": heal_summary.final_train_loss,
                  "heal_seconds": heal_summary.train_wall_seconds,
                  **({"sparsity_schedule": schedule} if schedule else {})}
        healed["bytes_on_disk"] = _save(context, healed_model, folder / "healed", details)
        log_stage(context.out, {"amount": amount, "stage": "healed", **_flat(healed)})
        result["healed"] = healed
        final_model, final_folder = healed_model, folder / "healed"
    else:
        final_model, final_folder = model, folder / "pruned"
    result["reload"] = reload_check(final_folder, final_model, context.eval_examples,
                                    context.source.loaded.tokenizer.pad_token_id,
                                    context.source.task.model_kind,
                                    context.source.task.models_language)
    return result


def _save(context: _Context, model: nn.Module, folder: Path, details: dict[str, Any]) -> int:
    context.pruner.save(model, context.source.loaded.tokenizer, folder,
                        {"source": context.request.source, "pruning": details})
    if context.source.is_run:
        context.source.task.save_artifacts(FolderArtifacts(folder), context.info)
    return folder_bytes(folder)


def _heal(context: _Context, folder: Path, teacher: nn.Module, amount: float
           ) -> tuple[nn.Module, Any, list[dict]]:
    """Fine-tunes the pruned folder as an ordinary run; returns the healed dense model."""
    from deltatune.jobs.run import TrainingAdditions, run_training
    from deltatune.spec import RunSpec
    heal = context.request.heal
    method, options = ("lora", {"r": heal.lora_rank, "alpha": 2 * heal.lora_rank,
                                "targets": "all-linear"}) if heal.mode == "lora" \
        else ("full", {})
    learning_rate = heal.learning_rate or (2e-4 if heal.mode == "lora" else 5e-5)
    spec = RunSpec(model=str(folder / "pruned"), task=context.source.task.name, method=method,
                   method_options=options, data=context.data,
                   train=TrainConfig(learning_rate=learning_rate, max_steps=heal.steps,
                                     batch_size=heal.batch_size, log_every=10),
                   eval=dataclasses.replace(context.request.eval, baseline=False),
                   seed=context.request.seed, output_dir=str(folder / "heal"),
                   progress=context.request.progress)
    created: list = []
    additions = TrainingAdditions(terms=_heal_terms(context, teacher),
                                  callbacks=_heal_callbacks(context, amount, created))
    say(f"healing with {heal.mode} for {heal.steps} steps")
    summary = run_training(spec, trust_remote_code=context.request.trust_remote_code,
                           additions=additions)
    healed = load_dense_source(str(folder / "heal")).loaded.model
    context.pruner.after_heal(healed)
    schedule = [entry for callback in created for entry in getattr(callback, "history", [])]
    return healed, summary, schedule


def _heal_terms(context: _Context, teacher: nn.Module):
    heal = context.request.heal
    if heal.mode != "distill":
        return None
    from deltatune.compress.distill import WordLevelKD
    return lambda job: [WordLevelKD(teacher, temperature=heal.temperature, weight=heal.kd_weight)]


def _heal_callbacks(context: _Context, amount: float, created: list):
    """The pruner's callbacks for the heal run; `created` keeps them for the summary."""
    def callbacks(job):
        created.extend(context.pruner.heal_callbacks(job.loaded.model, amount,
                                                     context.request.heal.steps,
                                                     context.calibration))
        return created
    return callbacks


def _measure(context: _Context, model: nn.Module) -> dict[str, Any]:
    return measure_model(model, context.eval_examples, context.request.eval.batch_size,
                         context.source.loaded.tokenizer.pad_token_id)


def _flat(stage: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in stage.items() if k != "metrics"}
    flat.update({f"eval_{k}": v for k, v in stage["metrics"].items()})
    return rounded(flat)


def _summary(context: _Context, baseline: dict, results: list[dict]) -> dict[str, Any]:
    request = context.request
    return rounded({
        "source": request.source, "task": context.source.task.name,
        "pruning": context.pruner.describe(), "amounts": request.amounts,
        "heal": dataclasses.asdict(request.heal),
        "metric": _primary_metric(baseline["metrics"]),
        "calibration_examples": min(request.calibration_examples, len(context.train_examples)),
        "eval_examples": len(context.eval_examples),
        "unpruned": baseline, "results": results,
        "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})


def _primary_metric(metrics: dict[str, Any]) -> str:
    return next(iter(metrics))


def _plot(context: _Context, summary: dict[str, Any]) -> None:
    from deltatune.report.curves import Series, plot_curves
    metric = summary["metric"]
    start = [(0.0, summary["unpruned"]["metrics"][metric])]
    pruned = start + [(r["amount"], r["pruned"]["metrics"][metric]) for r in summary["results"]]
    series = [Series("pruned", pruned)]
    if any(r["healed"] for r in summary["results"]):
        series.append(Series(f"healed ({context.request.heal.mode}, "
                             f"{context.request.heal.steps} steps)",
                             start + [(r["amount"], r["healed"]["metrics"][metric])
                                      for r in summary["results"] if r["healed"]]))
    plot_curves(series, context.out / "curve.png",
                x_label=f"fraction pruned ({context.pruner.unit})", y_label=metric,
                title=f"{context.pruner.name} pruning of {Path(summary['source']).name}",
                log_y=metric == "perplexity")


def pruner_names() -> list[str]:
    return sorted(PRUNERS)
