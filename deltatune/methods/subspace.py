"""Subspace training (intrinsic dimension): the only trainable tensor is a vector z of d entries,
and every projected parameter of the model is θ = θ₀ + (P z)[its slice], with P a fixed
D x d Fastfood random projection (deltatune/methods/fastfood.py) over all D projected weights
(Li et al. 2018, "Measuring the intrinsic dimension of objective landscapes"; Aghajanyan et al.
2020, "Intrinsic dimensionality explains the effectiveness of language model fine-tuning").
Sweeping d and finding the smallest d that reaches 90 % of full fine-tuning (d90) is
`deltatune analyze intrinsic-dimension`.

What is projected: every parameter except the token-embedding matrices (input and output
embeddings, found by `get_input_embeddings`/`get_output_embeddings`, not by name) unless
`include_embeddings`, and except modules matching `exclude`. A new head (`modules_to_save`, set by
the classification task) is projected too, as in the papers — d counts everything that moves —
and its random initial values are saved with z so the adapter reloads on a fresh base.

The parameters stay ordinary: each one gets a torch parametrization (`weight` reads as θ₀ + its
slice of P z), so any architecture and the loop's fast paths see plain tensors. P z is computed
once per forward of the model (a pre-hook clears the cache) and, without gradients, reused while
z, the scale and the switch are unchanged. Switching off gives θ₀ exactly; `scaled(alpha)` gives
θ₀ + alpha P z. `merge()` folds θ₀ + P z into the parameters and removes the parametrizations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from deltatune.errors import AdapterFormatError, ConfigError, MergeNotSupportedError
from deltatune.methods.base import PEFT_PREFIX, MethodConfig, MethodHandle, freeze_all, \
    module_matches
from deltatune.methods.fastfood import FastfoodProjection

SUBSPACE_MODULE = "deltatune_subspace"
Z_KEY = f"{PEFT_PREFIX}{SUBSPACE_MODULE}.z"
ORIGIN_PREFIX = f"{PEFT_PREFIX}{SUBSPACE_MODULE}.origin."


@dataclass
class SubspaceConfig(MethodConfig):
    """`dimension` d: the size of the trained vector z. `projection_seed` fixes P (saved, so the
    adapter reloads). `include_embeddings`: project the token-embedding matrices too (they are
    most of a small model's parameters and barely move in fine-tuning; off by default).
    `exclude`: module name patterns left frozen and outside the subspace.
    `projected_parameters` (D) is filled in by apply and checked when the adapter is loaded."""

    method_name: ClassVar[str] = "subspace"
    peft_type: ClassVar[str] = "DELTATUNE_SUBSPACE"
    supports_disable: ClassVar[bool] = True
    supports_scale: ClassVar[bool] = True

    dimension: int = 1000
    projection_seed: int = 0
    include_embeddings: bool = False
    exclude: list[str] = field(default_factory=list)
    projected_parameters: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dimension, bool) or not isinstance(self.dimension, int) \
                or self.dimension < 1:
            raise ConfigError(f"subspace: dimension must be a positive integer, got "
                              f"{self.dimension!r}; use e.g. dimension=1000")


class Subspace(nn.Module):
    """Holds z and the projection; `delta()` is P z for the current forward pass."""

    def __init__(self, projected_parameters: int, config: SubspaceConfig,
                 device: torch.device):
        super().__init__()
        self.z = nn.Parameter(torch.zeros(config.dimension, device=device))
        self.projection = FastfoodProjection(projected_parameters, config.dimension,
                                             config.projection_seed, device)
        self.delta_enabled, self.delta_scale = True, 1.0
        self._cached: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    def clear_cache(self) -> None:
        self._cached, self._cache_key = None, None

    def delta(self) -> torch.Tensor:
        key = (self.z._version, self.delta_scale, torch.is_grad_enabled())
        if self._cached is None or self._cache_key != key:
            self._cached = self.projection(self.z) * self.delta_scale
            self._cache_key = key
        return self._cached


class SubspaceSlice(nn.Module):
    """The parametrization of one projected parameter: θ₀ + its slice of P z."""

    def __init__(self, subspace: Subspace, offset: int, shape: torch.Size):
        super().__init__()
        # A plain attribute, so the shared Subspace is not registered once per parameter.
        object.__setattr__(self, "subspace", subspace)
        self.offset, self.shape = offset, shape

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        if not self.subspace.delta_enabled:
            return original
        part = self.subspace.delta()[self.offset: self.offset + original.numel()]
        return original + part.view(self.shape).to(original.dtype)


class SubspaceHandle(MethodHandle):
    config: SubspaceConfig

    def __init__(self, model: nn.Module, config: SubspaceConfig, subspace: Subspace,
                 projected: list[tuple[str, nn.Module, str]], origin_names: list[str]):
        super().__init__(model, config)
        self.subspace, self.projected, self.origin_names = subspace, projected, origin_names

    def delta_modules(self) -> list[Any]:
        return [self.subspace]

    def _apply_delta_scale(self, alpha: float) -> None:
        super()._apply_delta_scale(alpha)
        self.subspace.clear_cache()

    def _set_delta_enabled(self, enabled: bool) -> None:
        super()._set_delta_enabled(enabled)
        self.subspace.clear_cache()

    def _originals(self) -> dict[str, torch.Tensor]:
        return {f"{module_name}.{name}" if module_name else name:
                module.parametrizations[name].original for module_name, module, name in
                self.projected}

    def state_dict(self) -> dict[str, torch.Tensor]:
        self._check_state_access("state_dict()")
        originals = self._originals()
        state = {Z_KEY: self.subspace.z.detach().clone()}
        for name in self.origin_names:
            state[ORIGIN_PREFIX + name] = originals[name].detach().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if Z_KEY not in state or state[Z_KEY].shape != self.subspace.z.shape:
            found = tuple(state[Z_KEY].shape) if Z_KEY in state else "no z"
            raise AdapterFormatError(
                f"subspace: the adapter's z ({found}) does not fit this model's subspace "
                f"(dimension {self.config.dimension}); load it with the adapter_config.json "
                "saved next to it, on the model it was trained from")
        originals = self._originals()
        unknown = [k for k in state if k != Z_KEY and (not k.startswith(ORIGIN_PREFIX)
                                                       or k[len(ORIGIN_PREFIX):] not in originals)]
        if unknown:
            raise AdapterFormatError(f"subspace: unexpected adapter keys {unknown[:5]}; the "
                                     "adapter was trained on another architecture")
        with torch.no_grad():
            self.subspace.z.copy_(state[Z_KEY])
            for key, tensor in state.items():
                if key.startswith(ORIGIN_PREFIX):
                    originals[key[len(ORIGIN_PREFIX):]].copy_(tensor)
        self.subspace.clear_cache()

    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        """Writes θ₀ + alpha P z into the parameters and removes the parametrizations."""
        self._check_merge_allowed()
        if self.merged:
            return
        with torch.no_grad():
            for _, module, name in self.projected:
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
        self.merged = True

    def unmerge(self) -> None:
        raise MergeNotSupportedError(
            "subspace: merge() folds θ₀ + P z into the weights and keeps no θ₀; load the "
            "adapter on a fresh base model to get the unmerged subspace back")


def _embedding_parameters(model: nn.Module, include_embeddings: bool) -> set[int]:
    if include_embeddings:
        return set()
    frozen = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            frozen.update(id(p) for p in module.parameters())
    return frozen


def _projected_parameters(model: nn.Module, config: SubspaceConfig
                          ) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
    """(module name, module, parameter name, parameter) of every projected parameter, in
    `named_parameters` order (which fixes each one's slice of P z); shared weights once."""
    frozen = _embedding_parameters(model, config.include_embeddings)
    seen: set[int] = set()
    chosen = []
    for module_name, module in model.named_modules():
        if _is_excluded(module_name, config.exclude):
            continue
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in frozen or id(parameter) in seen:
                continue
            seen.add(id(parameter))
            chosen.append((module_name, module, name, parameter))
    return chosen


def _is_excluded(module_name: str, patterns: list[str]) -> bool:
    """A module is excluded when it or any module containing it matches a pattern."""
    parts = module_name.split(".") if module_name else []
    prefixes = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(module_matches(prefix, pattern) for prefix in prefixes for pattern in patterns)


def _checked_size(config: SubspaceConfig, size: int) -> None:
    if size == 0:
        raise ConfigError("subspace: no parameter is left to project (everything is excluded); "
                          "shorten `exclude` or set include_embeddings=true")
    if config.dimension > size:
        raise ConfigError(f"subspace: dimension {config.dimension} is larger than the "
                          f"{size:,} projected parameters; choose dimension <= {size}")
    if config.projected_parameters is not None and config.projected_parameters != size:
        raise AdapterFormatError(
            f"subspace: the adapter projects {config.projected_parameters:,} parameters but this "
            f"model has {size:,} to project; load it on the model it was trained from")


def apply_subspace(model: nn.Module, config: SubspaceConfig) -> SubspaceHandle:
    """Freezes the model, parametrizes every projected parameter as θ₀ + (P z)[slice] and
    registers z (zeros, so the model starts exactly at θ₀) as the only trainable tensor."""
    chosen = _projected_parameters(model, config)
    size = sum(parameter.numel() for *_, parameter in chosen)
    _checked_size(config, size)
    config.projected_parameters = size
    freeze_all(model)
    device = chosen[0][3].device
    subspace = Subspace(size, config, device)
    model.add_module(SUBSPACE_MODULE, subspace)
    # register_parametrization evaluates the parametrization once to check it; with the
    # delta off that check costs nothing instead of one projection per parameter.
    subspace.delta_enabled = False
    offset = 0
    for module_name, module, name, parameter in chosen:
        parametrize.register_parametrization(module, name,
                                             SubspaceSlice(subspace, offset, parameter.shape))
        offset += parameter.numel()
    subspace.delta_enabled = True
    model.register_forward_pre_hook(lambda *_: subspace.clear_cache())
    heads = [m for m, *_ in chosen if any(module_matches(m, p) for p in config.modules_to_save)]
    origin_names = [f"{m}.{n}" if m else n for m, _, n, _ in chosen if m in heads]
    projected = [(module_name, module, name) for module_name, module, name, _ in chosen]
    return SubspaceHandle(model, config, subspace, projected, origin_names)
