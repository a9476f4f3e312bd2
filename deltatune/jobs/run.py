"""`run_training(spec) -> RunSummary`: prepare the job, evaluate the base model, train with the
loop and its callbacks (metrics log, periodic evaluation / early stopping, checkpoints, progress
bar, experiment trackers) under the speed switches, evaluate again, save the adapter and the
summary. With `resume=True` it continues a run directory from its newest checkpoint; under
torchrun every process runs this and only the main one writes."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from deltatune.errors import ConfigError
from deltatune.eval.memory import peak_memory_bytes
from deltatune.jobs.forgetting import (RetentionMeasures, forgetting_summary, mitigation_terms,
                                       mixed_batch_source, retention_headline)
from deltatune.jobs.multitask import multitask_evaluator
from deltatune.jobs.preparation import Job, prepare, say
from deltatune.jobs.summary import RunSummary, rounded
from deltatune.methods.adapter_io import save_adapter
from deltatune.spec import RunSpec
from deltatune.train.callbacks import Checkpointing, MetricsLog, PeriodicEvaluation, ProgressBar
from deltatune.train.checkpoint import Checkpoint, latest_checkpoint
from deltatune.train.divergence import DivergenceGuard
from deltatune.train.distributed import Distributed, from_environment, whole_parameters
from deltatune.train.loop import Callback, TrainResult, train
from deltatune.train.objectives import LossTerm
from deltatune.train.speed import speed_options_applied
from deltatune.train.threads import AdaptiveThreads
from deltatune.train.trackers import Tracking, make_trackers


@dataclass
class TrainingAdditions:
    """What a composing job (prune-and-heal, distill) adds to an ordinary training run: loss
    terms and callbacks, each built from the prepared job (its model, tokenizer and data), so a
    teacher or a set of masks can refer to the model the run actually trains."""
    terms: Callable[[Job], Sequence[LossTerm]] | None = None
    callbacks: Callable[[Job], Sequence[Callback]] | None = None

    def terms_for(self, job: Job) -> list[LossTerm]:
        return list(self.terms(job)) if self.terms else []

    def callbacks_for(self, job: Job) -> list[Callback]:
        return list(self.callbacks(job)) if self.callbacks else []


def run_training(spec: RunSpec, resume: bool = False, overwrite: bool = False,
                 trust_remote_code: bool = False,
                 additions: TrainingAdditions | None = None) -> RunSummary:
    """Runs one job and returns its summary (also written to summary.json). The run directory
    must be new or empty (`overwrite` replaces an earlier run there); a run that fails before
    its first checkpoint removes its directory again. `additions` are extra loss terms and
    callbacks (distillation, pruning masks)."""
    distributed = from_environment(spec.train.distributed)
    try:
        return _run(spec, resume, overwrite, trust_remote_code, distributed,
                    additions or TrainingAdditions())
    finally:
        if distributed is not None:
            distributed.shutdown()


def _run(spec: RunSpec, resume: bool, overwrite: bool, trust_remote_code: bool,
         distributed: Distributed | None, additions: TrainingAdditions) -> RunSummary:
    checkpoint = _checkpoint_to_resume(spec) if resume else None
    # Before the model loads: a requested tracker whose package is missing stops the run here.
    trackers = make_trackers(spec.train.report_to)
    job = prepare(spec, distributed, new_run=checkpoint is None, overwrite=overwrite,
                  trust_remote_code=trust_remote_code)
    if checkpoint is None:
        job.run.start(spec.model_dump(), overwrite)
    tracking = Tracking(trackers, job.run, spec.model_dump()) if trackers else None
    try:
        try:
            return _train_and_report(job, checkpoint, additions, tracking)
        finally:  # flushed and closed at the end, on Ctrl-C and on a crash
            if tracking is not None:
                tracking.close()
    except BaseException:
        if job.run.discard():
            say(f"removed {job.run.path}: the run failed before its first checkpoint",
                distributed)
        raise


def _train_and_report(job: Job, checkpoint: Checkpoint | None, additions: TrainingAdditions,
                      tracking: Tracking | None = None) -> RunSummary:
    spec, distributed = job.spec, job.distributed
    progress = spec.progress and _is_main(job)
    task_evaluate = multitask_evaluator(job, progress) if job.eval_sets is not None else \
        job.task.evaluator(job.loaded, job.eval_examples, job.data_info, spec.eval, progress)
    # Before anything trains: the probe's reference is the untouched model's predictions.
    measures = RetentionMeasures(job, progress)
    retained = _retention_baseline(job, measures, resumed=checkpoint is not None)
    evaluate = measures.wrap(task_evaluate, spec.forgetting.retention_weight) \
        if measures.active else task_evaluate
    baseline = _baseline(job, task_evaluate, retained, resumed=checkpoint is not None)
    if checkpoint is not None:
        say(f"resuming {job.run.path} from step {checkpoint.step}", distributed)
    callbacks = _callbacks(job, evaluate)
    if tracking is not None:
        callbacks.append(tracking)
    # Right after the metrics log: weights a callback changes (pruning masks) are changed
    # before evaluation and checkpoints see them.
    callbacks[1:1] = additions.callbacks_for(job)
    # Built from the weights as they are before training (a resumed run is prepared afresh from
    # the seed, so they are the same): the anchors of EWC and L2-SP, the KL's original.
    started = time.perf_counter()
    terms = mitigation_terms(job)
    batches = mixed_batch_source(job)
    mitigation_seconds = time.perf_counter() - started
    objective = job.task.objective(terms + additions.terms_for(job))
    with speed_options_applied(job.loaded.model, job.speed_options()):
        model = distributed.wrap(job.loaded.model) if distributed else job.loaded.model
        result = train(job.handle, batches, objective, spec.train,
                       callbacks, model=model, distributed=distributed, resume=checkpoint)
    say("evaluating after training", distributed)
    final = evaluate()
    job.run.log({"step": result.steps, **{f"eval_{k}": v for k, v in final.items()}})
    say(f"tuned: {headline(final)}", distributed)
    forgetting = forgetting_summary(job, measures, baseline, final, mitigation_seconds)
    if forgetting.get("retention") or forgetting.get("task"):
        say(f"forgetting: {retention_headline(forgetting)}", distributed)
    _save_artifacts(job)
    periodic = next((c for c in callbacks if isinstance(c, PeriodicEvaluation)), None)
    guard = next(c for c in callbacks if isinstance(c, DivergenceGuard))
    summary = _summary(job, result, baseline, final, periodic,
                       checkpoint.step if checkpoint else None, guard.diverged_at)
    summary.forgetting = forgetting
    job.run.write_summary(summary.as_dict())
    say(f"run directory: {job.run.path}", distributed)
    return summary


def _checkpoint_to_resume(spec: RunSpec) -> Checkpoint:
    if not spec.output_dir:
        raise ConfigError("resume needs the run directory: pass --resume RUN_DIR")
    if (Path(spec.output_dir) / "summary.json").is_file():
        raise ConfigError(f"run {spec.output_dir} has already finished (it has summary.json); "
                          "there is nothing to resume")
    return Checkpoint(latest_checkpoint(spec.output_dir))


def _retention_baseline(job: Job, measures: RetentionMeasures,
                        resumed: bool) -> dict[str, Any]:
    if not measures.active:
        return {}
    say("measuring retention before training (retain sets, forgetting probe)", job.distributed)
    retained = measures.start(resumed)
    say(f"retention before training: {headline(retained)}", job.distributed)
    return retained


def _baseline(job: Job, evaluate: Callable[[], dict[str, Any]], retained: dict[str, Any],
              resumed: bool) -> dict[str, Any] | None:
    """The base model's metrics: measured before training, or read back when resuming; the
    retention metrics measured before training join them."""
    if not job.spec.eval.baseline:
        if retained and not resumed:
            job.run.log({"step": 0, **{f"eval_{k}": v for k, v in retained.items()}})
        return None
    if resumed:
        logged = [r for r in job.run.logged() if r.get("step") == 0]
        return {k[len("eval_"):]: v for r in logged for k, v in r.items()
                if k.startswith("eval_")} or None
    say("evaluating before training (baseline)", job.distributed)
    baseline = {**evaluate(), **retained}
    job.run.log({"step": 0, **{f"eval_{k}": v for k, v in baseline.items()}})
    say(f"baseline: {headline(baseline)}", job.distributed)
    return baseline


def _callbacks(job: Job, evaluate: Callable[[], dict[str, Any]]) -> list[Callback]:
    train = job.spec.train
    callbacks: list[Callback] = [MetricsLog(job.run.log, train.log_every)]
    if train.eval_every:
        callbacks.append(PeriodicEvaluation(evaluate, train.eval_every, job.run.log,
                                            train.metric_for_best, train.greater_is_better,
                                            train.early_stopping_patience))
    sharded = job.distributed is not None and job.distributed.strategy == "fsdp"
    if sharded and train.save_every:
        raise ConfigError("checkpoints (--save-every) are not supported with --distributed fsdp "
                          "yet; use ddp, or train without --save-every")
    if not sharded:
        callbacks.append(Checkpointing(job.run.path, train.save_every,
                                       metrics_path=job.run.metrics_path))
    if train.threads is None:
        callbacks.append(AdaptiveThreads())
    callbacks.append(DivergenceGuard(job.run.log, stop=train.stop_on_divergence))
    callbacks.append(ProgressBar(job.spec.progress))
    return callbacks


def _save_artifacts(job: Job) -> None:
    sharded = job.distributed is not None and job.distributed.strategy == "fsdp"
    with whole_parameters(job.loaded.model) if sharded else nullcontext():
        if _is_main(job):
            save_adapter(job.handle, job.run.adapter_path, job.spec.model,
                         tokenizer=job.loaded.tokenizer)
            job.task.save_artifacts(job.run, job.data_info)




def _is_main(job: Job) -> bool:
    return job.distributed is None or job.distributed.is_main


def headline(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _summary(job: Job, result: TrainResult, baseline: dict | None, final: dict,
             periodic: PeriodicEvaluation | None, resumed_from: int | None,
             diverged_at: int | None) -> RunSummary:
    counts = job.handle.parameter_counts()
    return RunSummary(
        model=job.spec.model, method=job.spec.method, task=job.spec.task,
        baseline_metrics=rounded(baseline), final_metrics=rounded(final),
        best_metrics_during_training=rounded(periodic.best_metrics if periodic else None),
        trainable_parameters=counts.trainable, total_parameters=counts.total,
        trainable_percent=round(counts.trainable_percent, 6),
        steps=result.steps, stopped_early=result.stopped_early, diverged_at_step=diverged_at,
        train_input_tokens=result.input_tokens, train_label_tokens=result.label_tokens,
        train_wall_seconds=round(result.wall_seconds, 3),
        train_tokens_per_second=round(result.tokens_per_second, 2),
        final_train_loss=round(result.final_loss, 6),
        final_train_loss_terms={k: round(v, 6) for k, v in result.final_terms.items()},
        peak_memory_bytes=peak_memory_bytes(next(job.handle.model.parameters()).device),
        adapter_bytes=bytes_on_disk(job.run.adapter_path),
        resumed_from_step=resumed_from,
        processes=job.distributed.world_size if job.distributed else 1,
        quantization=job.loaded.quantization,
        base_dtype=job.base_dtype.to_dict() if job.base_dtype else None,
        data=job.data_info, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
