"""`prepare(spec) -> Job`: everything a training run needs before the loop starts — the task,
the run directory, the model with the method applied, the encoded data — built in the order that
makes runs reproducible from the seed alone."""
from __future__ import annotations

import dataclasses
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltatune.data import DataConfig, build_datasets
from deltatune.errors import ConfigError
from deltatune.data.batches import BatchSource, make_batch_source
from deltatune.data.mixing import multitask_batch_source
from deltatune.jobs.multitask import build_task_datasets, multitask_data, shared_label_names
from deltatune.jobs.starting_point import (check_starting_run, earlier_label_names,
                                           grown_label_names, load_starting_weights)
from deltatune.jobs.tasks import Task, get_task
from deltatune.methods import apply, make_config
from deltatune.methods.base import MethodHandle
from deltatune.models import LoadedModel, load_model
from deltatune.quant.precision import BaseDtypeChoice, resolve_base_dtype, use_base_dtype
from deltatune.spec import RunSpec
from deltatune.train.distributed import Distributed
from deltatune.train.run_dir import RunDirectory, default_run_name
from deltatune.train.speed import SpeedOptions, set_threads


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def say(message: str, distributed: Distributed | None = None) -> None:
    if distributed is None or distributed.is_main:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Job:
    spec: RunSpec
    task: Task
    data: DataConfig
    run: RunDirectory
    loaded: LoadedModel
    handle: MethodHandle
    train_examples: list[dict]
    eval_examples: list[dict]
    data_info: dict[str, Any]
    distributed: Distributed | None = None
    base_dtype: BaseDtypeChoice | None = None
    # Packed rows: the task, the method, the config and the model all allow it (see `prepare`).
    packs: bool = False
    # Multi-task runs: each task's training and eval examples by task name (None: one task).
    train_pools: dict[str, list[dict]] | None = None
    eval_sets: dict[str, list[dict]] | None = None

    def batch_source(self) -> BatchSource:
        rank, world = (self.distributed.rank, self.distributed.world_size) \
            if self.distributed else (0, 1)
        if self.train_pools is not None:
            return multitask_batch_source(self.train_pools, self.spec.train.batch_size,
                                          self.spec.seed, self.loaded.tokenizer.pad_token_id,
                                          self.packs, self.spec.multitask.temperature, rank,
                                          world, self.task.encoding)
        return make_batch_source(self.train_examples, self.spec.train.batch_size, self.spec.seed,
                                 self.loaded.tokenizer.pad_token_id, self.packs, rank, world,
                                 self.task.encoding)

    def speed_options(self) -> SpeedOptions:
        train = self.spec.train
        return SpeedOptions(fused_loss=self.task.fuses_loss, packed_attention=self.packs,
                            packed_classification=self.packs and self.task.pools_packed_rows,
                            activation_checkpointing=train.activation_checkpointing,
                            compile=train.compile, allocator=train.allocator)


def run_path(spec: RunSpec, distributed: Distributed | None = None) -> Path:
    path = spec.output_dir or str(Path("runs") / default_run_name(spec.model, spec.method))
    if distributed is not None:
        path = distributed.broadcast_text(path)  # the time stamp of rank 0
    return Path(path)


def check_run_folder(run: RunDirectory, overwrite: bool,
                     distributed: Distributed | None = None) -> None:
    """Refuses a folder that cannot take a new run; every process gets the main one's answer."""
    problem = run.problem(overwrite) if run.writes else None
    if distributed is not None:
        problem = distributed.broadcast_text(problem)
    if problem:
        raise ConfigError(problem)


def prepare(spec: RunSpec, distributed: Distributed | None = None, *, new_run: bool = True,
            overwrite: bool = False, trust_remote_code: bool = False) -> Job:
    """Writes nothing: the run directory is only checked here (for a `new_run`, before the model
    loads) and is started by the caller (`job.run.start`)."""
    set_threads(spec.train.threads)
    set_seed(spec.seed)
    task = get_task(spec.task)
    run = RunDirectory(run_path(spec, distributed),
                       writes=distributed is None or distributed.is_main)
    if new_run:
        check_run_folder(run, overwrite, distributed)
    tasks = multitask_data(spec, task)
    data = tasks[0][1] if tasks else task.resolve_data(spec.data)
    label_names = shared_label_names(task, tasks, spec.seed) if tasks \
        else task.head_labels(data, spec.seed)
    if spec.init_from:
        check_starting_run(spec)
        label_names = grown_label_names(earlier_label_names(task, spec), label_names)
        if label_names is not None:
            data = dataclasses.replace(data, label_names=label_names)
    config = make_config(spec.method, spec.method_options)
    quantize = spec.quantization()
    say(f"loading model {spec.model} ({task.name}"
        f"{', linear layers in ' + quantize if quantize else ''})", distributed)
    loaded = load_model(spec.model, task=task.model_kind,
                        num_labels=len(label_names) if label_names else None,
                        label_names=label_names, trust_remote_code=trust_remote_code,
                        quantize=quantize)
    starting_point = None
    if spec.init_from:
        say(f"starting from the weights of run {spec.init_from}", distributed)
        starting_point = load_starting_weights(loaded.model, spec.init_from, trust_remote_code)
    if distributed is not None:
        loaded.model.to(distributed.device)
    task.adjust_method(config, loaded.model, spec.method_options)
    config.prepare(loaded.tokenizer)
    set_seed(spec.seed)  # method initialisation depends on the seed alone
    handle = apply(loaded.model, config)
    base_dtype = apply_base_dtype(loaded.model, spec.base_dtype, distributed)
    pools = evals = None
    if tasks:
        pools, evals, info = build_task_datasets(tasks, loaded.tokenizer, task, spec.seed,
                                                 label_names)
        train_examples = [e for examples in pools.values() for e in examples]
        eval_examples = [e for examples in evals.values() for e in examples]
    else:
        datasets = build_datasets(data, loaded.tokenizer, task.encoding, spec.seed)
        train_examples, eval_examples = datasets.train, datasets.eval
        info = dict(datasets.info)
    counts = handle.parameter_counts()
    say(f"method {spec.method}: {counts.trainable:,} trainable of {counts.total:,} parameters "
        f"({counts.trainable_percent:.3f}%); {len(train_examples)} train / "
        f"{len(eval_examples)} eval examples"
        + (f" over {len(tasks)} tasks" if tasks else ""), distributed)
    packs = (task.packs and config.supports_packing and spec.train.packing
             and task.model_can_pack(loaded.model))
    if starting_point is not None:
        info["starting_point"] = starting_point
    return Job(spec, task, data, run, loaded, handle, train_examples, eval_examples,
               info, distributed, base_dtype, packs, pools, evals)


def apply_base_dtype(model: torch.nn.Module, requested: str,
                     distributed: Distributed | None = None) -> BaseDtypeChoice:
    """Puts the frozen base in the requested precision (after the method is applied, so its
    trainable parameters stay fp32) and says what "auto" chose and why."""
    device_type = next(model.parameters()).device.type
    choice = resolve_base_dtype(requested, device_type)
    use_base_dtype(model, choice.dtype)
    if requested != "fp32":
        say(f"frozen base in {choice.name} ({choice.reason})", distributed)
    return choice
