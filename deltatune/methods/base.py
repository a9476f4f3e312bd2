"""The method protocol shared by every adaptation method.

A method is a config dataclass (a `MethodConfig` subclass) plus an `apply_<name>(model, config)`
function that changes the model in place — freezing the base and inserting delta modules that
wrap (never subclass) the layers they change — and returns a `MethodHandle`. The handle is what
the training loop, the adapter files and later compression steps talk to: the trainable
parameters, the adapter weights under PEFT key names, merge/unmerge, and switching the delta off
(`disabled()`, the base model's outputs exactly) or scaling it (`scaled(alpha)`,
`set_delta_scale(alpha)`: base + alpha·delta). Helpers here find target modules by name pattern
and module type, never by model class, and read a layer's dense weight (`base_weight`).
"""
from __future__ import annotations

import dataclasses
import typing
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Iterator

import torch
from torch import nn

from deltatune.errors import (AdapterFormatError, AdapterStateError, ConfigError,
                              MergeNotSupportedError, TargetNotFoundError)

PEFT_PREFIX = "base_model.model."


@dataclass
class MethodConfig:
    """Options common to every method. Subclasses add their own fields with defaults."""

    method_name: ClassVar[str] = ""
    # The `peft_type` written to adapter_config.json: PEFT's own value for methods PEFT has,
    # "DELTATUNE_<NAME>" for methods it lacks.
    peft_type: ClassVar[str] = ""
    # A number format (deltatune.quant) the base's linear layers are frozen in when this method
    # is chosen, e.g. "nf4" for QLoRA; None: the base stays as loaded unless the run asks.
    base_quantization: ClassVar[str | None] = None

    # Module name patterns (see `module_matches`) of modules trained fully alongside the method,
    # e.g. a new classification head. Saved with the adapter, as PEFT's `modules_to_save`.
    modules_to_save: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def adapter_config(self) -> dict[str, Any]:
        """The JSON written as adapter_config.json. PEFT-compatible methods override this."""
        return {"peft_type": self.peft_type, "deltatune_method": self.method_name, **self.to_dict()}

    @classmethod
    def from_adapter_config(cls, config: dict[str, Any]) -> "MethodConfig":
        """Inverse of `adapter_config`; unknown keys (PEFT's many extras) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def prepare(self, tokenizer: Any) -> None:
        """Called with the model's tokenizer before `apply`, for methods that need token ids
        (prompt init from text) or change the vocabulary (textual inversion). Default: nothing."""

    # False for methods whose virtual tokens sit at the start of each row (prompt/prefix
    # tuning): several examples packed into one row would share them.
    supports_packing: ClassVar[bool] = True

    # True for methods that change the tokenizer: save_adapter then writes the tokenizer too.
    saves_tokenizer: ClassVar[bool] = False

    # Whether `handle.disabled()` can give the base model's outputs exactly (the method keeps
    # the base computation apart from its delta), and whether `handle.scaled(alpha)` /
    # `set_delta_scale` are defined (the method's change is a delta that can be scaled).
    # Generic code (KL to the original model, WiSE-FT) asks these, never method names.
    supports_disable: ClassVar[bool] = False
    supports_scale: ClassVar[bool] = False

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "MethodConfig":
        """Builds the config from CLI/YAML options, rejecting unknown names with the valid ones."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} for method '{cls.method_name}'; "
                f"valid options: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        for name, value in options.items():
            if _is_number_field(hints.get(name)):
                _check_option_type(cls, name, value)
        try:
            return cls(**options)
        except (TypeError, ValueError, AttributeError) as error:
            # The config's own checks (ConfigError) did not catch a value of the wrong type.
            for name, value in options.items():
                _check_option_type(cls, name, value)
            raise ConfigError(f"method '{cls.method_name}' options {options}: {error}") from None


def _is_number_field(annotation: Any) -> bool:
    """int / float / bool fields (or Optional ones): checked before the config is built, since
    a wrong type there would only fail later, inside torch."""
    arguments = [a for a in (typing.get_args(annotation) or (annotation,)) if a is not type(None)]
    return bool(arguments) and all(a in (int, float, bool) for a in arguments)


def _check_option_type(cls: type, name: str, value: Any) -> None:
    """A ConfigError naming the option, the type its field needs and the value given."""
    from pydantic import TypeAdapter, ValidationError

    annotation = typing.get_type_hints(cls).get(name)
    if annotation is None:
        return
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError:
        raise ConfigError(f"option '{name}' of method '{cls.method_name}' must be "
                          f"{_type_name(annotation)}, got {value!r}") from None
    except Exception:  # noqa: BLE001 - an annotation pydantic has no validator for
        return


def _type_name(annotation: Any) -> str:
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


@dataclass
class ParameterCounts:
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


class MethodHandle:
    """What `apply` returns. Subclasses implement `state_dict`/`load_state_dict` and, where the
    maths allows, `merge`/`unmerge`.

    Switching off and scaling (where the config's `supports_disable`/`supports_scale` say so):
    every delta module a subclass lists in `delta_modules()` carries two attributes its forward
    obeys, `delta_enabled` (False: compute exactly what the wrapped base layer computes) and
    `delta_scale` (the factor alpha on the delta). Base-model parameters the method trains in
    place (`modules_to_save`, LoRA biases) are copied once at apply time (`BaseParameterBackup`)
    and swapped in while disabled, so the base model's outputs come back exactly there too.
    """

    def __init__(self, model: nn.Module, config: MethodConfig,
                 trained_base_parameters: Iterable[nn.Parameter] = ()):
        self.model = model
        self.config = config
        self.merged = False
        self._disabled_depth = 0
        self._scaled_depth = 0
        self._delta_scale = 1.0
        self._base_backup = (BaseParameterBackup(trained_base_parameters)
                             if config.supports_disable else None)

    # -- parameters -------------------------------------------------------------------------
    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable_parameters().values())

    def parameter_groups(self, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; methods with per-layer learning rates override this."""
        return [{"params": self.trainable_parameters(), "lr": learning_rate,
                 "weight_decay": weight_decay}]

    def parameter_counts(self) -> ParameterCounts:
        # model.parameters() yields tied weights once, so they are counted once.
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return ParameterCounts(trainable=trainable, total=total)

    # -- adapter weights --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Adapter weights only, under PEFT's key names (`base_model.model.<module>.<param>`)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def _check_state_access(self, operation: str) -> None:
        """Adapter weights are read and written outside `disabled()` only: inside it the model
        holds the original copies of the parameters it trains in place."""
        if self.is_disabled:
            raise AdapterStateError(
                f"{self.config.method_name}: {operation} inside handle.disabled() would see the "
                "original copies of the trained modules_to_save/biases; call it after the "
                "`with handle.disabled():` block")

    # -- merging ----------------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        return False

    def _check_merge_allowed(self) -> None:
        """Merging folds the persistent delta scale; inside `disabled()`/`scaled()` the
        temporary state would be folded and then restored underneath the merged weights."""
        if self.is_disabled or self._scaled_depth:
            context = "handle.disabled()" if self.is_disabled else "handle.scaled(...)"
            raise AdapterStateError(
                f"{self.config.method_name}: merge() inside {context} is refused; merge after "
                "the `with` block (to merge a scaled delta, call handle.set_delta_scale(alpha) "
                "and then merge())")

    def merge(self) -> None:
        raise MergeNotSupportedError(
            f"method '{self.config.method_name}' cannot be merged into the base weights; "
            "save it as an adapter and load it on the base model instead"
        )

    def unmerge(self) -> None:
        self.merge()

    # -- switching off and scaling --------------------------------------------------------
    @property
    def supports_disable(self) -> bool:
        return self.config.supports_disable

    @property
    def supports_scale(self) -> bool:
        return self.config.supports_scale

    @property
    def is_disabled(self) -> bool:
        """True inside `disabled()` (at any nesting depth)."""
        return self._disabled_depth > 0

    @property
    def delta_scale(self) -> float:
        """The current factor alpha on the delta (1.0 unless scaled)."""
        return self._delta_scale

    def delta_modules(self) -> list[Any]:
        """The objects carrying `delta_enabled`/`delta_scale` (delta modules, hooks)."""
        return []

    @contextmanager
    def disabled(self) -> Iterator["MethodHandle"]:
        """Inside the block the model computes exactly what it computed before `apply` (the
        delta modules run their base layer only; trained base parameters are swapped for their
        original copies); gradients reach no adapter parameter. Nests; restores the adapter on
        exit, also when the block raises. Refused while merged or for methods that keep no
        delta (`supports_disable` False)."""
        self._require("disable", "disabled()")
        if self._disabled_depth == 0:
            self._set_delta_enabled(False)
        self._disabled_depth += 1
        try:
            yield self
        finally:
            self._disabled_depth -= 1
            if self._disabled_depth == 0:
                self._set_delta_enabled(True)

    def set_delta_scale(self, alpha: float) -> None:
        """Scales the delta persistently: outputs become base + alpha·delta (each method's
        docstring says what its delta is). 0 gives `disabled()`'s outputs, 1 the trained
        adapter bit for bit; negative values subtract it. Parameters trained whole in place
        (`modules_to_save`, LoRA biases) are not a delta and stay as trained at every scale,
        as in PEFT, so with them scale 0 is the base body under the trained head. Refused while
        merged: unmerge, set the scale, merge again (merge folds the current scale)."""
        self._require("scale", "set_delta_scale()")
        self._apply_delta_scale(_checked_scale(alpha, self.config.method_name))

    @contextmanager
    def scaled(self, alpha: float) -> Iterator["MethodHandle"]:
        """`set_delta_scale(alpha)` for the block only: the scale in force when it was entered
        comes back on exit (also when the block raises). Nests; `disabled()` inside wins."""
        previous = self._delta_scale
        self.set_delta_scale(alpha)
        self._scaled_depth += 1
        try:
            yield self
        finally:
            self._scaled_depth -= 1
            self._apply_delta_scale(previous)

    def _apply_delta_scale(self, alpha: float) -> None:
        for module in self.delta_modules():
            module.delta_scale = alpha
        self._delta_scale = alpha

    def _set_delta_enabled(self, enabled: bool) -> None:
        for module in self.delta_modules():
            module.delta_enabled = enabled
        if self._base_backup is not None:
            if enabled:
                self._base_backup.restore_trained()
            else:
                self._base_backup.swap_in_originals(self.model)

    def _require(self, capability: str, operation: str) -> None:
        supported = self.supports_disable if capability == "disable" else self.supports_scale
        if not supported:
            raise AdapterStateError(self.unsupported_message(capability))
        if self.merged:
            raise AdapterStateError(
                f"{self.config.method_name}: {operation} needs the delta kept apart from the "
                "base weights, but the handle is merged; call handle.unmerge() first (and "
                "merge() again afterwards if you need the merged model)")

    def unsupported_message(self, capability: str) -> str:
        """Why `disabled()` ("disable") or scaling ("scale") is not defined for this method and
        what to do instead; methods override it with their reason."""
        if capability == "disable":
            return (f"{self.config.method_name}: disabled() is not supported because the method "
                    "keeps no delta apart from the base model; keep a frozen copy of the "
                    "original model (copy.deepcopy(model) before apply) for base outputs")
        return (f"{self.config.method_name}: scaled()/set_delta_scale() are not supported because "
                "the method has no weight delta to scale; use a method whose config has "
                "supports_scale=True (LoRA, IA3, bottleneck adapters, HyperLoRA)")

    # -- summary ----------------------------------------------------------------------------
    def describe(self) -> str:
        """What trains, for the CLI to print: counts, then one line per trained module."""
        counts = self.parameter_counts()
        head = (f"{self.config.method_name}: {counts.trainable:,} of {counts.total:,} parameters "
                f"train ({counts.trainable_percent:.2f}%)")
        return "\n".join([head, *("  " + line for line in describe_trainable(self.model))])


def _checked_scale(alpha: Any, method_name: str) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) \
            or not math.isfinite(alpha):
        raise ConfigError(f"{method_name}: the delta scale must be a finite number (0 = base "
                          f"model, 1 = trained adapter), got {alpha!r}")
    return float(alpha)


class BaseParameterBackup:
    """Frozen copies, taken when the method is applied, of the base model's own parameters that
    the method trains in place (`modules_to_save`, LoRA biases). `swap_in_originals` puts the
    copies in every module slot that holds a trained parameter (tied uses included); the copies
    do not require grad, so no gradient reaches the trained ones. `restore_trained` undoes it.
    The copies cost the size of those parameters once — PEFT keeps the same `original_module`."""

    def __init__(self, parameters: Iterable[nn.Parameter]):
        unique = {id(p): p for p in parameters}
        self._originals = {key: _frozen_copy(p) for key, p in unique.items()}
        self._trained = unique
        self._swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

    def swap_in_originals(self, model: nn.Module) -> None:
        if not self._trained or self._swapped:
            return
        for module in model.modules():
            for name, parameter in module._parameters.items():
                if parameter is not None and self._trained.get(id(parameter)) is parameter:
                    module._parameters[name] = self._original_like(parameter)
                    self._swapped.append((module, name, parameter))

    def restore_trained(self) -> None:
        for module, name, parameter in reversed(self._swapped):
            module._parameters[name] = parameter
        self._swapped = []

    def _original_like(self, parameter: nn.Parameter) -> nn.Parameter:
        # The model may have moved (device/dtype) since apply; move the copy once, then keep it.
        original = self._originals[id(parameter)]
        if original.device != parameter.device or original.dtype != parameter.dtype:
            original = _frozen_copy(original.to(device=parameter.device, dtype=parameter.dtype))
            self._originals[id(parameter)] = original
        return original


def _frozen_copy(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=False)


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The dense weight of a possibly wrapped linear-like layer, for computation (merging, DoRA
    norms): a layer's `dequantized_weight()` if it has one (quantized layers), else the
    `base_layer` of a delta wrapper (recursively, without the wrapper's delta), else `.weight`."""
    dequantize = getattr(layer, "dequantized_weight", None)
    if callable(dequantize):
        return dequantize()
    inner = getattr(layer, "base_layer", None)
    if isinstance(inner, nn.Module):
        return base_weight(inner)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(layer).__name__} has no dense weight: it has neither "
                        "`dequantized_weight()`, a `base_layer` nor a `weight` tensor")
    return weight


# -- helpers for methods ---------------------------------------------------------------------

_REGEX_CHARS = set("*[]()|^$\\+?{}")


def module_matches(name: str, pattern: str) -> bool:
    """PEFT's matching rule: a plain pattern matches a module whose name equals it or ends with
    '.' + pattern; a pattern with regex characters must match the whole name."""
    if _REGEX_CHARS & set(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def _pattern_list(patterns: Any, option: str, method_name: str) -> list[str]:
    if isinstance(patterns, str):
        return [patterns]
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"{method_name}: '{option}' must be a module name or a list of module "
                          f"name patterns (e.g. targets=query,value), got {patterns!r}")
    return list(patterns)


def find_modules(
    model: nn.Module,
    patterns: Iterable[str],
    module_types: tuple[type, ...],
    method_name: str,
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of the given types whose names match any pattern. Raises `TargetNotFoundError`
    listing the valid target names when a pattern matches nothing."""
    patterns = _pattern_list(patterns, "targets", method_name)
    exclude = _pattern_list(exclude, "exclude", method_name)
    candidates = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, module_types) and name
        and not any(module_matches(name, e) for e in exclude)
    ]
    found: list[tuple[str, nn.Module]] = []
    for pattern in patterns:
        hits = [(n, m) for n, m in candidates if module_matches(n, pattern)]
        if not hits:
            raise TargetNotFoundError(
                f"{method_name}: target '{pattern}' matches no "
                f"{'/'.join(t.__name__ for t in module_types)} module; valid targets: "
                f"{suggest_target_names([n for n, _ in candidates])}"
            )
        found.extend(hits)
    unique = dict(found)  # keeps first-seen order, drops duplicates from overlapping patterns
    return list(unique.items())


def suggest_target_names(module_names: list[str]) -> list[str]:
    """Short names (last path component) of candidate modules, for error messages."""
    return sorted({n.rsplit(".", 1)[-1] for n in module_names})


def all_linear_names(model: nn.Module) -> list[str]:
    """Names of every nn.Linear except the output head (PEFT's 'all-linear' rule)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not output and n]


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new_module)


def freeze_all(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def unfreeze_modules_to_save(model: nn.Module, patterns: Iterable[str],
                             method_name: str) -> list[str]:
    """Makes matching modules fully trainable; returns their names. Unknown patterns raise."""
    names = []
    for pattern in patterns:
        hits = [n for n, _ in model.named_modules() if n and module_matches(n, pattern)]
        if not hits:
            raise TargetNotFoundError(
                f"{method_name}: modules_to_save '{pattern}' matches no module; top-level "
                f"modules: {[n for n, _ in model.named_children()]}"
            )
        for name in hits:
            for parameter in model.get_submodule(name).parameters():
                parameter.requires_grad_(True)
        names.extend(hits)
    return names


def parameters_of_modules(model: nn.Module, module_names: Iterable[str]) -> list[nn.Parameter]:
    """Every parameter of the named modules (e.g. `modules_to_save`, for `BaseParameterBackup`)."""
    return [p for name in module_names for p in model.get_submodule(name).parameters()]


def peft_key(module_name: str, param_name: str) -> str:
    return f"{PEFT_PREFIX}{module_name}.{param_name}"


def modules_to_save_state(model: nn.Module, module_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Weights of fully trained modules under PEFT's keys: `base_model.model.<module>.<param>`
    (PEFT 0.21 saves `modules_to_save` with plain names, verified against its output)."""
    state = {}
    for name in module_names:
        for param_name, tensor in model.get_submodule(name).state_dict().items():
            state[peft_key(name, param_name)] = tensor
    return state


def load_modules_to_save_state(model: nn.Module, module_names: Iterable[str],
                               state: dict[str, torch.Tensor]) -> None:
    """Copies the `modules_to_save_state` entries of `state` back into the model."""
    for name in module_names:
        module = model.get_submodule(name)
        for param_name, tensor in module.state_dict().items():
            key = peft_key(name, param_name)
            if key in state:
                tensor.copy_(state[key])


# -- layer structure (shared by methods that treat blocks differently) -----------------------

# The repeated-block list of a transformer is a ModuleList named like these (`model.layers`,
# `encoder.layer`, GPT-2's `h`, ViT/timm `blocks`).
_BLOCK_LIST_NAME = re.compile(r"(^|\.)(layers?|blocks?|h)$")


@dataclass
class BlockStack:
    """The model's stack of repeated transformer blocks: block i is `<name>.<i>`."""

    name: str
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return len(self.blocks)

    def index_of(self, qualified_name: str) -> int | None:
        """Block index of a module or parameter name inside the stack, else None."""
        prefix = f"{self.name}."
        if not qualified_name.startswith(prefix):
            return None
        head = qualified_name[len(prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() else None


def find_blocks(model: nn.Module, block_module: str | None = None) -> BlockStack | None:
    """The ModuleList of transformer blocks: `block_module` if given, else the list with most
    children among those named like `...layers`/`...layer`/`...h`/`...blocks`. None if absent."""
    if block_module:
        try:
            module = model.get_submodule(block_module)
        except AttributeError:
            raise TargetNotFoundError(
                f"block_module '{block_module}' is not a module of this model; module lists: "
                f"{[n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]}"
            ) from None
        if not isinstance(module, nn.ModuleList):
            raise ConfigError(f"block_module '{block_module}' is a {type(module).__name__}, not "
                              "an nn.ModuleList of blocks; name the list that holds the layers")
        return BlockStack(block_module, module)
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and len(m) and _BLOCK_LIST_NAME.search(n)]
    if not candidates:
        return None
    name, module = max(candidates, key=lambda item: len(item[1]))
    return BlockStack(name, module)


def parameter_depths(model: nn.Module, stack: BlockStack) -> dict[str, int]:
    """Depth of every parameter: 0 for the embeddings (whatever comes before the first block, and
    any nn.Embedding), i+1 inside block i, L+1 above the last block (final norm, heads)."""
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding)
                     for p in m.parameters(recurse=False)}
    depths: dict[str, int] = {}
    seen_block = False
    for name, parameter in model.named_parameters():
        index = stack.index_of(name)
        if index is not None:
            depths[name] = index + 1
            seen_block = True
        elif not seen_block or id(parameter) in embedding_ids:
            depths[name] = 0
        else:
            depths[name] = len(stack) + 1
    return depths


def is_no_decay(name: str, parameter: torch.Tensor) -> bool:
    """Biases and norm weights (every 1-D tensor) get no weight decay, the standard recipe."""
    return parameter.ndim < 2 or name.endswith("bias")


def describe_trainable(model: nn.Module) -> list[str]:
    """Lines naming what trains: each largest fully trainable module once, plus the trainable
    parameters of partly trainable modules, with parameter counts."""
    lines: list[str] = []
    seen: set[int] = set()

    def line(name: str, parameters: list[nn.Parameter]) -> str:
        fresh = [p for p in parameters if id(p) not in seen]
        seen.update(id(p) for p in parameters)
        if not fresh:
            return f"{name}  (tied: shares its weights with a module listed above)"
        return f"{name}  ({sum(p.numel() for p in fresh):,})"

    def visit(prefix: str, module: nn.Module) -> None:
        parameters = list(module.parameters())
        if parameters and all(p.requires_grad for p in parameters):
            lines.append(line(prefix or "<model>", parameters))
            return
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.requires_grad:
                lines.append(line(f"{prefix + '.' if prefix else ''}{name}", [parameter]))
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return lines


# -- loading adapter weights -----------------------------------------------------------------

def check_adapter_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                       method_name: str) -> None:
    """Raises `AdapterFormatError` unless `state` has every expected key with the same shape."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterFormatError(
            f"{method_name}: adapter weights do not fit this model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''}; load it on the base model it was "
            "trained on, with the same target modules"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise AdapterFormatError(
                f"{method_name}: '{key}' has shape {tuple(state[key].shape)} in the file but "
                f"{tuple(tensor.shape)} in the model; it was trained on another model size")
