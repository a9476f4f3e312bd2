"""IA3 (Liu et al. 2022, "Few-shot parameter-efficient fine-tuning is better and cheaper than
in-context learning"): learned vectors, initialised to ones, that rescale the keys, the values and
the FFN's intermediate activation. A target layer's vector scales its output (shape
`(out_features, 1)`), or, for a *feedforward* target, its input (shape `(1, in_features)`) — the
same rule, shapes and file format as Hugging Face PEFT's IA3, so adapters move both ways:
`base_model.model.<module>.ia3_l` keys and an adapter_config.json with `peft_type: "IA3"`,
`target_modules`, `feedforward_modules`, `exclude_modules`, `init_ia3_weights`, `fan_in_fan_out`,
`modules_to_save` and `task_type`. The scaling folds exactly into the weight (`merge`).
`handle.disabled()` skips the multiplication (the base layer alone runs); `handle.scaled(alpha)`
uses the vector 1 + alpha·(l − 1), which `merge` folds as it is.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from deltatune.errors import (AdapterFormatError, ConfigError, MergeNotSupportedError,
                              TargetNotFoundError)
from deltatune.methods.base import (MethodConfig, MethodHandle, all_linear_names,
                                    check_adapter_keys, find_modules, freeze_all,
                                    load_modules_to_save_state, module_matches,
                                    modules_to_save_state, parameters_of_modules, peft_key,
                                    replace_module, suggest_target_names,
                                    unfreeze_modules_to_save)

try:  # GPT-2 style layers store their weight as (in_features, out_features)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the method usable
    Conv1D = None

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())
PARAM_NAME = "ia3_l"

# Default (targets, feedforward targets) per architecture family, detected by which names the
# model contains. They follow PEFT's TRANSFORMERS_MODELS_TO_IA3_*_MAPPING, except that for
# BERT-like encoders the FFN's `output.dense` is named by a regex: PEFT's plain "output.dense"
# also hits `attention.output.dense` (and scales its input), which the paper does not do.
_BERT_FFN_OUTPUT = r".*layer\.\d+\.output\.dense"
DEFAULT_TARGETS: list[tuple[list[str], list[str]]] = [
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # Llama, Mistral, Qwen, Gemma
    (["key", "value", _BERT_FFN_OUTPUT], [_BERT_FFN_OUTPUT]),  # BERT, RoBERTa, ViT
    (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # GPT-2
    (["k", "v", "wo"], ["wo"]),  # T5
]
ALL_LINEAR = "all-linear"
_REGEX_CHARS = set("*[]()|^$\\+?{}")


@dataclass
class IA3Config(MethodConfig):
    """IA3 options. `targets`/`feedforward_targets` None: detected from the model's module names.

    targets: module name patterns (a plain name matches a module called so or ending in
        '.' + name; a pattern with regex characters must match the whole name), or
        ["all-linear"]. Written to adapter_config.json as PEFT's `target_modules`.
    feedforward_targets: the targets whose *input* is scaled (PEFT's `feedforward_modules`,
        matched as PEFT does: a plain name matches every target whose name ends with it, a regex
        must match the whole name). With explicit `targets` and no feedforward_targets: none.
    exclude: module name patterns never targeted (PEFT's `exclude_modules`).
    init_ones: start every vector at ones (forward equals the base model); False draws them from
        a standard normal, as PEFT's `init_ia3_weights=False` does (for tests only).
    task_type: PEFT's task type written to the file ("CAUSAL_LM", "SEQ_CLS", ...), or None.
    """

    method_name: ClassVar[str] = "ia3"
    peft_type: ClassVar[str] = "IA3"
    supports_disable: ClassVar[bool] = True
    supports_scale: ClassVar[bool] = True

    targets: list[str] | None = None
    feedforward_targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    init_ones: bool = True
    fan_in_fan_out: bool = False
    task_type: str | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "feedforward_targets", "exclude", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (list, tuple)):
                raise ConfigError(f"ia3: '{name}' must be a list of module name patterns, e.g. "
                                  f"['k_proj', 'v_proj'], not {value!r}")
            if value is not None:
                setattr(self, name, list(value))
        if self.targets is not None and not self.targets:
            raise ConfigError("ia3: 'targets' is empty; name the layers to scale, e.g. "
                              "['k_proj', 'v_proj', 'down_proj'], or leave it unset for defaults")
        if self.targets is None and self.feedforward_targets is not None:
            raise ConfigError("ia3: 'feedforward_targets' needs explicit 'targets' too (the "
                              "feedforward layers must be among them)")

    def adapter_config(self) -> dict[str, Any]:
        if self.targets is None:
            raise ConfigError("ia3: the config has no resolved targets; save the handle that "
                              "apply_ia3 returned (its config names the targets)")
        feedforward = self.feedforward_targets or []
        target_modules = _peft_patterns(self.targets, _plain_to_regex_suffix)
        feedforward_modules = _peft_patterns(feedforward, _plain_to_regex_endswith)
        # PEFT refuses a feedforward list that is not a subset of the target list; the
        # equivalent regex avoids that check without changing which modules match.
        if (isinstance(target_modules, list) and isinstance(feedforward_modules, list)
                and not set(feedforward_modules) <= set(target_modules)):
            feedforward_modules = _combined_regex(feedforward, _plain_to_regex_endswith)
        return {
            "peft_type": self.peft_type,
            "target_modules": target_modules,
            "feedforward_modules": feedforward_modules,
            "exclude_modules": _peft_patterns(self.exclude, _plain_to_regex_suffix) or None,
            "init_ia3_weights": self.init_ones,
            "fan_in_fan_out": self.fan_in_fan_out,
            "modules_to_save": list(self.modules_to_save) or None,
            "task_type": self.task_type,
            "inference_mode": True,
        }

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> "IA3Config":
        targets = _patterns_from_peft(config.get("target_modules"), literal_rule="suffix")
        if targets is None:
            raise AdapterFormatError("ia3 adapter_config.json has no target_modules; PEFT writes "
                                     "them on save — was the file edited?")
        feedforward = _patterns_from_peft(config.get("feedforward_modules"),
                                          literal_rule="endswith")
        return cls(targets=targets, feedforward_targets=feedforward or [],
                   exclude=_patterns_from_peft(config.get("exclude_modules"), "suffix") or [],
                   init_ones=bool(config.get("init_ia3_weights", True)),
                   fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
                   task_type=config.get("task_type"),
                   modules_to_save=list(config.get("modules_to_save") or []))


# -- PEFT pattern translation -----------------------------------------------------------------

def _is_regex(pattern: str) -> bool:
    return bool(_REGEX_CHARS & set(pattern))


def _plain_to_regex_suffix(name: str) -> str:
    """PEFT's list rule for target/exclude modules: equal, or ending in '.' + name."""
    return rf"(?:.*\.)?{re.escape(name)}"


def _plain_to_regex_endswith(name: str) -> str:
    """PEFT's list rule for feedforward modules: the name ends with the string."""
    return rf".*{re.escape(name)}"


def _combined_regex(patterns: list[str], plain_rule: Any) -> str:
    return "|".join(f"(?:{p})" if _is_regex(p) else plain_rule(p) for p in patterns)


def _peft_patterns(patterns: list[str], plain_rule: Any) -> list[str] | str:
    """Our patterns as PEFT reads them: a list when all are plain names (PEFT's list rules match
    ours), else one regex string (PEFT full-matches a string) that matches the same modules."""
    if patterns == [ALL_LINEAR] or all(not _is_regex(p) for p in patterns):
        return list(patterns)
    return _combined_regex(patterns, plain_rule)


def _patterns_from_peft(value: Any, literal_rule: str) -> list[str] | None:
    """PEFT's `*_modules` value as our patterns: a string is a full-match regex; list entries
    are literal names (escaped into a regex if they happen to hold regex characters)."""
    if value is None:
        return None
    if isinstance(value, str):
        return [value] if value == ALL_LINEAR or _is_regex(value) else [f"(?:{value})"]
    rule = _plain_to_regex_suffix if literal_rule == "suffix" else _plain_to_regex_endswith
    return [rule(v) if _is_regex(v) else v for v in value]


def _is_feedforward(name: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, name) if _is_regex(p) else name.endswith(p) for p in patterns)


# -- the delta module -------------------------------------------------------------------------

class IA3Layer(nn.Module):
    """Wraps a frozen Linear (or GPT-2 Conv1D) and scales its output, or for a feedforward
    layer its input, by the learned vector `ia3_l`. `delta_enabled` False: the base layer alone,
    no multiplication; `delta_scale` alpha: the vector 1 + alpha·(l − 1) (l itself at 1)."""

    def __init__(self, base_layer: nn.Module, is_feedforward: bool, init_ones: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.is_feedforward = is_feedforward
        in_features, out_features = layer_features(base_layer)
        shape = (1, in_features) if is_feedforward else (out_features, 1)
        weight = base_layer.weight
        vector = torch.ones(shape) if init_ones else torch.randn(shape)
        self.ia3_l = nn.Parameter(vector.to(device=weight.device, dtype=weight.dtype))
        self.delta_enabled = True
        self.delta_scale = 1.0

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def scaled_vector(self) -> torch.Tensor:
        """`ia3_l` at the current delta scale: 1 + alpha·(l − 1)."""
        if self.delta_scale == 1.0:
            return self.ia3_l
        return 1 + self.delta_scale * (self.ia3_l - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.delta_enabled:
            return self.base_layer(x)
        scale = self.scaled_vector().flatten()
        if self.is_feedforward:
            return self.base_layer(x * scale.to(x.dtype))
        output = self.base_layer(x)
        return output * scale.to(output.dtype)

    def weight_scale(self) -> torch.Tensor:
        """The (scaled) vector shaped to multiply the base weight (rows: outputs, columns:
        inputs)."""
        scale = self.scaled_vector().detach()
        return scale.T if isinstance(self.base_layer, _conv1d_types()) else scale

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}"


def _conv1d_types() -> tuple[type, ...]:
    return (Conv1D,) if Conv1D is not None else ()


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a Conv1D (weight stored transposed)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    in_features, out_features = layer.weight.shape
    return in_features, out_features


# -- applying ---------------------------------------------------------------------------------

def apply_ia3(model: nn.Module, config: IA3Config) -> "IA3Handle":
    """Freezes `model`, wraps its target layers in `IA3Layer`s (in place), returns the handle."""
    saved = present_modules_to_save(model, config)
    excluded = [n for n, _ in model.named_modules()
                if n and (_inside_modules_to_save(n, saved)
                          or any(module_matches(n, p) for p in config.exclude))]
    config = resolve_targets(model, config, excluded)
    freeze_all(model)
    modules = find_modules(model, config.targets or [], SUPPORTED_LAYERS,
                           IA3Config.method_name, exclude=excluded)
    _check_feedforward_patterns(config, [n for n, _ in modules])
    # PEFT's flag for layers that store the weight as (in, out), as GPT-2's Conv1D does.
    transposed = all(isinstance(m, _conv1d_types()) for _, m in modules)
    config = dataclasses.replace(config, fan_in_fan_out=transposed)
    layers = {}
    for name, layer in modules:
        is_feedforward = _is_feedforward(name, config.feedforward_targets or [])
        layers[name] = IA3Layer(layer, is_feedforward, config.init_ones)
        replace_module(model, name, layers[name])
    saved_names = unfreeze_modules_to_save(model, saved, IA3Config.method_name)
    return IA3Handle(model, config, layers, saved_names)


def resolve_targets(model: nn.Module, config: IA3Config, excluded: list[str]) -> IA3Config:
    """A copy of `config` with explicit targets: defaults detected from the module names, and
    ["all-linear"] expanded to the layer names (as PEFT writes it)."""
    feedforward = config.feedforward_targets or []
    if config.targets == [ALL_LINEAR]:
        names = [n for n in all_linear_names(model) if n not in excluded
                 and isinstance(model.get_submodule(n), SUPPORTED_LAYERS)]
        if not names:
            raise TargetNotFoundError("ia3: 'all-linear' found no Linear layer outside the "
                                      "output head, 'exclude' and 'modules_to_save'")
        return dataclasses.replace(config, targets=names, feedforward_targets=feedforward)
    if config.targets is not None:
        return dataclasses.replace(config, feedforward_targets=feedforward)
    names = [n for n, m in model.named_modules()
             if isinstance(m, SUPPORTED_LAYERS) and n not in excluded]
    for targets, default_feedforward in DEFAULT_TARGETS:
        if all(any(module_matches(n, p) for n in names) for p in targets):
            return dataclasses.replace(config, targets=list(targets),
                                       feedforward_targets=list(default_feedforward))
    raise ConfigError(
        "ia3: no default targets for this model (looked for Llama, BERT, GPT-2 and T5 layer "
        f"names); set 'targets' and 'feedforward_targets' from its layers: "
        f"{suggest_target_names(names)}"
    )


def _check_feedforward_patterns(config: IA3Config, target_names: list[str]) -> None:
    for pattern in config.feedforward_targets or []:
        if not any(_is_feedforward(n, [pattern]) for n in target_names):
            raise TargetNotFoundError(
                f"ia3: feedforward target '{pattern}' matches none of the targeted layers; it "
                f"must name some of them: {suggest_target_names(target_names)}"
            )


def _inside_modules_to_save(name: str, patterns: Iterable[str]) -> bool:
    """PEFT's rule: a module trained fully (or anything inside it) never gets an adapter."""
    return any(re.match(rf"(^|.*\.){p}($|\..*)", name) for p in patterns)


# PEFT adds both head names to `modules_to_save` of every classification adapter, whichever
# of the two the model has, so its files name a module that does not exist.
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def present_modules_to_save(model: nn.Module, config: IA3Config) -> list[str]:
    """`modules_to_save` minus the head names PEFT adds for its task type that this model
    lacks (any other pattern that matches nothing still raises, in `unfreeze_modules_to_save`)."""
    names = [n for n, _ in model.named_modules() if n]
    automatic = _PEFT_TASK_HEADS.get(config.task_type or "", ())

    def missing(pattern: str) -> bool:
        return not any(module_matches(n, pattern) for n in names)

    return [p for p in config.modules_to_save if not (p in automatic and missing(p))]


# -- the handle -------------------------------------------------------------------------------

class IA3Handle(MethodHandle):
    """The IA3 vectors of a model; `merge` folds them into the weights (wrappers removed)."""

    def __init__(self, model: nn.Module, config: IA3Config, layers: dict[str, IA3Layer],
                 modules_to_save: list[str]):
        super().__init__(model, config, parameters_of_modules(model, modules_to_save))
        self.layers = layers
        self.modules_to_save = modules_to_save
        # Original weight/bias slices where a vector entry is 0, for an exact unmerge there.
        self._zero_slices: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}

    def delta_modules(self) -> list[IA3Layer]:
        return list(self.layers.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained vectors, unscaled: `delta_scale` is a runtime setting, not saved."""
        self._check_state_access("state_dict()")
        state = {peft_key(name, PARAM_NAME): layer.ia3_l.detach()
                 for name, layer in self.layers.items()}
        state.update(modules_to_save_state(self.model, self.modules_to_save))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.merged:
            raise ConfigError("ia3: unmerge() before loading other IA3 weights")
        self._check_state_access("load_state_dict()")
        check_adapter_keys(self.state_dict(), state, IA3Config.method_name)
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.ia3_l.copy_(state[peft_key(name, PARAM_NAME)])
        load_modules_to_save_state(self.model, self.modules_to_save, state)

    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        """Multiplies each vector (at the current delta scale) into its layer's weight (and, for
        output scaling, bias) and puts the plain layer back in place of the wrapper: no
        inference overhead."""
        if self.merged:
            return
        self._check_merge_allowed()
        for name, layer in self.layers.items():
            if not torch.isfinite(layer.ia3_l).all():
                raise MergeNotSupportedError(
                    f"ia3: the vector of '{name}' holds NaN/inf (training diverged); retrain "
                    "with a lower learning rate before merging")
        with torch.no_grad():
            for name, layer in self.layers.items():
                self._remember_zero_slices(name, layer)
                _scale_layer(layer, layer.weight_scale(), divide=False)
                replace_module(self.model, name, layer.base_layer)
        self.merged = True

    def unmerge(self) -> None:
        """Divides the vectors back out and puts the wrappers back."""
        if not self.merged:
            return
        with torch.no_grad():
            for name, layer in self.layers.items():
                _scale_layer(layer, _safe_divisor(layer.weight_scale()), divide=True)
                self._restore_zero_slices(name, layer)
                replace_module(self.model, name, layer)
        self._zero_slices.clear()
        self.merged = False

    def _remember_zero_slices(self, name: str, layer: IA3Layer) -> None:
        zero = (layer.weight_scale() == 0).expand_as(layer.weight)
        if zero.any():
            bias = None if layer.is_feedforward else layer.base_layer.bias
            self._zero_slices[name] = (zero, layer.weight[zero].clone(),
                                       None if bias is None else bias.detach().clone())

    def _restore_zero_slices(self, name: str, layer: IA3Layer) -> None:
        if name not in self._zero_slices:
            return
        zero, values, bias = self._zero_slices[name]
        layer.weight[zero] = values
        if bias is not None:
            layer.base_layer.bias.copy_(bias)


def _safe_divisor(scale: torch.Tensor) -> torch.Tensor:
    # Entries that are 0 zeroed their rows/columns; those come back from `_zero_slices`.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _scale_layer(layer: IA3Layer, scale: torch.Tensor, divide: bool) -> None:
    base = layer.base_layer
    operation = torch.Tensor.div_ if divide else torch.Tensor.mul_
    operation(base.weight.data, scale.to(base.weight.dtype))
    if not layer.is_feedforward and base.bias is not None:
        operation(base.bias.data, scale.flatten().to(base.bias.dtype))

