"""The model a compression job starts from, as one dense plain model: a known name, a folder or a
hub id as it is, or a trained run with its adapter merged into the weights and the adapter
wrappers removed, in fp32. `deltatune prune`, `distill` and `quantize` take either; pruning
surgery and distillation need ordinary `nn.Linear` layers, not wrappers around them."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from deltatune.data import DataConfig
from deltatune.errors import ConfigError
from deltatune.jobs.inference import load_for_inference
from deltatune.jobs.tasks import Task, get_task
from deltatune.models import LoadedModel
from deltatune.quant import dequantize_model
from deltatune.spec import CONFIG_FILE, RunSpec


@dataclass
class DenseSource:
    """A loaded dense model, the task it is for, and the run it came from (None for a model)."""
    loaded: LoadedModel
    task: Task
    spec: RunSpec | None

    @property
    def is_run(self) -> bool:
        return self.spec is not None


def is_run_directory(source: str) -> bool:
    return (Path(source) / CONFIG_FILE).is_file()


def load_dense_source(source: str, task_name: str | None = None,
                      trust_remote_code: bool = False, unwrap: bool = True) -> DenseSource:
    """Loads `source` dense. A run's task is its own (`task_name` must agree or be None); a
    model's is `task_name` (default causal-lm). `unwrap=False` keeps merged adapter wrappers in
    place (enough for code that only reads the weights)."""
    if not is_run_directory(source):
        task = get_task(task_name or "causal-lm")
        say(f"loading model {source}")
        loaded, _, _ = load_for_inference(source, None, None, task.name,
                                          trust_remote_code=trust_remote_code)
        return DenseSource(loaded, task, None)
    say(f"loading run {source}")
    loaded, handle, spec = load_for_inference(None, None, source,
                                              trust_remote_code=trust_remote_code)
    if task_name is not None and task_name != spec.task:
        raise ConfigError(f"run {source} was trained for task '{spec.task}', not "
                          f"'{task_name}'; drop --task or pass the matching run")
    dequantize_model(loaded.model)  # a QLoRA run: its base is merged dense
    if handle is not None:
        if not handle.can_merge:
            raise ConfigError(f"the run's method '{spec.method}' keeps no weight delta that can "
                              "be merged into the model, so there is no single model to "
                              "compress; use its base model instead")
        handle.merge()
        if unwrap:
            from deltatune.jobs.export import sync_config, unwrap_merged
            unwrap_merged(loaded.model, handle)
            sync_config(loaded.model)
    to_fp32(loaded.model)
    return DenseSource(loaded, get_task(spec.task), spec)


def source_data(source: DenseSource, source_path: str, data: DataConfig | None, seed: int,
                purpose: str) -> DataConfig:
    """The data a compression job works on: `data` if given, else the run's own; a classification
    head's class order is the run's (labels.json) or the one the data gives."""
    data = data or (source.spec.data if source.spec else None)
    if data is None or not (data.train or data.builtin):
        raise ConfigError(f"{purpose} needs data: pass --train FILE (and --eval FILE), or give "
                          "a run directory, which has its own")
    data = source.task.resolve_data(data)
    if source.is_run:
        labels = source.task.saved_labels(Path(source_path))
        if labels:
            return dataclasses.replace(data, label_names=labels)
    if data.label_names is None:
        labels = source.task.head_labels(data, seed)
        if labels:
            return dataclasses.replace(data, label_names=labels)
    return data


def to_fp32(model: torch.nn.Module) -> None:
    """Undoes a run's `--base-dtype bf16` (frozen weights cast, autocast hooks)."""
    for parameter in model.parameters():
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    hooks = getattr(model, "_deltatune_autocast", None)
    if hooks is not None:
        for handle in hooks[1]:
            handle.remove()
        del model._deltatune_autocast


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
