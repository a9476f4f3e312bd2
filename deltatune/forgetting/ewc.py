"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"): a loss term that holds each weight near its value before training in
proportion to how much the old data's loss depends on it, the diagonal Fisher information F:

    ewc = sum_i F_i · (θ_i − θ*_i)²

There is no 1/2 in front (the paper writes λ/2 · sum F (θ − θ*)²): the term's `weight` absorbs
it, so the paper's λ is 2 · weight.

The Fisher (`estimate_fisher`) is the diagonal EMPIRICAL Fisher of the batch loss: the mean over
batches of the squared gradient of each batch's mean loss, with the data's own labels. The
gradient of a batch mean squares the mean of the per-example gradients, which drops their
variance, so it underestimates the per-example Fisher E[g²], more the larger the batch: use small
batches (1 to 4 examples). It also uses the data's labels instead of labels sampled from the
model, the usual "empirical Fisher" approximation (Kunstner et al. 2019 discuss its limits).

Which space, and why. Parameters trained in place (full fine-tuning, `modules_to_save`, LoRA
biases) are penalised in parameter space: F of the parameter, anchor θ* its value before
training. A LoRA-style layer is penalised on its effective weight: the Fisher is estimated for the
frozen BASE weight W (its `requires_grad` is switched on during estimation only), the anchor is
ΔW = 0 (the pre-trained weight) and the penalty is sum F_W ⊙ (ΔW)² of the layer's trained delta.
The adapter factors themselves would be useless: at initialisation B = 0, so the loss has no
gradient with respect to A and an adapter-parameter Fisher of A is exactly zero (tested), while
the effective weight W + ΔW is what the old data's loss actually depends on. This costs memory
and time: one fp32 Fisher tensor per targeted base weight (the size of all targeted weights, in
fp32) and ΔW formed for every LoRA layer at every step. Delta modules without a weight delta
(bottleneck adapters, IA3, prompts, HyperLoRA's generator) fall back to parameter space on their
own parameters; that is weaker, since a freshly initialised module's parameters barely affect the
old loss (often zero gradient at init, as for LoRA's A) and their Fisher says little about what
moving them does to the model. A quantized base (QLoRA) has no dense weight to differentiate, so
EWC refuses it. Build the term right before training: the anchors are the weights at that time.
"""
from __future__ import annotations

from contextlib import contextmanager
from itertools import islice
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from deltatune.errors import ConfigError, DataError, TrainingError
from deltatune.forgetting.l2sp import (WeightDelta, on_device, snapshot, split_targets,
                                       sum_scalars)
from deltatune.quant.tensor import is_quantized

Batch = dict[str, Tensor]
LossFunction = Callable[[nn.Module, Batch], Tensor]


def estimate_fisher(model: nn.Module, parameters: Mapping[str, Tensor],
                    batches: Iterable[Batch], loss_fn: LossFunction, max_batches: int,
                    progress: bool = False) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of `parameters` (leaf tensors of `model`, frozen or not): the
    mean over the first `max_batches` batches of the squared gradient of `loss_fn(model, batch)`,
    in fp32, one tensor per name. Runs in eval mode (no dropout) with gradients for `parameters`
    only; leaves no `.grad` behind and restores every `requires_grad` flag and train/eval mode."""
    if max_batches < 1:
        raise ConfigError(f"EWC needs at least one batch for the Fisher, got max_batches="
                          f"{max_batches}")
    names, tensors = list(parameters), list(parameters.values())
    squared = [torch.zeros_like(tensor, dtype=torch.float32) for tensor in tensors]
    count = 0
    total = min(max_batches, len(batches)) if hasattr(batches, "__len__") else max_batches
    with _only_these_require_grad(model, tensors), _eval_mode(model):
        for batch in tqdm(islice(batches, max_batches), desc="fisher", total=total,
                          disable=not progress):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"EWC: the loss of Fisher batch {count + 1} is {loss.item()}; "
                                    "check that batch's data (or the model) before using EWC")
            for accumulated, gradient in zip(squared, _gradients(loss, tensors)):
                if gradient is not None:
                    accumulated.add_(gradient.float().pow(2))
            count += 1
    if count == 0:
        raise DataError("EWC got no batches to estimate the Fisher information on; give it a "
                        "non-empty data set (--ewc-data, or the replay / retain data)")
    return {name: accumulated.div_(count) for name, accumulated in zip(names, squared)}


def _gradients(loss: Tensor, tensors: list[Tensor]) -> Sequence[Tensor | None]:
    """d loss / d tensor, None for tensors the loss does not depend on. `autograd.grad` rather
    than `backward`, so no `.grad` is written (nor an existing one disturbed)."""
    if not loss.requires_grad:
        return [None] * len(tensors)
    return torch.autograd.grad(loss, tensors, allow_unused=True)


@contextmanager
def _only_these_require_grad(model: nn.Module, tensors: list[Tensor]) -> Iterator[None]:
    """Within the block exactly `tensors` require grad (the rest of the model needs no graph);
    every flag comes back afterwards, also when the block raises."""
    flags = [(tensor, tensor.requires_grad) for tensor in [*model.parameters(), *tensors]]
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for tensor in tensors:
            tensor.requires_grad_(True)
        yield
    finally:
        for tensor, flag in reversed(flags):
            tensor.requires_grad_(flag)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode within the block; each module's own mode comes back afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


class EWCPenalty:
    """The EWC loss term (name "ewc"): sum F ⊙ (θ − θ*)² over `parameters` (parameter space,
    `fisher` and `anchors` by the same names; anchors default to the parameters' values now)
    plus sum F_W ⊙ (ΔW − ΔW0)² over `delta_layers` (LoRA-style layers by name, `delta_fisher`
    their base weights' Fisher by the same names; ΔW0, the delta now, is 0 for a fresh adapter).
    `for_handle` estimates everything from a method handle. An fp32 scalar with grad."""

    name = "ewc"

    def __init__(self, parameters: Mapping[str, Tensor], fisher: Mapping[str, Tensor],
                 weight: float, anchors: Mapping[str, Tensor] | None = None,
                 delta_layers: Mapping[str, nn.Module] | None = None,
                 delta_fisher: Mapping[str, Tensor] | None = None):
        delta_layers, delta_fisher = dict(delta_layers or {}), dict(delta_fisher or {})
        _check_matching("fisher", parameters, fisher)
        _check_matching("delta_fisher", {name: _base_weight_tensor(name, layer)
                                         for name, layer in delta_layers.items()}, delta_fisher)
        if anchors is not None:
            _check_matching("anchors", parameters, anchors)
        if not parameters and not delta_layers:
            raise ConfigError("EWC got nothing to penalise: give parameters or delta_layers")
        self.weight = weight
        self.parameters = dict(parameters)
        self.fisher = {name: tensor.detach().float() for name, tensor in fisher.items()}
        self.anchors = snapshot(self.parameters) if anchors is None else \
            {name: tensor.detach().clone() for name, tensor in anchors.items()}
        self.deltas = [WeightDelta(name, layer) for name, layer in delta_layers.items()]
        self.delta_fisher = {name: tensor.detach().float() for name, tensor in delta_fisher.items()}

    @classmethod
    def for_handle(cls, handle: Any, batches: Iterable[Batch], loss_fn: LossFunction,
                   weight: float, max_batches: int, exclude: Sequence[str] = (),
                   progress: bool = False) -> "EWCPenalty":
        """The penalty for a method handle (`model`, `named_trainable_parameters()`,
        `delta_modules()`), its Fisher estimated on `batches` (small ones: see the module
        docstring) with `loss_fn(model, batch)`, the modules matching `exclude` left out (a new
        head). Anchors: the weights as they are now."""
        targets = split_targets(handle, exclude, "EWC")
        base_weights = {_fisher_key(name): _base_weight_tensor(name, layer)
                        for name, layer in targets.deltas.items()}
        fisher = estimate_fisher(handle.model, {**targets.parameters, **base_weights}, batches,
                                 loss_fn, max_batches, progress)
        return cls(targets.parameters, {name: fisher[name] for name in targets.parameters},
                   weight, delta_layers=targets.deltas,
                   delta_fisher={name: fisher[_fisher_key(name)] for name in targets.deltas})

    def __call__(self, model: nn.Module, batch: Any = None, output: Any = None) -> Tensor:
        return self.value()

    def value(self) -> Tensor:
        values = []
        for name, parameter in self.parameters.items():
            device = parameter.device
            distance = parameter.float() - on_device(self.anchors, name, device).float()
            values.append((on_device(self.fisher, name, device) * distance.pow(2)).sum())
        for delta in self.deltas:
            difference = delta.difference()
            fisher = on_device(self.delta_fisher, delta.name, difference.device)
            values.append((fisher * difference.pow(2)).sum())
        return sum_scalars(values)


def _fisher_key(layer_name: str) -> str:
    # The base weight's own parameter name, so it cannot collide with another parameter's.
    return f"{layer_name}.base_layer.weight"


def _base_weight_tensor(name: str, layer: nn.Module) -> Tensor:
    """The dense base weight of a LoRA-style layer, whose Fisher EWC estimates."""
    weight = getattr(layer.base_layer, "weight", None)
    if not isinstance(weight, Tensor) or is_quantized(weight) or not weight.is_floating_point():
        raise ConfigError(f"EWC: the base weight of '{name}' is not a dense floating-point "
                          "parameter (a quantized QLoRA base?), so its Fisher cannot be "
                          "estimated; use --l2sp-weight or --kl-weight with a quantized base, "
                          "or train LoRA on an unquantized one")
    return weight


def _check_matching(what: str, expected: Mapping[str, Tensor],
                    given: Mapping[str, Tensor]) -> None:
    """`given` has exactly `expected`'s names, each with the same shape."""
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ConfigError(f"EWC: {what} does not match the penalised tensors: missing "
                          f"{missing[:5]}, unexpected {unexpected[:5]}; give one tensor per name")
    for name, tensor in expected.items():
        if tuple(given[name].shape) != tuple(tensor.shape):
            raise ConfigError(f"EWC: {what}['{name}'] has shape {tuple(given[name].shape)}, "
                              f"the tensor it belongs to {tuple(tensor.shape)}")


__all__ = ["EWCPenalty", "estimate_fisher"]
