"""Multi-task fine-tuning in one run (the spec's `multitask:` section): every task's data is
encoded with the run's encoding and the shared head (a classifier's head holds the classes of all
tasks, in task order), batches draw tasks by temperature sampling, and evaluation reports each
task's metrics under its name (`sst2_accuracy`) plus their mean under the plain name, which
early stopping and the summary use."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from deltatune.data import DataConfig, build_datasets
from deltatune.errors import ConfigError

Evaluate = Callable[[], dict[str, Any]]


def multitask_data(spec: Any, task: Any) -> list[tuple[str, DataConfig]]:
    """(name, data config with its task prefix) per task; [] for a single-task run."""
    if spec.multitask is None or not spec.multitask.tasks:
        return []
    names = [entry.name for entry in spec.multitask.tasks]
    if len(set(names)) != len(names) or any(not name or "_" in name for name in names):
        raise ConfigError(f"multitask task names must be distinct, non-empty and without '_' "
                          f"(they prefix the metrics), got {names}")
    if len(names) < 2:
        raise ConfigError("multitask needs at least two tasks; for one, use the data: section")
    if spec.data.train or spec.data.builtin:
        raise ConfigError("give either data: (one task) or multitask.tasks (several), not both")
    return [(entry.name, dataclasses.replace(task.resolve_data(entry.data),
                                             task_prefix=spec.multitask.prefix_for(entry)))
            for entry in spec.multitask.tasks]


def shared_label_names(task: Any, entries: list[tuple[str, DataConfig]],
                       seed: int) -> list[str] | None:
    """The head's classes: every task's, in task order, each once."""
    names: list[str] = []
    for _, data in entries:
        for label in task.head_labels(data, seed) or []:
            if label not in names:
                names.append(label)
    return names or None


def build_task_datasets(entries: list[tuple[str, DataConfig]], tokenizer: Any, task: Any,
                        seed: int, label_names: list[str] | None
                        ) -> tuple[dict[str, list], dict[str, list], dict[str, Any]]:
    """(train pools, eval sets, info) with each task's info under `tasks`."""
    pools, evals, infos = {}, {}, {}
    for name, data in entries:
        if label_names is not None:
            data = dataclasses.replace(data, label_names=label_names)
        datasets = build_datasets(data, tokenizer, task.encoding, seed)
        pools[name], evals[name], infos[name] = datasets.train, datasets.eval, datasets.info
    info = dict(next(iter(infos.values())))
    info.update({"tasks": infos, "train_examples": sum(len(p) for p in pools.values()),
                 "eval_examples": sum(len(e) for e in evals.values())})
    if label_names is not None:
        info["label_names"], info["num_labels"] = label_names, len(label_names)
    return pools, evals, info


def multitask_evaluator(job: Any, progress: bool) -> Evaluate:
    """Each task's metrics prefixed with its name, and the mean over tasks of every metric all
    tasks report."""
    evaluators = {name: job.task.evaluator(job.loaded, examples, job.data_info, job.spec.eval,
                                           progress)
                  for name, examples in job.eval_sets.items()}

    def evaluate() -> dict[str, Any]:
        per_task = {name: evaluator() for name, evaluator in evaluators.items()}
        metrics: dict[str, Any] = {}
        shared = set.intersection(*(set(m) for m in per_task.values()))
        for key in sorted(shared):
            values = [m[key] for m in per_task.values()]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                metrics[key] = sum(values) / len(values)
        for name, task_metrics in per_task.items():
            metrics.update({f"{name}_{key}": value for key, value in task_metrics.items()
                            if isinstance(value, (int, float))})
        return metrics
    return evaluate
