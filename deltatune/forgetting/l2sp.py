"""L2-SP (Li et al. 2018, "Explicit inductive bias for transfer learning with convolutional
networks"): a loss term, the squared distance of the trained weights from the weights training
starts from, so that fine-tuning stays near the pre-trained solution.

    l2sp = sum over trained-in-place parameters ||θ − θ0||²  +  sum over LoRA layers ||ΔW − ΔW0||²_F

Which space: the distance is measured on the EFFECTIVE weights of the model. A parameter trained
in place (full fine-tuning, `modules_to_save`, LoRA biases) is its own effective weight, so that is
plain parameter distance from a snapshot taken at construction. A LoRA-style layer changes its
frozen weight W into W + ΔW, so its distance is ||ΔW||²_F (ΔW0, the delta at construction, is 0
for a fresh adapter) — not the distance of the factors A, B from their initialisation, which
says little about the model (A starts random, and B·A can stay 0 while A and B move a lot). For
plain LoRA the Frobenius norm is computed without forming ΔW: ||s·B A||²_F = s²·sum((BᵀB) ⊙ (A Aᵀ)),
two r×r Gram matrices (Linear, Conv2d and Embedding alike); DoRA (its weight is rescaled) and an
adapter that already had a delta at construction form ΔW − ΔW0 explicitly. Delta modules without
a weight delta (bottleneck adapters, IA3, prompts, prefixes, HyperLoRA's generator) fall back to
parameter distance of their own parameters from their initial values, which only approximates
how far the model moved. The delta is the trained one (`delta_weight()`, LoRA scaling included);
the runtime `delta_scale` of `handle.scaled()` is an inference setting and is not applied.

`exclude` names modules (PEFT's pattern rule, `deltatune.methods.base.module_matches`) left out
of the penalty: a newly initialised classification head is task-specific and has no pre-trained
value to stay near, as in the paper. Memory: one copy of every parameter trained in place (the
size of the whole model under full fine-tuning); nothing for fresh LoRA layers. The helpers that
find a handle's weight deltas (`split_targets`, `WeightDelta`) are shared with EWC (ewc.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from deltatune.errors import AdapterStateError, ConfigError
from deltatune.methods.base import base_weight, module_matches

# Pairs of (left, right) factor attribute names: ΔW = scaling · left @ right (Linear, Conv2d),
# or its transpose (Embedding, PEFT's lora_embedding_* layout).
_FACTOR_NAMES = (("lora_B", "lora_A"), ("lora_embedding_B", "lora_embedding_A"))


def is_weight_delta(module: Any) -> bool:
    """A LoRA-style delta module: it wraps a `base_layer` and adds a low-rank `delta_weight()`."""
    return (isinstance(module, nn.Module) and isinstance(getattr(module, "base_layer", None),
                                                         nn.Module)
            and callable(getattr(module, "delta_weight", None))
            and any(hasattr(module, left) and hasattr(module, right)
                    for left, right in _FACTOR_NAMES))


def low_rank_factors(module: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(L, R) with ||delta_weight()||_F = scaling · ||L @ R||_F, L (out, r) and R (r, in), for
    plain LoRA; None for DoRA, whose effective delta is not a low-rank product."""
    if getattr(module, "use_dora", False):
        return None
    for left_name, right_name in _FACTOR_NAMES:
        left, right = getattr(module, left_name, None), getattr(module, right_name, None)
        if left is None or right is None:
            continue
        left = left.weight if isinstance(left, nn.Module) else left
        right = right.weight if isinstance(right, nn.Module) else right
        # Conv2d keeps B as (out, r, 1, 1) and A as (r, in, kh, kw); the product is the same.
        return left.reshape(left.shape[0], -1), right.reshape(right.shape[0], -1)
    return None


def trained_delta(module: nn.Module) -> Tensor:
    """The change the module makes to its base weight, W_effective − W, in the base weight's
    layout, differentiable: `delta_weight()` for plain LoRA, m/||W + ΔW||·(W + ΔW) − W for DoRA
    (the norm not detached: this is the weight's true distance, whatever the forward detaches)."""
    delta = module.delta_weight()
    if not getattr(module, "use_dora", False):
        return delta
    weight = base_weight(module.base_layer).to(delta.dtype)
    merged = weight + delta
    magnitude = module.weight_view(module.lora_magnitude_vector / module.weight_norm(merged))
    return magnitude * merged - weight


def low_rank_squared_norm(left: Tensor, right: Tensor) -> Tensor:
    """||left @ right||²_F in fp32 from r×r Gram matrices: sum((LᵀL) ⊙ (R Rᵀ))."""
    left, right = left.float(), right.float()
    return ((left.t() @ left) * (right @ right.t())).sum()


class WeightDelta:
    """One LoRA-style layer's change of its frozen weight since construction, ΔW − ΔW0. A fresh
    adapter has ΔW0 = 0 and keeps no copy; one that already carries a delta keeps ΔW0 (the size
    of its weight) so that the distance starts at 0."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        with torch.no_grad():
            start = trained_delta(module).detach().float()
        self.start = start.clone() if bool(start.any()) else None
        self.factors_only = self.start is None and low_rank_factors(module) is not None

    def difference(self) -> Tensor:
        """ΔW − ΔW0 in fp32, with grad, in the base weight's layout."""
        delta = trained_delta(self.module).float()
        if self.start is None:
            return delta
        if self.start.device != delta.device:
            self.start = self.start.to(delta.device)
        return delta - self.start

    def squared_norm(self) -> Tensor:
        """||ΔW − ΔW0||²_F in fp32; without forming ΔW for plain LoRA started at 0."""
        if self.factors_only:
            left, right = low_rank_factors(self.module)
            return self.module.scaling ** 2 * low_rank_squared_norm(left, right)
        return self.difference().pow(2).sum()


def on_device(store: dict[str, Tensor], name: str, device: torch.device) -> Tensor:
    """`store[name]` on `device`, moved once and kept there (the model may move to another
    device after a penalty is built)."""
    tensor = store[name]
    if tensor.device != device:
        tensor = store[name] = tensor.to(device)
    return tensor


@dataclass
class Targets:
    """What a penalty acts on: parameters measured in parameter space (trained in place, or the
    parameters of a delta module without a weight delta) and LoRA-style layers measured by their
    weight delta, each by name."""
    parameters: dict[str, nn.Parameter]
    deltas: dict[str, nn.Module]


def split_targets(handle: Any, exclude: Sequence[str], penalty: str) -> Targets:
    """The handle's trainable weights, split by space, without modules matching `exclude`.
    Raises when the handle is merged (its LoRA layers are out of the model) and when nothing is
    left to penalise."""
    if getattr(handle, "merged", False):
        raise AdapterStateError(f"{penalty}: the adapter is merged into the base weights, so its "
                                "delta cannot be measured; call handle.unmerge() before training")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    module_names = {id(module): name for name, module in handle.model.named_modules()}
    deltas = {module_names[id(module)]: module for module in handle.delta_modules()
              if is_weight_delta(module) and id(module) in module_names}
    deltas = {name: module for name, module in deltas.items() if not _excluded(name, exclude)}
    owned = {id(parameter) for module in deltas.values() for parameter in _own_parameters(module)}
    # Factors of an excluded LoRA layer are excluded with it, by name, below.
    parameters = {name: parameter for name, parameter in handle.named_trainable_parameters().items()
                  if id(parameter) not in owned
                  and not _excluded(name.rpartition(".")[0], exclude)}
    if not parameters and not deltas:
        raise ConfigError(f"{penalty} has nothing to act on: no trainable weight is left outside "
                          f"the excluded modules {exclude}; drop the {penalty} weight or train "
                          "more than the new head")
    return Targets(parameters, deltas)


def _own_parameters(module: nn.Module) -> Iterable[nn.Parameter]:
    """The delta module's parameters, not those of the base layer it wraps."""
    return (parameter for name, parameter in module.named_parameters()
            if not name.startswith("base_layer."))


def _excluded(module_name: str, patterns: Sequence[str]) -> bool:
    """Whether the module or any module containing it matches one of the patterns."""
    parts = module_name.split(".") if module_name else []
    ancestors = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(module_matches(name, pattern) for name in ancestors for pattern in patterns)


def snapshot(parameters: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Detached copies of the parameters' current values."""
    return {name: parameter.detach().clone() for name, parameter in parameters.items()}


def sum_scalars(values: list[Tensor]) -> Tensor:
    """The sum of (one or more) scalar tensors that may live on different devices."""
    result = values[0]
    for value in values[1:]:
        result = result + value.to(result.device)
    return result


class L2SPPenalty:
    """The L2-SP loss term (name "l2sp"), anchored at the weights the handle's model has when
    the term is built: build it right before training. `handle` needs `model`,
    `named_trainable_parameters()` and `delta_modules()`; `exclude` names modules left out
    (the new head). The value is an fp32 scalar with grad, 0 at construction."""

    name = "l2sp"

    def __init__(self, handle: Any, weight: float, exclude: Sequence[str] = ()):
        targets = split_targets(handle, exclude, "L2-SP")
        self.weight = weight
        self.parameters = targets.parameters
        self.anchors = snapshot(targets.parameters)
        self.deltas = [WeightDelta(name, module) for name, module in targets.deltas.items()]

    def __call__(self, model: nn.Module, batch: Any = None, output: Any = None) -> Tensor:
        return self.value()

    def value(self) -> Tensor:
        values = [delta.squared_norm() for delta in self.deltas]
        for name, parameter in self.parameters.items():
            anchor = on_device(self.anchors, name, parameter.device)
            values.append((parameter.float() - anchor.float()).pow(2).sum())
        return sum_scalars(values)


__all__ = ["L2SPPenalty", "WeightDelta", "Targets", "split_targets", "snapshot", "on_device",
           "sum_scalars", "is_weight_delta",
           "low_rank_factors", "low_rank_squared_norm", "trained_delta"]
