"""Forgetting in a training run: what `run_training` measures and adds, from the spec's `eval:`
(retain sets, probe) and `forgetting:` (mitigations) sections.

`RetentionMeasures` evaluates the retain sets and the probe before training and at every
evaluation (merged into the task's metrics, so they are logged, early-stopped on and summarised
like any metric) and writes what a resumed run needs to the run directory: the base model's
retention numbers and the probe's reference distributions (full fine-tuning has no other way
back to the original). `mitigation_terms` builds the loss terms (KL to the original, EWC,
L2-SP) and `mixed_batch_source` the replay batches. Generic: it asks the task whether it models
language and which head modules are new, and the method handle whether it can switch off.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from deltatune.data.collate import pad_batch
from deltatune.data.retain import RetainSet, encode_retain_examples
from deltatune.errors import ConfigError
from deltatune.eval.forgetting import ForgettingProbe, retention_evaluator
from deltatune.train.objectives import LossTerm

BASELINE_FILE = "forgetting_baseline.json"
PROBE_REFERENCE_FILE = "probe_reference.safetensors"
COMBINED_METRIC = "combined"
LOWER_IS_BETTER = ("perplexity", "loss")
FISHER_BATCH_SIZE = 4

Evaluate = Callable[[], dict[str, Any]]


def data_kind(job: Any) -> str:
    return "language" if job.task.models_language else "classification"


def head_label_names(job: Any) -> list[str] | None:
    return job.data_info.get("label_names")


# -- measuring -------------------------------------------------------------------------------

class RetentionMeasures:
    """The retain sets' metrics and the probe, for one prepared job. `start()` measures the
    base model (call it before training), `__call__()` the model as it is now."""

    def __init__(self, job: Any, progress: bool):
        spec = job.spec
        self.job, self.run_path = job, Path(job.run.path)
        model, tokenizer = job.loaded.model, job.loaded.tokenizer
        self.retention = retention_evaluator(
            model, tokenizer, list(spec.eval.retain), data_kind(job), job.data.max_length,
            head_label_names(job), spec.eval.batch_size, progress) if spec.eval.retain else None
        self.probe = self._make_probe(job)
        self.baseline: dict[str, float] = {}
        self.seconds = 0.0

    @staticmethod
    def _make_probe(job: Any) -> ForgettingProbe | None:
        wanted = job.spec.eval.probe
        if wanted == "off" or (wanted == "auto" and not job.task.models_language):
            return None
        if not job.task.models_language:
            raise ConfigError("the forgetting probe measures a language model's next-token "
                              "distributions; a classifier has none: set eval.probe to off and "
                              "pass --retain-eval with an earlier task's data instead")
        return ForgettingProbe(job.loaded.model, job.loaded.tokenizer, job.spec.model,
                               prompts=job.spec.eval.probe_prompts,
                               new_tokens=job.spec.eval.probe_new_tokens, seed=job.spec.seed)

    @property
    def active(self) -> bool:
        return self.retention is not None or self.probe is not None

    def start(self, resumed: bool) -> dict[str, float]:
        """The base model's retention metrics (read back when resuming)."""
        baseline_path = self.run_path / BASELINE_FILE
        if resumed and baseline_path.is_file():
            self.baseline = dict(json.loads(baseline_path.read_text(encoding="utf-8"))["metrics"])
            if self.probe is not None:
                self.probe.load_reference(self.run_path / PROBE_REFERENCE_FILE)
            return self.baseline
        if self.probe is not None:
            self.probe.capture_reference()
        self.baseline = self()
        if self.job.run.writes:
            if self.probe is not None:
                self.probe.save_reference(self.run_path / PROBE_REFERENCE_FILE)
            self.job.run.write_json(BASELINE_FILE, {"metrics": self.baseline})
        return self.baseline

    def __call__(self) -> dict[str, float]:
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        if self.retention is not None:
            metrics.update(self.retention())
        if self.probe is not None:
            metrics.update(self.probe())
        self.seconds += time.perf_counter() - started
        return metrics

    @property
    def probe_seconds(self) -> float:
        return self.probe.seconds if self.probe is not None else 0.0

    def retention_rise(self, metrics: dict[str, float]) -> float:
        """Mean rise over the base model of the retain sets' losses, plus the probe's KL (0 for
        the base model): the forgetting part of the `combined` metric."""
        rises = [metrics[name] - self.baseline[name] for name in metrics
                 if name.startswith("retain_") and name.endswith("_loss")
                 and name in self.baseline]
        kl = metrics.get("probe_kl", 0.0)
        return (sum(rises) / len(rises) if rises else 0.0) + kl

    def wrap(self, evaluate: Evaluate, retention_weight: float) -> Evaluate:
        """The task's evaluation plus the retention metrics and `combined` (task loss +
        retention_weight * retention rise; lower is better)."""
        def evaluate_with_retention() -> dict[str, Any]:
            metrics = dict(evaluate())
            retained = self()
            metrics.update(retained)
            if "loss" in metrics:
                metrics[COMBINED_METRIC] = metrics["loss"] + retention_weight * \
                    self.retention_rise(retained)
            return metrics
        return evaluate_with_retention


def forgetting_summary(job: Any, measures: RetentionMeasures | None, baseline: dict | None,
                       final: dict[str, Any], mitigation_seconds: float) -> dict[str, Any]:
    """summary.json's `forgetting` section: the task's gain and every retention metric's change,
    side by side, plus what measuring and mitigating cost."""
    primary = _primary_metric(final)
    section: dict[str, Any] = {"mitigations": job.spec.forgetting.active}
    if primary and baseline and primary in baseline:
        change = final[primary] - baseline[primary]
        section["task"] = {"metric": primary, "before": baseline[primary],
                           "after": final[primary],
                           # Positive = better: a perplexity that falls is a gain.
                           "gain": round(-change if primary in LOWER_IS_BETTER else change, 6)}
    if measures is not None and measures.active:
        section["retention"] = {
            name: {"before": before, "after": final.get(name),
                   "change": round(final[name] - before, 6) if name in final else None}
            for name, before in measures.baseline.items()}
        section["measure_seconds"] = round(measures.seconds, 3)
        section["probe_seconds"] = round(measures.probe_seconds, 3)
    section["mitigation_setup_seconds"] = round(mitigation_seconds, 3)
    return section


def retention_headline(section: dict[str, Any]) -> str:
    """One line: the task gain next to each retention change."""
    parts = []
    task = section.get("task")
    if task:
        parts.append(f"task {task['metric']} {task['before']:.4f} -> {task['after']:.4f} "
                     f"(gain {task['gain']:+.4f})")
    for name, values in section.get("retention", {}).items():
        if name.endswith(("_perplexity", "_accuracy")) or name == "probe_kl":
            if values["after"] is not None:
                parts.append(f"{name} {values['before']:.4f} -> {values['after']:.4f}")
    return "; ".join(parts)


def _primary_metric(metrics: dict[str, Any]) -> str | None:
    for name in ("exact_match", "accuracy", "perplexity"):
        if name in metrics:
            return name
    return None


# -- mitigating ------------------------------------------------------------------------------

def mitigation_terms(job: Any) -> list[LossTerm]:
    """The loss terms the `forgetting:` section asks for, built from the model as it is before
    training (the weights every penalty measures distance from)."""
    config, terms = job.spec.forgetting, []
    if config.kl_weight:
        terms.append(_kl_term(job))
    if config.ewc_weight:
        terms.append(_ewc_term(job))
    if config.l2sp_weight:
        from deltatune.forgetting.l2sp import L2SPPenalty
        terms.append(L2SPPenalty(job.handle, config.l2sp_weight, exclude=new_head_names(job)))
    return terms


def new_head_names(job: Any) -> list[str]:
    """Freshly initialised head modules: task-specific, so the penalties leave them out (as
    L2-SP's authors do). A head carried over from an earlier run (init_from) is not new."""
    if job.spec.init_from:
        return []
    children = dict(job.loaded.model.named_children())
    return [name for name in job.task.new_head_names if name in children]


def _kl_term(job: Any) -> LossTerm:
    from deltatune.forgetting.kl import KLToOriginal, OriginalModel
    if not job.task.models_language:
        raise ConfigError("--kl-weight (KL to the original model) is for language models; for "
                          "a classifier use --replay, --ewc-weight or --l2sp-weight")
    config = job.spec.forgetting
    return KLToOriginal(OriginalModel.for_handle(job.handle), config.kl_weight,
                        config.kl_temperature)


def _ewc_term(job: Any) -> LossTerm:
    from deltatune.forgetting.ewc import EWCPenalty
    config = job.spec.forgetting
    source = config.ewc_data or config.replay or (job.spec.eval.retain[0]
                                                  if job.spec.eval.retain else None)
    if source is None:
        raise ConfigError("EWC needs data of what the model should keep, to estimate the Fisher "
                          "information on: pass --ewc-data PATH (or --replay / --retain-eval)")
    examples = side_examples(job, source)
    pad = job.loaded.tokenizer.pad_token_id
    batches = [pad_batch(examples[start:start + FISHER_BATCH_SIZE], pad)
               for start in range(0, len(examples), FISHER_BATCH_SIZE)]
    objective = job.task.objective()
    return EWCPenalty.for_handle(job.handle, batches,
                                 lambda model, batch: objective(model, batch).loss,
                                 weight=config.ewc_weight, max_batches=config.ewc_batches,
                                 exclude=new_head_names(job), progress=job.spec.progress)


def side_examples(job: Any, source: RetainSet) -> list[dict]:
    """A replay or EWC data file encoded like the run's own examples."""
    return encode_retain_examples(source, job.loaded.tokenizer, data_kind(job),
                                  job.data.max_length, head_label_names(job), None,
                                  job.spec.seed)


def mixed_batch_source(job: Any) -> Any:
    """The job's batch source, with the replay share of every micro-batch when asked for."""
    config = job.spec.forgetting
    if config.replay is None:
        return job.batch_source()
    if job.train_pools is not None:
        raise ConfigError("replay and multitask are two ways to mix data; in a multi-task run "
                          "add the replay data as one more task instead")
    from deltatune.data.mixing import replay_batch_source
    rank, world = (job.distributed.rank, job.distributed.world_size) \
        if job.distributed else (0, 1)
    return replay_batch_source(job.train_examples, side_examples(job, config.replay),
                               config.replay_fraction, job.spec.train.batch_size, job.spec.seed,
                               job.loaded.tokenizer.pad_token_id, job.packs, rank, world,
                               job.task.encoding)
