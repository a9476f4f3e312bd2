"""WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"): the fine-tuned
weights interpolated back towards the original ones, θ(α) = (1 − α)·θ0 + α·θ1, so that one α
trades task quality (α = 1: the fine-tuned model) against what the original knew (α = 0: the
original exactly); α outside [0, 1] extrapolates. A method whose change is a weight delta that
can be scaled (`handle.supports_scale`: LoRA, IA3, bottleneck adapters, HyperLoRA) gets θ(α) as
base + α·ΔW from its handle (`DeltaInterpolation`, `scaled_handle`); a method that changes the
model's own weights (full fine-tuning, freezing: `handle.can_merge` without a scalable delta)
gets it from the two state dicts, written into the model's parameters in place
(`WeightInterpolation`, `interpolate_state`; fp32 arithmetic, exact at α = 0 and α = 1). A
method with neither (prefix, prompt and P-tuning: virtual tokens, no ΔW) is refused.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import MethodHandle

SCALE = "delta"
WEIGHTS = "weights"


def checked_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"interpolation weight alpha must be a finite number (0 = original "
                          f"model, 1 = fine-tuned model), got {alpha!r}")
    return float(alpha)


# -- which way a method interpolates -----------------------------------------------------------

def interpolation_route(handle: MethodHandle) -> str:
    """`SCALE` for a method whose delta scales, `WEIGHTS` for one that changes (or merges into)
    the model's own weights; a ConfigError saying why and what works for any other."""
    if handle.supports_scale:
        return SCALE
    if handle.can_merge:
        return WEIGHTS
    raise ConfigError(unsupported_message(handle))


def unsupported_message(handle: MethodHandle) -> str:
    return (f"WiSE-FT cannot interpolate method '{handle.config.method_name}': it keeps no "
            "weight delta that could be scaled (its change is not a ΔW: virtual tokens or a "
            "prefix sit beside the weights) and cannot be folded into the weights either; "
            f"methods that work: {', '.join(scalable_methods())} (their delta is scaled) and "
            "methods that train the model's own weights, such as full and freeze (the weights "
            "are interpolated)")


def scalable_methods() -> list[str]:
    """Registered methods whose config says their delta can be scaled."""
    from deltatune.methods import config_class, method_names
    return [name for name in method_names() if config_class(name).supports_scale]


@contextmanager
def scaled_handle(handle: MethodHandle, alpha: float) -> Iterator[MethodHandle]:
    """base + alpha·ΔW inside the block (`handle.scaled`); the delta scale in force before comes
    back on exit. Methods without a scalable delta are refused: full fine-tuning interpolates
    its weights with `WeightInterpolation` instead."""
    alpha = checked_alpha(alpha)
    if not handle.supports_scale:
        if handle.can_merge:
            raise ConfigError(f"method '{handle.config.method_name}' has no delta to scale: it "
                              "changes the model's own weights; interpolate them with "
                              "WeightInterpolation(model, original_state, tuned_state)")
        raise ConfigError(unsupported_message(handle))
    with handle.scaled(alpha):
        yield handle


class DeltaInterpolation:
    """θ(α) for a method with a scalable delta: `set(alpha)` sets the handle's delta scale,
    `restore()` puts the trained adapter back (scale 1). Parameters the method trains whole
    (`modules_to_save`, e.g. a new head) stay as trained at every α, as in PEFT."""

    route = SCALE

    def __init__(self, handle: MethodHandle):
        if not handle.supports_scale:
            raise ConfigError(unsupported_message(handle) if not handle.can_merge else
                              f"method '{handle.config.method_name}' has no delta to scale; "
                              "use WeightInterpolation")
        self.handle = handle
        self.alpha = handle.delta_scale

    def set(self, alpha: float) -> None:
        self.alpha = checked_alpha(alpha)
        self.handle.set_delta_scale(self.alpha)

    def restore(self) -> None:
        self.set(1.0)

    def __enter__(self) -> "DeltaInterpolation":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


# -- interpolating weights ---------------------------------------------------------------------

def check_same_layout(original: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> None:
    """Raises a ConfigError unless both state dicts have the same keys and shapes."""
    missing, extra = sorted(set(tuned) - set(original)), sorted(set(original) - set(tuned))
    if missing or extra:
        raise ConfigError(
            f"the fine-tuned and original weights do not have the same tensors: only in the "
            f"fine-tuned model {missing[:3]}{' ...' if len(missing) > 3 else ''}, only in the "
            f"original {extra[:3]}{' ...' if len(extra) > 3 else ''}; WiSE-FT interpolates two "
            "models of one architecture (a method that adds modules or tokens cannot be "
            "interpolated by weights)")
    for key, tensor in tuned.items():
        if tuple(original[key].shape) != tuple(tensor.shape):
            raise ConfigError(
                f"'{key}' has shape {tuple(tensor.shape)} in the fine-tuned model but "
                f"{tuple(original[key].shape)} in the original; WiSE-FT interpolates two models "
                "of one architecture (added tokens or a resized head cannot be interpolated)")


def interpolate_state(original: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """A new state dict θ(α) = (1 − α)·original + α·tuned, computed in fp32 and stored in the
    tuned tensors' dtype; exactly `original` at α = 0 and `tuned` at α = 1. Non-floating
    tensors (integer buffers) are taken from `tuned`."""
    alpha = checked_alpha(alpha)
    check_same_layout(original, tuned)
    result = {}
    for key, end in tuned.items():
        if not end.is_floating_point():
            result[key] = end.detach().clone()
            continue
        start = original[key].detach().to(device=end.device, dtype=torch.float32)
        result[key] = torch.lerp(start, end.detach().float(), alpha).to(end.dtype)
    return result


class WeightInterpolation:
    """Writes θ(α) into `model`'s own parameters and floating buffers in place. Both states are
    kept once as fp32 tensors on the model's device (converted at construction, if they are
    not already); `set(alpha)` then computes straight into fp32 parameters and through one
    reusable fp32 buffer into any other, so a sweep over α allocates nothing more. Tied weights
    are written once. `tuned_state` None: a copy of the model's weights as they are now.
    `restore()` writes the tuned weights back (α = 1, exactly); so does leaving a `with`."""

    route = WEIGHTS

    def __init__(self, model: nn.Module, original_state: dict[str, torch.Tensor],
                 tuned_state: dict[str, torch.Tensor] | None = None):
        current = model.state_dict()
        if tuned_state is None:
            tuned_state = {k: v.detach().clone() for k, v in current.items()}
        check_same_layout(original_state, tuned_state)
        check_same_layout(tuned_state, current)
        self.model = model
        self.alpha = 1.0
        self._targets = _distinct_floating(current)
        _refuse_shared_storage(self._targets, tuned_state, original_state)
        self._pairs = [(target, _fp32_on(original_state[key], target),
                        _fp32_on(tuned_state[key], target))
                       for key, target in self._targets.items()]
        needs_buffer = [t.numel() for t in self._targets.values() if t.dtype != torch.float32]
        self._buffer = torch.empty(max(needs_buffer), dtype=torch.float32,
                                   device=next(iter(self._targets.values())).device) \
            if needs_buffer else None

    @torch.no_grad()
    def set(self, alpha: float) -> None:
        self.alpha = checked_alpha(alpha)
        for target, start, end in self._pairs:
            if target.dtype == torch.float32:
                torch.lerp(start, end, self.alpha, out=target)
            else:
                scratch = self._buffer[:target.numel()].view(target.shape)
                torch.lerp(start, end, self.alpha, out=scratch)
                target.copy_(scratch)

    def restore(self) -> None:
        self.set(1.0)

    def __enter__(self) -> "WeightInterpolation":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.restore()


def _distinct_floating(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's floating tensors, each storage once (a tied head shares the embedding's)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    targets = {}
    for key, tensor in state.items():
        identity = (tensor.data_ptr(), tuple(tensor.shape))
        if not tensor.is_floating_point() or identity in seen:
            continue
        seen.add(identity)
        targets[key] = tensor
    if not targets:
        raise ConfigError("the model has no floating-point weights to interpolate")
    return targets


def _refuse_shared_storage(targets: dict[str, torch.Tensor], *states: dict[str, torch.Tensor]
                           ) -> None:
    # Writing θ(α) into a tensor that is also an end point would lose that end point.
    model_storage = {t.untyped_storage().data_ptr() for t in targets.values()}
    for state in states:
        shared = [k for k in targets if state[k].untyped_storage().data_ptr() in model_storage]
        if shared:
            raise ConfigError(f"the interpolation's end points share memory with the model "
                              f"({shared[:3]}); pass copies (tensor.clone()) of the weights, or "
                              "tuned_state=None to copy the model's current weights")


def _fp32_on(tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device=target.device, dtype=torch.float32)
