"""Loading a trained run (or a base model plus an adapter folder) back for inference:
`evaluate_saved(EvalRequest)` serves `deltatune eval`, `generate_text(GenerateRequest)` serves
`deltatune generate`. Requests are plain dataclasses; the CLI fills them from its flags. A run
folder or adapter may come from someone else: its custom code runs only with
`trust_remote_code=True`, and metrics that are not finite come back as null (JSON has no NaN)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.data import DataConfig, build_datasets
from deltatune.data.templates import render_prompt
from deltatune.errors import AdapterFormatError, ConfigError
from deltatune.eval.evaluate import stop_token_ids
from deltatune.jobs.preparation import set_seed
from deltatune.jobs.summary import rounded
from deltatune.jobs.tasks import get_task
from deltatune.methods.adapter_io import load_adapter
from deltatune.methods.base import MethodHandle
from deltatune.models import LoadedModel, load_model
from deltatune.models.loading import load_tokenizer
from deltatune.quant.precision import resolve_base_dtype, use_base_dtype
from deltatune.spec import RunSpec, read_run_spec

DEFAULT_MODEL = "smollm2-135m"


@dataclass
class EvalRequest:
    """Evaluate `model` (+ `adapter`) or a run directory on `data` (default: the run's own eval
    split). Unset fields keep the run's settings."""
    model: str | None = None
    run: str | None = None
    adapter: str | None = None
    data: str | None = None
    task: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    header: bool | None = None
    template: str | None = None
    metric: str | None = None
    max_length: int | None = None
    limit: int | None = None
    batch_size: int = 32
    progress: bool = True
    trust_remote_code: bool = False


@dataclass
class GenerateRequest:
    prompt: str
    model: str | None = None
    run: str | None = None
    adapter: str | None = None
    system: str | None = None
    # None: the chat template when the tokenizer has one, else alpaca; "none": the raw prompt.
    template: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    trust_remote_code: bool = False


def load_for_inference(model: str | None, adapter: str | None, run_dir: str | None,
                       task_name: str = "causal-lm", trust_remote_code: bool = False
                       ) -> tuple[LoadedModel, MethodHandle | None, RunSpec | None]:
    """A base model plus, optionally, an adapter folder or a run directory's adapter (and the
    tokenizer saved with it). `trust_remote_code` applies to the model and that tokenizer."""
    spec = read_run_spec(run_dir) if run_dir else None
    if spec is not None:
        model = model or spec.model
        task_name = spec.task
        adapter = adapter or str(Path(run_dir) / "adapter")
    if model is None:
        raise ConfigError("say which model: --model NAME_OR_PATH, or --run RUN_DIR")
    task = get_task(task_name)
    label_names = task.saved_labels(Path(run_dir)) if run_dir else None
    # A run trained on a quantized base is evaluated on the same base, in the same precision.
    loaded = load_model(model, task=task.model_kind,
                        num_labels=len(label_names) if label_names else None,
                        label_names=label_names, trust_remote_code=trust_remote_code,
                        quantize=spec.quantization() if spec is not None else None)
    if spec is not None and spec.init_from:
        # The run trained on top of an earlier run's weights: put them back first.
        from deltatune.jobs.starting_point import load_starting_weights
        load_starting_weights(loaded.model, spec.init_from, trust_remote_code)
    handle = None
    if adapter:
        if (Path(adapter) / "tokenizer_config.json").is_file():
            loaded.tokenizer = load_tokenizer(adapter, trust_remote_code,
                                              error_class=AdapterFormatError)
        handle = load_adapter(loaded.model, adapter)
        loaded.model.eval()
    if spec is not None and spec.base_dtype != "fp32":
        use_base_dtype(loaded.model, resolve_base_dtype(spec.base_dtype).dtype)
    return loaded, handle, spec


def evaluate_saved(request: EvalRequest) -> dict[str, Any]:
    """`deltatune eval`: a base model or a run/adapter on a dataset (default: the run's eval)."""
    loaded, _, run_spec = load_for_inference(request.model, request.adapter, request.run,
                                             request.task or "causal-lm",
                                             request.trust_remote_code)
    spec = run_spec or RunSpec(model=request.model, task=request.task or "causal-lm")
    task = get_task(spec.task)
    data = _evaluation_data(spec, request)
    eval_config = dataclasses.replace(spec.eval, batch_size=request.batch_size,
                                      **({"metric": request.metric} if request.metric else {}))
    if request.run and task.saved_labels(Path(request.run)):
        # The head's class order is the run's, whatever labels the new file happens to have.
        data = dataclasses.replace(data, label_names=task.saved_labels(Path(request.run)))
    datasets = build_datasets(data, loaded.tokenizer, task.encoding, spec.seed)
    metrics = task.evaluator(loaded, datasets.eval, datasets.info, eval_config,
                             request.progress)()
    return finite_or_null({"model": spec.model,
                           "adapter": request.adapter or (request.run and "run adapter"),
                           "examples": len(datasets.eval), **rounded(metrics)})


def finite_or_null(metrics: dict[str, Any]) -> dict[str, Any]:
    """The metrics with NaN/inf replaced by None (JSON null) and named under `non_finite`: the
    output stays strict JSON that other tools parse, and the problem stays visible."""
    bad = sorted(name for name, value in metrics.items()
                 if isinstance(value, float) and not math.isfinite(value))
    if not bad:
        return metrics
    return {**{name: None if name in bad else value for name, value in metrics.items()},
            "non_finite": bad}


def _evaluation_data(spec: RunSpec, request: EvalRequest) -> DataConfig:
    updates: dict[str, Any] = {}
    if request.data:
        updates = {"train": None, "builtin": None, "eval": request.data}
    if request.columns:
        updates["columns"] = dict(request.columns)
    for name in ("template", "max_length", "header"):
        if getattr(request, name) is not None:
            updates[name] = getattr(request, name)
    if request.limit:
        updates["eval_limit"] = request.limit
    data = dataclasses.replace(spec.data, **updates)
    if data.train is None and data.builtin is None and data.eval is None:
        raise ConfigError("nothing to evaluate on: pass --data PATH (or --run RUN_DIR)")
    if data.train is None and data.builtin is None:
        # An eval file alone: it is the eval split (there is no training split to carve it from).
        data = dataclasses.replace(data, train=data.eval)
    return data


def generate_text(request: GenerateRequest) -> str:
    """`deltatune generate`: one reply from a base model plus an optional adapter."""
    model_name = request.model or (None if request.run else DEFAULT_MODEL)
    loaded, _, _ = load_for_inference(model_name, request.adapter, request.run,
                                      trust_remote_code=request.trust_remote_code)
    tokenizer = loaded.tokenizer
    template = request.template or ("chat" if getattr(tokenizer, "chat_template", None)
                                    else "alpaca")
    prompt_ids = render_prompt(request.prompt, tokenizer, template, system=request.system)
    set_seed(request.seed)
    input_ids = torch.tensor([prompt_ids], device=next(loaded.model.parameters()).device)
    sampling = {"do_sample": True, "temperature": request.temperature} \
        if request.temperature > 0 else {"do_sample": False}
    with torch.inference_mode():
        output = loaded.model.generate(input_ids=input_ids,
                                       attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=request.max_new_tokens,
                                       pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=stop_token_ids(tokenizer), **sampling)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
