"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021): a small residual MLP —
down-projection to `bottleneck_size`, nonlinearity, up-projection — added to the output of a
sublayer's output projection, before the sublayer's own residual add. Houlsby places one after
attention and one after the FFN, Pfeiffer one after the FFN only. The up-projection starts at
zero, so the adapted model starts exactly equal to the base.

Each adapted projection `P` becomes `BottleneckAdapter(P)`: `y = P(x); y + up(act(down(y)))`.
PEFT has no bottleneck adapters, so the files use PEFT's layout with deltatune's own type:
adapter_config.json holds `"peft_type": "DELTATUNE_BOTTLENECK"`, `"deltatune_method": "adapter"`
and this config's fields (targets resolved); adapter_model.safetensors holds, per adapted module,
`base_model.model.<module>.adapter_down.weight` `(bottleneck, features)`,
`...adapter_down.bias` `(bottleneck,)`, `...adapter_up.weight` `(features, bottleneck)` and
`...adapter_up.bias` `(features,)`, plus `modules_to_save` weights as plain
`base_model.model.<module>.<param>`. The nonlinearity makes merging into the base impossible.
`handle.disabled()` skips the adapters (the projections alone run); `handle.scaled(alpha)` adds
alpha times the adapters' residual branch: `y + alpha·up(act(down(y)))`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deltatune.errors import ConfigError, MergeNotSupportedError
from deltatune.methods.base import (MethodConfig, MethodHandle, check_adapter_keys,
                                    find_modules, freeze_all, load_modules_to_save_state,
                                    module_matches, modules_to_save_state,
                                    parameters_of_modules, peft_key, replace_module,
                                    suggest_target_names, unfreeze_modules_to_save)

try:  # GPT-2 style projections store their weight as (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the method usable
    Conv1D = None

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
VARIANTS = ("houlsby", "pfeiffer")
NONLINEARITIES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}
DEFAULT_REDUCTION_FACTOR = 16.0
ADAPTER_PARAMS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight",
                  "adapter_up.bias")

# (attention output projection, FFN output projection) per architecture family; each is
# detected by whether the model has modules of that name. BERT's FFN output is `layer.N.output.
# dense`, a regex so that `layer.N.attention.output.dense` does not match it too.
DEFAULT_SUBLAYER_OUTPUTS: list[tuple[str, str]] = [
    ("self_attn.o_proj", "mlp.down_proj"),  # Llama, Mistral, Qwen, Gemma
    ("attention.output.dense", r".*layer\.\d+\.output\.dense"),  # BERT, RoBERTa, ViT
    ("attn.c_proj", "mlp.c_proj"),  # GPT-2
    ("attention.out_lin", "ffn.lin2"),  # DistilBERT
    ("attention.dense", "mlp.dense_4h_to_h"),  # GPT-NeoX
]


@dataclass
class BottleneckConfig(MethodConfig):
    """Bottleneck adapter options.

    variant: "houlsby" (adapters after attention and after the FFN) or "pfeiffer" (FFN only).
    bottleneck_size: width of the bottleneck; or give `reduction_factor` (layer width divided
        by it); neither: reduction factor 16.
    nonlinearity: "relu", "gelu" or "swish".
    attention_output_targets / ffn_output_targets: name patterns of the sublayers' output
        projections (plain name: that module or one ending in '.' + name; regex: full match).
        None: detected from the model's module names (Llama, BERT, GPT-2, DistilBERT, GPT-NeoX).
    """

    method_name: ClassVar[str] = "adapter"
    peft_type: ClassVar[str] = "DELTATUNE_BOTTLENECK"
    supports_disable: ClassVar[bool] = True
    supports_scale: ClassVar[bool] = True

    variant: str = "houlsby"
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    nonlinearity: str = "relu"
    attention_output_targets: list[str] | None = None
    ffn_output_targets: list[str] | None = None

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_size()
        for name in ("attention_output_targets", "ffn_output_targets", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ConfigError(f"adapter: '{name}' must be a list of module name patterns, "
                                  f"e.g. ['mlp.down_proj'], not {value!r}")
            if value is not None:
                setattr(self, name, list(value))
        if self.variant == "pfeiffer" and self.attention_output_targets:
            raise ConfigError("adapter: the pfeiffer variant adds adapters after the FFN only; "
                              "drop 'attention_output_targets' or use variant='houlsby'")

    def _check_choices(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"adapter: unknown variant '{self.variant}'; choose one of "
                              f"{list(VARIANTS)}")
        if self.nonlinearity not in NONLINEARITIES:
            raise ConfigError(f"adapter: unknown nonlinearity '{self.nonlinearity}'; choose one "
                              f"of {list(NONLINEARITIES)}")

    def _check_size(self) -> None:
        if self.bottleneck_size is not None and self.reduction_factor is not None:
            raise ConfigError("adapter: give 'bottleneck_size' or 'reduction_factor', not both")
        size = self.bottleneck_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ConfigError(f"adapter: 'bottleneck_size' must be a positive integer, not "
                              f"{size!r}")
        factor = self.reduction_factor
        if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
            raise ConfigError(f"adapter: 'reduction_factor' must be a positive number, not "
                              f"{factor!r}")

    def size_for(self, features: int) -> int:
        """The bottleneck width for a projection with `features` outputs."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        factor = self.reduction_factor or DEFAULT_REDUCTION_FACTOR
        return max(1, round(features / factor))


# -- the delta module -------------------------------------------------------------------------

class BottleneckAdapter(nn.Module):
    """Wraps a frozen output projection and adds a residual bottleneck MLP to its output, times
    `delta_scale`; with `delta_enabled` False only the projection runs."""

    def __init__(self, base_layer: nn.Module, bottleneck_size: int, nonlinearity: str):
        super().__init__()
        self.base_layer = base_layer
        features = output_features(base_layer)
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.adapter_down = nn.Linear(features, bottleneck_size, **factory)
        self.nonlinearity = NONLINEARITIES[nonlinearity]()
        self.adapter_up = nn.Linear(bottleneck_size, features, **factory)
        # Zero up-projection: the adapter adds exactly nothing until it is trained.
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        nn.init.zeros_(self.adapter_down.bias)
        self.delta_enabled = True
        self.delta_scale = 1.0

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(x)
        if not self.delta_enabled:
            return output
        residual = self.adapter_up(self.nonlinearity(self.adapter_down(output)))
        if self.delta_scale != 1.0:
            residual = residual * self.delta_scale
        return output + residual


def output_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.weight.shape[1]  # Conv1D: (in_features, out_features)


# -- applying ---------------------------------------------------------------------------------

def apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> "BottleneckHandle":
    """Freezes `model`, wraps the sublayer output projections in `BottleneckAdapter`s (in
    place), makes `modules_to_save` trainable, returns the handle."""
    config = resolve_targets(model, config)
    patterns = (config.attention_output_targets or []) + (config.ffn_output_targets or [])
    modules = find_modules(model, patterns, SUPPORTED_LAYERS, BottleneckConfig.method_name,
                           exclude=_inside_modules_to_save(model, config.modules_to_save))
    _check_sizes(config, modules)
    freeze_all(model)
    adapters = {}
    for name, layer in modules:
        adapters[name] = BottleneckAdapter(layer, config.size_for(output_features(layer)),
                                           config.nonlinearity)
        replace_module(model, name, adapters[name])
    saved = unfreeze_modules_to_save(model, config.modules_to_save, BottleneckConfig.method_name)
    return BottleneckHandle(model, config, adapters, saved)


def resolve_targets(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    """A copy of `config` whose unset targets are detected from the model's module names."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, SUPPORTED_LAYERS)]
    attention = config.attention_output_targets
    if attention is None and config.variant == "houlsby":
        attention = [_detect(names, [a for a, _ in DEFAULT_SUBLAYER_OUTPUTS], "attention")]
    ffn = config.ffn_output_targets
    if ffn is None:
        ffn = [_detect(names, [f for _, f in DEFAULT_SUBLAYER_OUTPUTS], "ffn")]
    return dataclasses.replace(config, attention_output_targets=attention or [],
                               ffn_output_targets=ffn)


def _detect(names: list[str], candidates: list[str], sublayer: str) -> str:
    for pattern in candidates:
        if any(module_matches(n, pattern) for n in names):
            return pattern
    raise ConfigError(
        f"adapter: cannot tell which layer is the {sublayer} output projection of this model; "
        f"set '{sublayer}_output_targets' to its name (layers: {suggest_target_names(names)})"
    )


def _inside_modules_to_save(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of modules that are, or sit inside, a module trained fully: never adapted."""
    def inside(name: str) -> bool:
        parts = name.split(".")
        return any(module_matches(".".join(parts[:i]), p)
                   for i in range(1, len(parts) + 1) for p in patterns)

    return [n for n, _ in model.named_modules() if n and inside(n)]


def _check_sizes(config: BottleneckConfig, modules: list[tuple[str, nn.Module]]) -> None:
    for name, layer in modules:
        features = output_features(layer)
        if config.size_for(features) > features:
            raise ConfigError(
                f"adapter: bottleneck_size {config.size_for(features)} is larger than the "
                f"width {features} of '{name}'; choose a size below {features}")


# -- the handle -------------------------------------------------------------------------------

class BottleneckHandle(MethodHandle):
    """The bottleneck adapters of a model (and its fully trained `modules_to_save`)."""

    def __init__(self, model: nn.Module, config: BottleneckConfig,
                 adapters: dict[str, BottleneckAdapter], modules_to_save: list[str]):
        super().__init__(model, config, parameters_of_modules(model, modules_to_save))
        self.adapters = adapters
        self.modules_to_save = modules_to_save

    def delta_modules(self) -> list[BottleneckAdapter]:
        return list(self.adapters.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained adapters, unscaled: `delta_scale` is a runtime setting, not saved."""
        self._check_state_access("state_dict()")
        state = {}
        for name, adapter in self.adapters.items():
            tensors = adapter.state_dict()
            state.update({peft_key(name, p): tensors[p] for p in ADAPTER_PARAMS})
        state.update(modules_to_save_state(self.model, self.modules_to_save))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._check_state_access("load_state_dict()")
        check_adapter_keys(self.state_dict(), state, BottleneckConfig.method_name)
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                tensors = adapter.state_dict()
                for param in ADAPTER_PARAMS:
                    tensors[param].copy_(state[peft_key(name, param)])
        load_modules_to_save_state(self.model, self.modules_to_save, state)

    def merge(self) -> None:
        raise MergeNotSupportedError(
            "adapter: bottleneck adapters put a nonlinearity "
            f"({self.config.nonlinearity}) between their two projections, so they cannot be "
            "folded into the base weights; keep them as modules at inference (load the saved "
            "adapter on the base model), or train LoRA or IA3 if you need a merged model"
        )

