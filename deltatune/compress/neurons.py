"""FFN neuron pruning: score every hidden neuron of every feed-forward block (the inputs of the
down / output projection) on a data sample, then physically remove the lowest-scoring ones.

Scores (`by`):
- "activation": mean |a_n| over the sample's real tokens (attention_mask = 1).
- "gradient": first-order Taylor estimate of the loss change when the neuron is zeroed,
  Σ_batches |Σ_tokens a_n · ∂L/∂a_n| (Molchanov et al. 2017); the absolute value is taken per
  batch, as for head importance, so opposite signs in different batches do not cancel. The sum
  is read off a gate of ones on each neuron: ∂L/∂gate_n = Σ_tokens a_n · ∂L/∂a_n.
Scope: "per-layer" removes the same fraction of every layer; "global" ranks all neurons at once
after normalising each layer's scores by their L2 norm (activation scales differ by depth).
Every layer keeps at least one neuron."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from deltatune.compress.heads import LossFn, backward_each, count_parameters, scoring_mode
from deltatune.data.collate import model_inputs
from deltatune.errors import ConfigError
from deltatune.models.structure import FfnLayout, remove_neurons, transformer_blocks

SCORES = ("activation", "gradient")
SCOPES = ("per-layer", "global")


@dataclass
class NeuronPruningResult:
    """`removed`: per layer, the removed neurons in the layer's numbering before pruning;
    `importance`: every neuron's score (unnormalised) on the sample."""
    removed: dict[int, list[int]]
    importance: list[list[float]]
    neurons_before: int
    neurons_after: int
    parameters_before: int
    parameters_after: int
    by: str = "activation"
    scope: str = "per-layer"


class _NeuronProbe:
    """Forward pre-hooks on every FFN output projection that record Σ|a| and the token count
    over real tokens, and multiply the activations by a gate of ones (for the gradient score)."""

    def __init__(self, ffns: list[FfnLayout], with_gates: bool):
        device = ffns[0].output.weight.device
        self.ffns = ffns
        self.gates = [torch.ones(f.num_neurons, device=device, requires_grad=with_gates)
                      for f in ffns]
        self.absolute_sums = [torch.zeros(f.num_neurons, dtype=torch.float64) for f in ffns]
        self.tokens = [0] * len(ffns)
        self.attention_mask: Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> "_NeuronProbe":
        for layer, ffn in enumerate(self.ffns):
            self._handles.append(ffn.output.register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple) -> tuple:
            activation = args[0]
            weights = self._token_weights(activation)
            magnitude = (activation.detach().abs().float() * weights).reshape(
                -1, activation.shape[-1]).sum(0)
            self.absolute_sums[layer] += magnitude.double().cpu()
            real = int(weights.sum()) if weights.dim() else activation[..., 0].numel()
            self.tokens[layer] += real
            gate = self.gates[layer].to(activation.dtype)
            return (activation * gate, *args[1:])
        return hook

    def _token_weights(self, activation: Tensor) -> Tensor:
        mask = self.attention_mask
        if (mask is not None and mask.dim() == 2
                and tuple(mask.shape) == tuple(activation.shape[:2])):
            return mask.to(activation.device, torch.float32)[..., None]
        return torch.ones((), device=activation.device)

    def zero_grad(self) -> None:
        for gate in self.gates:
            gate.grad = None


def neuron_importance(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn | None = None,
                      by: str = "activation") -> list[Tensor]:
    """Per layer, one score per FFN neuron (see the module docstring); `loss_fn` is needed for
    by="gradient"."""
    if by not in SCORES:
        raise ConfigError(f"unknown neuron score {by!r}; use one of {', '.join(SCORES)}")
    if by == "gradient" and loss_fn is None:
        raise ConfigError("by='gradient' needs loss_fn (e.g. lambda model, batch: "
                          "objective(model, batch).loss)")
    batches = list(batches)
    if not batches:
        raise ConfigError("no batches to measure neuron importance on; pass at least one batch")
    ffns = [block.ffn for block in transformer_blocks(model)]
    with _NeuronProbe(ffns, with_gates=by == "gradient") as probe, scoring_mode(model):
        if by == "activation":
            _forward_each(model, batches, probe)
            return [(total / max(tokens, 1)).float()
                    for total, tokens in zip(probe.absolute_sums, probe.tokens)]
        return _taylor_scores(model, batches, loss_fn, probe)


def _forward_each(model: nn.Module, batches: list[dict], probe: _NeuronProbe) -> None:
    with torch.no_grad():
        for batch in batches:
            probe.attention_mask = batch.get("attention_mask")
            model(**model_inputs(batch))


def _taylor_scores(model: nn.Module, batches: list[dict], loss_fn: LossFn,
                   probe: _NeuronProbe) -> list[Tensor]:
    totals = [torch.zeros(len(gate)) for gate in probe.gates]

    def before(batch: dict) -> None:
        probe.zero_grad()
        probe.attention_mask = batch.get("attention_mask")

    def accumulate() -> None:
        for total, gate in zip(totals, probe.gates):
            if gate.grad is not None:
                total += gate.grad.detach().abs().float().cpu()

    backward_each(model, batches, loss_fn, before, accumulate)
    probe.zero_grad()
    return totals


def prune_neurons(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn | None,
                  fraction: float, by: str = "activation",
                  scope: str = "per-layer") -> NeuronPruningResult:
    """Physically removes `fraction` of the FFN neurons, lowest score first."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"fraction must be in [0, 1), got {fraction}")
    if scope not in SCOPES:
        raise ConfigError(f"unknown scope {scope!r}; use one of {', '.join(SCOPES)}")
    scores = neuron_importance(model, batches, loss_fn, by)
    neurons_before = sum(len(layer) for layer in scores)
    parameters_before = count_parameters(model)
    chosen = (_per_layer_choice(scores, fraction) if scope == "per-layer"
              else _global_choice(scores, fraction))
    removed = {layer: sorted(neurons) for layer, neurons in enumerate(chosen) if neurons}
    remove_neurons(model, removed)
    neurons_after = sum(block.ffn.num_neurons for block in transformer_blocks(model))
    return NeuronPruningResult(removed, [layer.tolist() for layer in scores], neurons_before,
                               neurons_after, parameters_before, count_parameters(model),
                               by, scope)


def _per_layer_choice(scores: list[Tensor], fraction: float) -> list[list[int]]:
    chosen = []
    for layer in scores:
        count = min(int(round(fraction * len(layer))), len(layer) - 1)
        chosen.append(torch.argsort(layer, stable=True)[:count].tolist())
    return chosen


def _global_choice(scores: list[Tensor], fraction: float) -> list[list[int]]:
    normalised = [layer / (layer.norm() + 1e-20) for layer in scores]
    ranking = sorted((float(score), layer, neuron) for layer, row in enumerate(normalised)
                     for neuron, score in enumerate(row))
    budget = int(round(fraction * sum(len(layer) for layer in scores)))
    chosen: list[list[int]] = [[] for _ in scores]
    for _, layer, neuron in ranking:
        if budget == 0:
            break
        if len(chosen[layer]) < len(scores[layer]) - 1:
            chosen[layer].append(neuron)
            budget -= 1
    return chosen
