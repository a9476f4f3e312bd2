"""The method protocol shared by every adaptation method.

A method is a config dataclass (a `MethodConfig` subclass) plus an `apply_<name>(model, config)`
function that changes the model in place — freezing the base and inserting delta modules that
wrap (never subclass) the layers they change — and returns a `MethodHandle`. The handle is what
the training loop, the adapter files and later compression steps talk to: the trainable
parameters, the adapter weights under PEFT key names, merge/unmerge. Helpers here find target
modules by name pattern and module type, never by model class.
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

PEFT_PREFIX = "base_model.model."


@dataclass
class MethodConfig:
    """Options common to every method. Subclasses add their own fields with defaults."""

    method_name: ClassVar[str] = ""
    # The `peft_type` written to adapter_config.json: PEFT's own value for methods PEFT has,
    # "DELTATUNE_<NAME>" for methods it lacks.
    peft_type: ClassVar[str] = ""

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
        return cls(**options)


@dataclass
class ParameterCounts:
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


class MethodHandle:
    """What `apply` returns. Subclasses implement `state_dict`/`load_state_dict` and, where the
    maths allows, `merge`/`unmerge`."""

    def __init__(self, model: nn.Module, config: MethodConfig):
        self.model = model
        self.config = config
        self.merged = False

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

    # -- merging ----------------------------------------------------------------------------
    @property
    def can_merge(self) -> bool:
        return False

    def merge(self) -> None:
        raise MergeNotSupportedError(
            f"method '{self.config.method_name}' cannot be merged into the base weights; "
            "save it as an adapter and load it on the base model instead"
        )

    def unmerge(self) -> None:
        self.merge()

    # -- summary ----------------------------------------------------------------------------
    def describe(self) -> str:
        """What trains, for the CLI to print: counts, then one line per trained module."""
        counts = self.parameter_counts()
        head = (f"{self.config.method_name}: {counts.trainable:,} of {counts.total:,} parameters "
                f"train ({counts.trainable_percent:.2f}%)")
        return "\n".join([head, *("  " + line for line in describe_trainable(self.model))])


# -- helpers for methods ---------------------------------------------------------------------

_REGEX_CHARS = set("*[]()|^$\\+?{}")


def module_matches(name: str, pattern: str) -> bool:
    """PEFT's matching rule: a plain pattern matches a module whose name equals it or ends with
    '.' + pattern; a pattern with regex characters must match the whole name."""
    if _REGEX_CHARS & set(pattern):
        return re.fullmatch(pattern, name) is not None
    return name == pattern or name.endswith("." + pattern)


def find_modules(
    model: nn.Module,
    patterns: Iterable[str],
    module_types: tuple[type, ...],
    method_name: str,
    exclude: Iterable[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Modules of the given types whose names match any pattern. Raises `TargetNotFoundError`
    listing the valid target names when a pattern matches nothing."""
    patterns = list(patterns)
    exclude = list(exclude)
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
