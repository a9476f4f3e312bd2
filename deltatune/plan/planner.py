"""`deltatune plan` as a library call: `make_plan(PlanRequest)` reads the model's config and
tokenizer (not its weights), writes the two probe models once, runs each method's two
probe trainings (deltatune/plan/probe.py), extrapolates them to the full depth
(deltatune/plan/estimate.py), compares each peak with the memory budget and asks the seed's
framework (deltatune/plan/framework.py) for a recommendation among the methods that fit.
`write_plan` puts the request, plan.json and plan.md into an output folder atomically."""
from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from deltatune.errors import ConfigError
from deltatune.fileio import checked_output_folder, move_folder_into_place, write_json, write_text
from deltatune.plan.estimate import (MemoryBudget, MethodEstimate, estimate_method,
                                     is_constrained, mark_fits, resolve_budget)
from deltatune.plan.framework import Recommendation, recommend
from deltatune.plan.probe import ProbeRun, ProbeSettings, run_probe, write_probe_model

PLAN_METHODS = ("full", "freeze", "lora", "qlora", "adapter", "prefix", "prompt", "ia3")
PROBE_RUNS = 2  # per method: two depths


def probe_depths(layers: int) -> tuple[int, int]:
    """The two probe depths for a model of `layers` blocks: a quarter and a half of it (at least
    1 and 2). Why not 1 and 2 always: a run's peak is the largest of several phases (the
    backward pass, whose saved activations grow with depth; the head, the evaluation and the
    runtime, which do not). At one or two blocks a depth-independent phase can be the peak, and
    a line through two such points misses the deep model's peak entirely (measured on
    SmolLM2-135M, 30 layers, LoRA 4 x 256: 1 and 2 layers estimated 1.05 GB against 2.51 GB
    measured). At a quarter and a half of the depth the probes peak where the model does, and
    the noise of their difference is multiplied by about 2, not by depth - 1."""
    low = max(1, layers // 4)
    high = max(low + 1, layers // 2)
    return low, high


@dataclass
class PlanRequest:
    """What to plan: the model, the task and the shape of a training step, the methods to
    estimate and the memory to fit in (`memory` like "24GB", or a CUDA `device`; neither: the
    RAM available here)."""
    model: str
    task: str = "causal-lm"
    methods: Sequence[str] = PLAN_METHODS
    batch_size: int = 8
    max_length: int = 256
    eval_batch_size: int = 32
    steps: int = 3
    memory: str | None = None
    device: str | None = None
    num_labels: int = 2
    trust_remote_code: bool = False
    timeout_seconds: float | None = 900.0

    def check(self) -> None:
        unknown = [m for m in self.methods if m not in PLAN_METHODS]
        if unknown:
            raise ConfigError(f"deltatune plan: unknown method(s) {', '.join(unknown)}; choose "
                              f"from {', '.join(PLAN_METHODS)}")
        if not self.methods:
            raise ConfigError("deltatune plan: --methods is empty; name at least one method")
        for name in ("batch_size", "max_length", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got "
                                  f"{getattr(self, name)}")
        if self.steps < 2:
            raise ConfigError("the probe needs at least 2 steps (the first one is not timed)")


@dataclass
class Plan:
    request: PlanRequest
    budget: MemoryBudget
    layers: int
    total_parameters: int
    estimates: list[MethodEstimate]
    recommendation: Recommendation
    cpu: str
    probe_device: str = "cpu"
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"request": asdict(self.request), "budget": asdict(self.budget),
                "layers": self.layers, "total_parameters": self.total_parameters,
                "cpu": self.cpu, "probe_device": self.probe_device,
                "plan_seconds": round(self.seconds, 1), "notes": self.notes,
                "recommendation": asdict(self.recommendation),
                "estimates": [estimate.to_dict() for estimate in self.estimates]}


@dataclass
class ModelSource:
    """The config, tokenizer and transformers class the probe models are built from."""
    config: Any
    tokenizer: Any
    model_class: Any


def model_source(model: str, task: str, num_labels: int,
                 trust_remote_code: bool = False) -> ModelSource:
    """The model's config and tokenizer, without its weights: a known name (its offline copy,
    converted once if it is a GGUF), a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from deltatune.jobs.tasks import get_task
    from deltatune.models.loading import ensure_gguf_cache, load_tokenizer
    from deltatune.models.registry import KNOWN_MODELS

    kind = get_task(task).model_kind
    location: Path | str = model
    entry = KNOWN_MODELS.get(model)
    if entry is not None:
        if entry.kind == "encoder" and kind == "causal-lm":
            raise ConfigError(f"{model} is an encoder; plan it with --task classification")
        path = entry.locate()
        location = entry.hub_id if path is None else (
            ensure_gguf_cache(entry.name, path) if entry.gguf_file else path)
    elif Path(model).expanduser().is_file():
        raise ConfigError(f"deltatune plan needs a model folder or name, not the file {model}")
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the config of {model!r} ({str(error).splitlines()[0]}); "
                          "give a known name (deltatune models), a folder with config.json "
                          "or a hub id") from None
    tokenizer = load_tokenizer(location, trust_remote_code=trust_remote_code)
    if kind == "classification":
        config.num_labels = num_labels
        return ModelSource(config, tokenizer, AutoModelForSequenceClassification)
    return ModelSource(config, tokenizer, AutoModelForCausalLM)


def settings_for(request: PlanRequest, method: str) -> ProbeSettings:
    """The probe run settings of one method: the request's step shape, everything else at the
    `deltatune train` defaults (fp32 base, the reuse allocator, no forgetting probe)."""
    return ProbeSettings(task=request.task, method=method, batch_size=request.batch_size,
                         max_length=request.max_length, eval_batch_size=request.eval_batch_size,
                         steps=request.steps, probe="off", num_labels=request.num_labels)


ProgressCallback = Callable[[str], None]


def make_plan(request: PlanRequest, progress: ProgressCallback | None = None,
              workdir: Path | None = None) -> Plan:
    """Probes every requested method, extrapolates and recommends. `progress` is called once
    per probe run with a short label (the CLI's progress bar). The probe models and runs live in
    `workdir` (a temporary folder, removed afterwards, when not given)."""
    request.check()
    budget = resolve_budget(request.memory, request.device)
    started = time.perf_counter()
    source = model_source(request.model, request.task, request.num_labels,
                          request.trust_remote_code)
    layers = int(source.config.num_hidden_layers)
    owned = workdir is None
    folder = Path(tempfile.mkdtemp(prefix="deltatune-plan-")) if owned else Path(workdir)
    try:
        models = write_probe_models(source, folder)
        estimates = probe_methods(request, models, layers, folder, progress)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
    return _conclude(request, budget, layers, estimates, time.perf_counter() - started)


def write_probe_models(source: ModelSource, folder: Path) -> dict[int, Path]:
    """The probe models (depth -> folder) under `folder`; ones already written are reused."""
    models = {}
    for depth in probe_depths(int(source.config.num_hidden_layers)):
        target = folder / f"model-{depth}"
        models[depth] = target if (target / "config.json").is_file() else write_probe_model(
            source.config, source.tokenizer, source.model_class, depth, target)
    return models


def probe_methods(request: PlanRequest, models: dict[int, Path], layers: int, workdir: Path,
                  progress: ProgressCallback | None = None) -> list[MethodEstimate]:
    """Each requested method's probe runs on the probe `models`, extrapolated to `layers`. The
    synthetic data and the runs go to `workdir`, which must be one per batch shape."""
    estimates = []
    for method in request.methods:
        settings = settings_for(request, method)
        runs: list[ProbeRun] = []
        for depth, model in sorted(models.items()):
            if progress is not None:
                progress(f"{method}, {depth} layer{'s' if depth > 1 else ''}")
            if runs and not runs[-1].ok:  # the method failed once: no second try
                runs.append(ProbeRun(layers=depth, error=runs[-1].error))
                continue
            runs.append(run_probe(model, settings, depth, workdir,
                                  timeout=request.timeout_seconds))
        estimates.append(estimate_method(method, runs, layers))
    return estimates


def _conclude(request: PlanRequest, budget: MemoryBudget, layers: int,
              estimates: list[MethodEstimate], seconds: float) -> Plan:
    from deltatune.quant.precision import cpu_name

    fits = mark_fits(estimates, budget)
    totals = [e.total_parameters for e in estimates if e.method != "qlora" and e.measurable]
    total = min(totals, default=0)  # the base model plus the smallest delta
    constrained = is_constrained(estimates, budget, total)
    recommendation = recommend(total, fits, constrained)
    notes = []
    if budget.device != "cpu":
        notes.append("the probes ran on this machine's CPU (deltatune train uses CUDA only "
                     "under torchrun): the peaks are resident-memory peaks, not CUDA allocator "
                     "peaks, and the step times are CPU times")
    return Plan(request, budget, layers, total, estimates, recommendation, cpu_name(),
                seconds=seconds, notes=notes)


# -- output -----------------------------------------------------------------------------------

COLUMNS = ("method", "trainable params", "weights", "grads", "optimizer", "activations",
           "est. peak", "fits", "est. s/step")


def gigabytes(value: int | None) -> str:
    return "—" if value is None else f"{value / 1e9:.2f} GB"


def parameters(value: int | None) -> str:
    if value is None:
        return "—"
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.2f}{suffix}"
    return str(value)


def table_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for estimate in plan.estimates:
        if not estimate.measurable:
            rows.append([estimate.method, "—", "—", "—", "—", "—", "—", "—", "—"])
            continue
        split = estimate.split
        rows.append([estimate.method, parameters(estimate.trainable_parameters),
                     gigabytes(split.weights), gigabytes(split.gradients),
                     gigabytes(split.optimizer), gigabytes(split.activations),
                     gigabytes(estimate.peak_bytes), "yes" if estimate.fits else "no",
                     "—" if estimate.seconds_per_step is None
                     else f"{estimate.seconds_per_step:.2f}"])
    return rows


def markdown_table(header: Sequence[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(plan: Plan) -> str:
    request = plan.request
    rec = plan.recommendation
    lines = [f"# Plan: {request.model} ({request.task}), batch {request.batch_size} x "
             f"{request.max_length} tokens", "",
             f"Budget: {gigabytes(plan.budget.bytes)} ({plan.budget.source}). "
             f"Model: {plan.total_parameters:,} parameters, {plan.layers} layers. "
             f"Probes on {plan.cpu}, {plan.seconds:.0f} s.", "",
             markdown_table(COLUMNS, table_rows(plan)), ""]
    for estimate in plan.estimates:
        if not estimate.measurable:
            lines.append(f"- {estimate.method}: {estimate.error}")
    lines += ["", f"**Recommendation: {rec.method or 'none'}** — {rec.reason}.", ""]
    lines += [f"Note: {note}." for note in plan.notes]
    lines.append("Activations include the Python/torch runtime; peaks are extrapolated from "
                 f"{' and '.join(map(str, probe_depths(plan.layers)))}-layer probe runs "
                 "(docs/plan.md).")
    return "\n".join(lines) + "\n"


def write_plan(plan: Plan, out: str | Path, overwrite: bool = False) -> Path:
    """config.json (the request), plan.json and plan.md in `out`, built in a staging folder
    beside it and renamed into place, so `out` never holds half a plan."""
    target = checked_output_folder(out, overwrite, [], "")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        folder = staging / target.name
        folder.mkdir()
        write_json(folder / "config.json", asdict(plan.request))
        write_json(folder / "plan.json", plan.to_dict())
        write_text(folder / "plan.md", render_markdown(plan))
        move_folder_into_place(folder, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
