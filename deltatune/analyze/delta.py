"""What a finished run changed in each linear layer: ΔW = W_tuned − W_base (and the bias
change), its singular values, and the rank that keeps a given share of its energy (Σ of the
largest k squared singular values over Σ of all; energy = ‖ΔW‖²_F). A low energy rank is the
measured form of the claim behind LoRA (Hu et al., 2021; Aghajanyan et al., 2020) that a
fine-tune's update is low-rank.

The run is loaded dense (`jobs.sources.load_dense_source`: its adapter merged in, or its full
weights), the base is its `model` loaded the same way with the run's class names, so any run
whose method keeps a weight delta (full, freeze, LoRA, IA3, ...) can be analysed; for a LoRA
run of rank r the spectrum ends at r, which is a check. Parameters outside linear layers
(embeddings, norms, a new classification head) are reported as the share of the update they
hold, not factored."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from deltatune.errors import ConfigError

ENERGY_SHARES = (0.5, 0.9, 0.99)


@dataclass
class LayerDelta:
    """One linear layer's update: the weight change and, if the bias changed, its change."""
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None = None


@dataclass
class RunDeltas:
    """The linear layers' updates of a run, the names of the modules a task trains whole
    (a classification head: they have no base to subtract), and how the update's squared
    norm splits between linear weights and everything else."""
    layers: list[LayerDelta]
    whole_modules: list[str]
    base: Any = None      # the base LoadedModel (extraction applies the adapter to it)
    tuned: Any = None     # the run's dense LoadedModel
    spec: Any = None
    task: Any = None
    energy_split: dict[str, float] = field(default_factory=dict)


def load_run_deltas(run: str, progress: Callable[[str], None] | None = None) -> RunDeltas:
    """The updates of the run directory `run` relative to its base model."""
    from deltatune.jobs.sources import is_run_directory, load_dense_source, to_fp32
    from deltatune.models import load_model

    if not is_run_directory(run):
        raise ConfigError(f"'{run}' is not a run directory (no config.yaml); pass a folder "
                          "`deltatune train` wrote")
    source = load_dense_source(run)
    labels = source.task.saved_labels(Path(run))
    base = load_model(source.spec.model, task=source.task.model_kind,
                      num_labels=len(labels) if labels else None, label_names=labels)
    to_fp32(base.model)
    whole = _whole_modules(source, base.model)
    layers = linear_deltas(base.model, source.loaded.model, skip=whole)
    split = _energy_split(base.model, source.loaded.model, layers, whole)
    if not layers:
        raise ConfigError(f"run {run} changed no linear layer's weights (method "
                          f"'{source.spec.method}'); there is no ΔW to analyse")
    return RunDeltas(layers, whole, base, source.loaded, source.spec, source.task, split)


def _whole_modules(source, base_model: nn.Module) -> list[str]:
    """Modules the task trains whole (asked of the task, as training does)."""
    from deltatune.methods import make_config
    config = make_config("lora", {})
    source.task.adjust_method(config, base_model, {})
    return list(config.modules_to_save)


def linear_deltas(base: nn.Module, tuned: nn.Module, skip: list[str] = ()) -> list[LayerDelta]:
    """ΔW (and Δbias when it is not zero) of every nn.Linear the two models share by name,
    outside the `skip` modules; layers that did not change are left out."""
    tuned_modules = dict(tuned.named_modules())
    deltas = []
    for name, module in base.named_modules():
        if not isinstance(module, nn.Linear) or any(_inside(name, s) for s in skip):
            continue
        other = tuned_modules.get(name)
        if not isinstance(other, nn.Linear) or other.weight.shape != module.weight.shape:
            continue
        weight = (other.weight.detach().double() - module.weight.detach().double())
        if not torch.any(weight != 0):
            continue
        bias = None
        if module.bias is not None and other.bias is not None:
            change = other.bias.detach().double() - module.bias.detach().double()
            bias = change if torch.any(change != 0) else None
        deltas.append(LayerDelta(name, weight, bias))
    return deltas


def _inside(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def _energy_split(base: nn.Module, tuned: nn.Module, layers: list[LayerDelta],
                  whole: list[str]) -> dict[str, float]:
    """Squared norm of the whole update, and the shares in linear weights, linear biases,
    whole-trained modules and the rest (embeddings, norms). Tied weights count once."""
    base_state = dict(base.named_parameters())
    total = 0.0
    whole_energy = 0.0
    for name, parameter in tuned.named_parameters():
        if name not in base_state or base_state[name].shape != parameter.shape:
            continue
        energy = float((parameter.detach().double() - base_state[name].detach().double())
                       .pow(2).sum())
        total += energy
        if any(_inside(name, root) for root in whole):
            whole_energy += energy
    weights = sum(float(layer.weight.pow(2).sum()) for layer in layers)
    biases = sum(float(layer.bias.pow(2).sum()) for layer in layers if layer.bias is not None)
    if total == 0:
        return {"total": 0.0}
    return {"total": total, "linear_weights": weights / total, "linear_biases": biases / total,
            "whole_modules": whole_energy / total,
            "other": max(0.0, 1 - (weights + biases + whole_energy) / total)}


def energy_rank(singular_values: torch.Tensor, share: float) -> int:
    """The smallest k whose k largest singular values hold `share` of the energy."""
    energy = singular_values.double().pow(2)
    cumulative = torch.cumsum(energy, 0) / energy.sum()
    return int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype) -
                                  1e-12).item()) + 1


def layer_spectrum(layer: LayerDelta, keep: int = 64) -> dict[str, Any]:
    """A layer's spectrum summary: shape, norm, energy ranks, the first `keep` singular values
    and the cumulative energy curve (one value per rank)."""
    values = torch.linalg.svdvals(layer.weight)
    energy = values.pow(2)
    cumulative = (torch.cumsum(energy, 0) / energy.sum()).tolist()
    return {"layer": layer.name, "shape": list(layer.weight.shape),
            "frobenius": float(energy.sum().sqrt()),
            "full_rank": min(layer.weight.shape),
            **{f"rank_{round(share * 100)}": energy_rank(values, share)
               for share in ENERGY_SHARES},
            "singular_values": [round(v, 6) for v in values[:keep].tolist()],
            "cumulative_energy": [round(v, 6) for v in cumulative]}


def layer_kind(name: str) -> str:
    """The layer's role without its block number ("encoder.layer.3.attention.self.query" →
    "attention.self.query"), to average like layers across blocks."""
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[index + 1:]) or name
    return name
