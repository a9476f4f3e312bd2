"""One fine-tuning job end to end: config → model (+ method) → data → baseline eval → train →
final eval → adapter + run directory. `deltatune train` is a thin shell around `run_training`;
`evaluate_run` and `load_for_inference` serve `deltatune eval` and `deltatune generate`."""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from deltatune.data import (DataConfig, build_datasets, read_records, require_fields,
                            resolve_label_names)
from deltatune.data.collate import iterate_batches, pad_batch
from deltatune.errors import ConfigError
from deltatune.eval.evaluate import (evaluate_classification, evaluate_exact_match,
                                     evaluate_perplexity)
from deltatune.eval.memory import peak_memory_bytes
from deltatune.methods import apply, make_config
from deltatune.methods.adapter_io import load_adapter, save_adapter
from deltatune.methods.base import MethodConfig, MethodHandle
from deltatune.models import LoadedModel, load_model
from deltatune.spec import RunSpec
from deltatune.train.config import TrainConfig
from deltatune.train.loop import BatchSource, train
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective
from deltatune.train.run_dir import RunDirectory, default_run_name
from deltatune.train.speed import SpeedOptions, set_threads, speed_options_applied

# Names of a freshly initialised task head, per architecture family; it must train with any
# method, so it is added to `modules_to_save` when the user did not say otherwise.
CLASSIFICATION_HEAD_NAMES = ("classifier", "score")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- building blocks ---------------------------------------------------------------------------

def data_config(spec: RunSpec) -> DataConfig:
    data = spec.data
    builtin = data.builtin
    if not data.train and not builtin:
        if spec.task != "causal-lm":
            raise ConfigError(f"task '{spec.task}' needs training data: pass --train PATH")
        builtin = "dates"
    return DataConfig(train=data.train, eval=data.eval, builtin=builtin, columns=dict(data.columns),
                      eval_columns=dict(data.eval_columns) if data.eval_columns else None,
                      template=data.template, max_length=data.max_length,
                      eval_fraction=data.eval_fraction, train_limit=data.train_limit,
                      eval_limit=data.eval_limit, seed=spec.seed, task=spec.task,
                      label_names=data.label_names, placeholders=dict(data.placeholders),
                      builtin_train_size=data.builtin_train_size,
                      builtin_eval_size=data.builtin_eval_size)


def discover_label_names(config: DataConfig) -> list[str]:
    """Class names from the training file (the model's new head needs their count up front)."""
    records = read_records(config.train, config.columns)
    require_fields(records, ["label"], config.train, " (map it with --column label=NAME)")
    return resolve_label_names([r["label"] for r in records], config.label_names)


def method_config(spec: RunSpec, model: torch.nn.Module) -> MethodConfig:
    config = make_config(spec.method, spec.method_options)
    if spec.task == "classification" and "modules_to_save" not in spec.method_options:
        children = dict(model.named_children())
        config.modules_to_save = [n for n in CLASSIFICATION_HEAD_NAMES if n in children]
    return config


# Switches applied to the model around the loop (training_speed_options), not loop settings.
SPEED_FIELDS = {"activation_checkpointing", "compile", "allocator", "threads"}


def train_config(spec: RunSpec) -> TrainConfig:
    return TrainConfig(seed=spec.seed, **spec.train.model_dump(exclude=SPEED_FIELDS))


def primary_metric(spec: RunSpec, has_references: bool) -> str:
    if spec.eval.metric != "auto":
        return spec.eval.metric
    if spec.task == "classification":
        return "accuracy"
    return "exact_match" if spec.task == "causal-lm" and has_references else "perplexity"


def make_evaluator(spec: RunSpec, loaded: LoadedModel, examples: list[dict],
                   label_names: list[str] | None) -> Callable[[], dict[str, Any]]:
    model, tokenizer, pad = loaded.model, loaded.tokenizer, loaded.tokenizer.pad_token_id
    if spec.task == "classification":
        return lambda: evaluate_classification(model, examples, len(label_names or []), pad,
                                               spec.eval.batch_size, spec.progress)
    has_references = all("reference" in e for e in examples)
    metric = primary_metric(spec, has_references)
    if metric == "exact_match":
        if not has_references:
            raise ConfigError("metric exact_match needs instruction data with responses; "
                              "use --metric perplexity for plain text")

        def exact_match_and_loss() -> dict[str, Any]:
            scores = evaluate_exact_match(model, tokenizer, examples, spec.eval.max_new_tokens,
                                          spec.eval.batch_size, spec.progress)
            scores.update(evaluate_perplexity(model, examples, pad, spec.eval.batch_size))
            return scores
        return exact_match_and_loss
    return lambda: evaluate_perplexity(model, examples, pad, spec.eval.batch_size, spec.progress)


def batch_source(spec: RunSpec, handle: MethodHandle, examples: list[dict],
                 pad_token_id: int) -> BatchSource:
    """Packed rows for causal-LM training when the method allows it, padded batches otherwise."""
    size = spec.train.batch_size
    if uses_packing(spec, handle):
        from deltatune.data.packing import packed_batches

        # Same examples per step as padded batching, all in one row: no padding computed.
        return lambda epoch: packed_batches(examples, spec.seed, epoch, pad_token_id,
                                            batch_size=size)
    return lambda epoch: (pad_batch(chunk, pad_token_id)
                          for chunk in iterate_batches(examples, size, spec.seed, epoch))


def uses_packing(spec: RunSpec, handle: MethodHandle) -> bool:
    return (spec.task != "classification" and spec.train.packing
            and handle.config.supports_packing)


def training_speed_options(spec: RunSpec, job: "TrainingJob"):
    """The speed switches of `spec.train`, for the training loop only (a context manager)."""
    options = SpeedOptions(packed_attention=uses_packing(spec, job.handle),
                           activation_checkpointing=spec.train.activation_checkpointing,
                           compile=spec.train.compile, allocator=spec.train.allocator)
    return speed_options_applied(job.loaded.model, options)


def bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _round(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


# -- the job -----------------------------------------------------------------------------------

@dataclass
class TrainingJob:
    spec: RunSpec
    run: RunDirectory
    loaded: LoadedModel
    handle: MethodHandle
    train_examples: list[dict]
    eval_examples: list[dict]
    data_info: dict[str, Any]


def prepare_job(spec: RunSpec) -> TrainingJob:
    set_threads(spec.train.threads)
    set_seed(spec.seed)
    output = Path(spec.output_dir or Path("runs") / default_run_name(spec.model, spec.method))
    run = RunDirectory(output)
    run.write_config(spec.model_dump())
    dataset_config = data_config(spec)
    label_names = None
    if spec.task == "classification":
        label_names = discover_label_names(dataset_config)
    task = "classification" if spec.task == "classification" else "causal-lm"
    say(f"loading model {spec.model} ({task})")
    loaded = load_model(spec.model, task=task, num_labels=len(label_names) if label_names else None,
                        label_names=label_names)
    config = method_config(spec, loaded.model)
    config.prepare(loaded.tokenizer)
    set_seed(spec.seed)  # method initialisation depends on the seed alone
    handle = apply(loaded.model, config)
    datasets = build_datasets(dataset_config, loaded.tokenizer)
    counts = handle.parameter_counts()
    say(f"method {spec.method}: {counts.trainable:,} trainable of {counts.total:,} parameters "
        f"({counts.trainable_percent:.3f}%); {len(datasets.train)} train / "
        f"{len(datasets.eval)} eval examples")
    return TrainingJob(spec, run, loaded, handle, datasets.train, datasets.eval,
                       dict(datasets.info))


def run_training(spec: RunSpec) -> dict[str, Any]:
    """Runs one job and returns its summary (also written to summary.json)."""
    job = prepare_job(spec)
    label_names = job.data_info.get("label_names")
    evaluate = make_evaluator(spec, job.loaded, job.eval_examples, label_names)
    baseline = None
    if spec.eval.baseline:
        say("evaluating before training (baseline)")
        baseline = evaluate()
        job.run.log({"step": 0, **{f"eval_{k}": v for k, v in baseline.items()}})
        say(f"baseline: {_headline(baseline)}")
    pad = job.loaded.tokenizer.pad_token_id
    source = batch_source(spec, job.handle, job.train_examples, pad)
    micro_batches = sum(1 for _ in source(0))
    objective = ClassificationObjective() if spec.task == "classification" \
        else CausalLMObjective()
    with training_speed_options(spec, job):
        result = train(job.handle, source, micro_batches, objective, train_config(spec), job.run,
                       evaluate if spec.train.eval_every else None, spec.progress)
    say("evaluating after training")
    final = evaluate()
    job.run.log({"step": result.steps, **{f"eval_{k}": v for k, v in final.items()}})
    say(f"tuned: {_headline(final)}")
    save_adapter(job.handle, job.run.adapter_path, spec.model, tokenizer=job.loaded.tokenizer)
    if spec.task == "classification":
        job.run.write_json("labels.json", {"label_names": label_names})
    summary = _summary(job, result, baseline, final)
    job.run.write_summary(summary)
    say(f"run directory: {job.run.path}")
    return summary


def _headline(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def _summary(job: TrainingJob, result: Any, baseline: dict | None, final: dict) -> dict[str, Any]:
    counts = job.handle.parameter_counts()
    return {
        "model": job.spec.model, "method": job.spec.method, "task": job.spec.task,
        "baseline_metrics": _round(baseline), "final_metrics": _round(final),
        "best_metrics_during_training": _round(result.best_metrics),
        "trainable_parameters": counts.trainable, "total_parameters": counts.total,
        "trainable_percent": round(counts.trainable_percent, 6),
        "steps": result.steps, "stopped_early": result.stopped_early,
        "train_input_tokens": result.input_tokens, "train_label_tokens": result.label_tokens,
        "train_wall_seconds": round(result.wall_seconds, 3),
        "train_tokens_per_second": round(result.tokens_per_second, 2),
        "final_train_loss": round(result.final_loss, 6),
        "peak_memory_bytes": peak_memory_bytes(next(job.handle.model.parameters()).device),
        "adapter_bytes": bytes_on_disk(job.run.adapter_path),
        "data": job.data_info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# -- inference from a run ----------------------------------------------------------------------

def read_run_spec(run_dir: str | Path) -> RunSpec:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no config.yaml); pass the folder "
                          "`deltatune train` wrote")
    return RunSpec.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))


def load_for_inference(model: str | None, adapter: str | None, run_dir: str | None,
                       task: str = "causal-lm") -> tuple[LoadedModel, MethodHandle | None, RunSpec | None]:
    """A base model plus, optionally, an adapter folder or a run directory's adapter."""
    spec = read_run_spec(run_dir) if run_dir else None
    if spec is not None:
        model = model or spec.model
        task = "classification" if spec.task == "classification" else "causal-lm"
        adapter = adapter or str(Path(run_dir) / "adapter")
    if model is None:
        raise ConfigError("say which model: --model NAME_OR_PATH, or --run RUN_DIR")
    label_names = None
    if task == "classification" and run_dir:
        import json
        label_names = json.loads((Path(run_dir) / "labels.json").read_text())["label_names"]
    loaded = load_model(model, task=task, num_labels=len(label_names) if label_names else None,
                        label_names=label_names)
    handle = None
    if adapter:
        if (Path(adapter) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer
            loaded.tokenizer = AutoTokenizer.from_pretrained(adapter)
        handle = load_adapter(loaded.model, adapter)
        loaded.model.eval()
    return loaded, handle, spec


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def evaluate_saved(args: Any) -> dict[str, Any]:
    """`deltatune eval`: a base model or a run/adapter on a dataset (default: the run's eval)."""
    task = args.task or "causal-lm"
    loaded, _, run_spec = load_for_inference(args.model, args.adapter, args.run, task)
    spec = run_spec or RunSpec(model=args.model, task=task)
    updates: dict[str, Any] = {}
    if args.data:
        updates = {"train": None, "builtin": None, "eval": args.data}
    if args.column:
        from deltatune.cli import _key_values
        updates["columns"] = {k: str(v) for k, v in _key_values(args.column, "--column").items()}
    for name in ("template", "max_length"):
        if getattr(args, name, None) is not None:
            updates[name] = getattr(args, name)
    if args.limit:
        updates["eval_limit"] = args.limit
    data = spec.data.model_copy(update=updates)
    spec = spec.model_copy(update={
        "data": data, "progress": not args.no_progress,
        "eval": spec.eval.model_copy(update={"batch_size": args.batch_size,
                                             **({"metric": args.metric} if args.metric else {})})})
    if spec.data.train is None and spec.data.builtin is None and spec.data.eval is None:
        raise ConfigError("nothing to evaluate on: pass --data PATH (or --run RUN_DIR)")
    datasets = build_datasets(data_config(spec), loaded.tokenizer)
    metrics = make_evaluator(spec, loaded, datasets.eval, datasets.info.get("label_names"))()
    return {"model": spec.model, "adapter": args.adapter or (args.run and "run adapter"),
            "examples": len(datasets.eval), **_round(metrics)}


def generate_text(args: Any) -> str:
    """`deltatune generate`: one reply from a base model plus an optional adapter."""
    from deltatune.data.templates import render_prompt
    from deltatune.eval.evaluate import _stop_token_ids

    model_name = args.model or (None if args.run else "smollm2-135m")
    loaded, _, _ = load_for_inference(model_name, args.adapter, args.run)
    tokenizer = loaded.tokenizer
    template = "none" if args.no_chat else (args.template or (
        "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"))
    prompt_ids = render_prompt(args.prompt, tokenizer, template, system=args.system)
    set_seed(args.seed)
    input_ids = torch.tensor([prompt_ids], device=next(loaded.model.parameters()).device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.temperature > 0 \
        else {"do_sample": False}
    with torch.inference_mode():
        output = loaded.model.generate(input_ids=input_ids,
                                       attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=args.max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=_stop_token_ids(tokenizer), **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
