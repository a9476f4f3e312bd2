"""The arithmetic of `deltatune plan`: from two measured probe runs (deltatune/plan/probe.py) of
the model cut to a few layers, the full model's peak memory and seconds per step by linear
extrapolation in the number of layers; the split of that peak into weights, gradients, AdamW
state and the rest (activations plus the Python/torch runtime); and the memory budget it is
compared with (`--memory 24GB`, a CUDA device's total memory, or this machine's available RAM).

Why linear in the layer count: every decoder or encoder block of a transformer has the same
shapes, so what a block adds — its weights, their gradients and optimizer state, the activations
it saves for the backward pass — is the same for every block; what does not grow with depth (the
runtime, the embeddings, the head and its logits, the data) is the intercept. Two depths give
both, and nothing in the estimate is a constant fitted by hand."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from deltatune.errors import ConfigError
from deltatune.plan.probe import ProbeRun

FP32_BYTES = 4
# AdamW keeps two fp32 moments (exp_avg, exp_avg_sq) per trainable parameter.
ADAMW_STATE_BYTES = 8

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20,
          "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def extrapolate(layers_a: int, value_a: float, layers_b: int, value_b: float,
                layers: int) -> float:
    """The straight line through (layers_a, value_a) and (layers_b, value_b) at `layers`."""
    if layers_a == layers_b:
        raise ValueError("extrapolation needs probe runs at two different depths")
    per_layer = (value_b - value_a) / (layers_b - layers_a)
    return value_a + per_layer * (layers - layers_a)


@dataclass
class MemorySplit:
    """Peak memory in bytes, by what holds it. `activations` is the remainder of the measured
    (extrapolated) peak: saved activations, logits, temporary buffers, the allocator's slack and
    the Python/torch/deltatune runtime itself (about 0.5-1 GB of resident memory on CPU)."""
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def split_peak(peak_bytes: float, weight_bytes: float, trainable_parameters: float) -> MemorySplit:
    """The peak split into weights (given), fp32 gradients and AdamW state of the trainable
    parameters, and the rest. Weights, gradients and optimizer state all live from the first
    optimizer step on, so the peak is at least their sum: an extrapolated peak below it (noise
    of a tiny probe) is raised to it rather than reported with negative activations."""
    gradients = int(trainable_parameters) * FP32_BYTES
    optimizer = int(trainable_parameters) * ADAMW_STATE_BYTES
    weights = int(weight_bytes)
    rest = max(0, int(round(peak_bytes)) - weights - gradients - optimizer)
    return MemorySplit(weights, gradients, optimizer, rest)


def weight_bytes(run: ProbeRun) -> int:
    """Bytes of all parameters of a probe run at their dtype: fp32, except the linear layers a
    quantized base (qlora) holds packed (the summary's dense and packed bytes)."""
    dense = (run.total_parameters or 0) * FP32_BYTES
    quantization = run.quantization or {}
    return dense - int(quantization.get("dense_bytes", 0)) + int(quantization.get("packed_bytes", 0))


@dataclass
class MethodEstimate:
    """The plan's row for one method: extrapolated to `layers`, or the reason it has no numbers."""
    method: str
    layers: int
    trainable_parameters: int | None = None
    total_parameters: int | None = None
    peak_bytes: int | None = None
    split: MemorySplit | None = None
    seconds_per_step: float | None = None
    fits: bool | None = None
    error: str | None = None
    probes: list[ProbeRun] = field(default_factory=list)

    @property
    def measurable(self) -> bool:
        return self.error is None and self.peak_bytes is not None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["probes"] = [probe.to_dict() for probe in self.probes]
        data["split"] = None if self.split is None else {**asdict(self.split),
                                                         "total": self.split.total}
        return data


def estimate_method(method: str, runs: list[ProbeRun], layers: int) -> MethodEstimate:
    """The full-depth estimate of `method` from its probe runs at two depths. A failed probe
    (the method cannot run here, e.g. a missing kernel) gives a row with the error and no
    invented numbers."""
    failed = [run for run in runs if not run.ok]
    if failed:
        return MethodEstimate(method, layers, error=f"not measurable here: {failed[0].error}",
                              probes=runs)
    if len(runs) != 2 or runs[0].layers == runs[1].layers:
        raise ValueError("an estimate needs exactly two probe runs at different depths")
    first, second = sorted(runs, key=lambda run: run.layers)

    def at_full_depth(value_a: float, value_b: float) -> float:
        return extrapolate(first.layers, value_a, second.layers, value_b, layers)

    trainable = round(at_full_depth(first.trainable_parameters, second.trainable_parameters))
    total = round(at_full_depth(first.total_parameters, second.total_parameters))
    weights = at_full_depth(weight_bytes(first), weight_bytes(second))
    peak = at_full_depth(first.peak_memory_bytes, second.peak_memory_bytes)
    split = split_peak(peak, weights, trainable)
    seconds = None
    if first.seconds_per_step() is not None and second.seconds_per_step() is not None:
        seconds = max(0.0, at_full_depth(first.seconds_per_step(), second.seconds_per_step()))
    return MethodEstimate(method, layers, trainable_parameters=trainable, total_parameters=total,
                          peak_bytes=split.total, split=split,
                          seconds_per_step=None if seconds is None else round(seconds, 4),
                          probes=runs)


# -- the budget -------------------------------------------------------------------------------

@dataclass
class MemoryBudget:
    """The memory a plan must fit in, and where the number comes from."""
    bytes: int
    source: str
    device: str = "cpu"


def parse_memory(text: str) -> int:
    """`24GB`, `24 GB`, `1.5G`, `24GiB`, `512MiB`, `2000000000` -> bytes. Decimal units (k, M, G,
    T, with or without B) are powers of 1000, binary ones (Ki, Mi, Gi, Ti, optionally with B)
    powers of 1024, as in `ls --si` / `ls -h`."""
    match = _MEMORY.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--memory {text!r} is not an amount of memory; write e.g. "
                          "--memory 24GB, --memory 16GiB or --memory 512MB")
    amount = float(match.group(1)) * _UNITS[unit]
    if amount <= 0:
        raise ConfigError(f"--memory {text!r} must be more than zero")
    return int(amount)


def resolve_budget(memory: str | None, device: str | None) -> MemoryBudget:
    """The budget of a plan: `memory` when given; else the total memory of CUDA `device`; else
    the RAM available on this machine now (what a run started now could use)."""
    if memory is not None and device is not None and device != "cpu":
        raise ConfigError("give --memory or --device, not both: --device cuda:N already says "
                          "how much memory there is")
    if memory is not None:
        return MemoryBudget(parse_memory(memory), f"--memory {memory}")
    if device is not None and device != "cpu":
        return cuda_budget(device)
    import psutil

    return MemoryBudget(int(psutil.virtual_memory().available), "available RAM on this machine")


def cuda_budget(device: str) -> MemoryBudget:
    """The total memory of CUDA device `device` ("cuda" or "cuda:N")."""
    import torch

    match = re.fullmatch(r"cuda(?::(\d+))?", device.strip())
    if match is None:
        raise ConfigError(f"--device {device!r} is not a device; write cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible here "
                          "(torch.cuda.is_available() is False); plan for this machine's RAM "
                          "without --device, or give --memory 24GB for another machine")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) "
                          f"here (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    properties = torch.cuda.get_device_properties(index)
    return MemoryBudget(int(properties.total_memory), f"total memory of cuda:{index} "
                        f"({properties.name})", device=f"cuda:{index}")


def mark_fits(estimates: list[MethodEstimate], budget: MemoryBudget) -> dict[str, bool]:
    """Sets each measurable estimate's `fits` and returns method -> fits for the framework."""
    fits = {}
    for estimate in estimates:
        if estimate.measurable:
            estimate.fits = estimate.peak_bytes <= budget.bytes
            fits[estimate.method] = estimate.fits
    return fits


def is_constrained(estimates: list[MethodEstimate], budget: MemoryBudget,
                   total_parameters: int) -> bool:
    """Memory is tight when full fine-tuning does not fit; without a full fine-tuning estimate,
    when the budget is below its static footprint (fp32 weights, gradients and AdamW state:
    16 bytes per parameter)."""
    for estimate in estimates:
        if estimate.method == "full" and estimate.measurable:
            return not estimate.fits
    static = total_parameters * (2 * FP32_BYTES + ADAMW_STATE_BYTES)
    return budget.bytes < static
