"""Freezing: train a chosen part of the model as it is, with no new modules. Three modes —
"probe" trains only the task head (a linear probe of frozen features), "bottom" freezes the
embeddings and the lowest `num_frozen_layers` blocks and trains everything above, "modules"
trains exactly the modules named by patterns. A head tied to the input embeddings is untied
first (by default), because training a tied head would also change every input embedding.
The adapter holds only the trained tensors, under PEFT-style keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import (AdapterFormatError, ConfigError, MergeNotSupportedError,
                              TargetNotFoundError)
from deltatune.methods.base import (PEFT_PREFIX, MethodConfig, MethodHandle, find_blocks,
                                    freeze_all, is_no_decay, module_matches, parameter_depths,
                                    suggest_target_names, unfreeze_modules_to_save)

MODES = ("probe", "bottom", "modules")


@dataclass
class FreezeConfig(MethodConfig):
    """`mode`: "probe" (train modules matching `head_patterns`), "bottom" (freeze embeddings and
    the lowest `num_frozen_layers` blocks), "modules" (train modules matching `train_modules`).
    `untie_tied_head`: give a trained head tied to the frozen input embeddings its own copy of
    the weight (False trains both, since they are one tensor). `block_module` overrides block
    detection for "bottom"."""

    method_name: ClassVar[str] = "freeze"
    peft_type: ClassVar[str] = "DELTATUNE_FREEZE"

    mode: str = "probe"
    head_patterns: list[str] = field(default_factory=lambda: ["classifier", "score", "lm_head"])
    num_frozen_layers: int = 0
    train_modules: list[str] = field(default_factory=list)
    untie_tied_head: bool = True
    block_module: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"freeze: unknown mode '{self.mode}'; choose one of {list(MODES)}")
        if self.num_frozen_layers < 0:
            raise ConfigError(f"freeze: num_frozen_layers must be >= 0, got "
                              f"{self.num_frozen_layers}")
        if self.mode == "modules" and not self.train_modules:
            raise ConfigError("freeze: mode 'modules' needs train_modules=[...], the name "
                              "patterns of the modules to train (e.g. ['norm', 'classifier'])")


class FreezeHandle(MethodHandle):
    config: FreezeConfig

    def __init__(self, model: nn.Module, config: FreezeConfig, untied: bool):
        super().__init__(model, config)
        self.untied = untied

    def parameter_groups(self, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
        """Two groups: weights with decay, biases and norm weights without."""
        decay, no_decay = [], []
        for name, parameter in self.named_trainable_parameters().items():
            (no_decay if is_no_decay(name, parameter) else decay).append(parameter)
        groups = [{"params": decay, "lr": learning_rate, "weight_decay": weight_decay},
                  {"params": no_decay, "lr": learning_rate, "weight_decay": 0.0}]
        return [group for group in groups if group["params"]]

    def describe(self) -> str:
        detail = {"probe": f"head {self.config.head_patterns}",
                  "bottom": f"embeddings + {self.config.num_frozen_layers} lowest blocks frozen",
                  "modules": f"modules {self.config.train_modules}"}[self.config.mode]
        note = " (tied head untied)" if self.untied else ""
        lines = super().describe().split("\n")
        lines[0] += f" — mode {self.config.mode}: {detail}{note}"
        return "\n".join(lines)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {PEFT_PREFIX + name: parameter.detach()
                for name, parameter in self.named_trainable_parameters().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        trainable = self.named_trainable_parameters()
        expected = {PEFT_PREFIX + name for name in trainable}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise AdapterFormatError(
                f"freeze: saved tensors do not match the trained ones (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); load on the same base model with the same config"
            )
        with torch.no_grad():
            for name, parameter in trainable.items():
                saved = state[PEFT_PREFIX + name]
                if saved.shape != parameter.shape:
                    raise AdapterFormatError(f"freeze: '{name}' has shape {tuple(saved.shape)} in "
                                             f"the adapter but {tuple(parameter.shape)} here")
                parameter.copy_(saved)

    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        # The trained tensors are the model's own: nothing to fold in.
        self.merged = True

    def unmerge(self) -> None:
        raise MergeNotSupportedError(
            "freeze: the trained tensors replaced the original ones in place and no copy is "
            "kept, so they cannot be unmerged; load the base model again to get them back"
        )

    def unsupported_message(self, capability: str) -> str:
        operation = "disabled()" if capability == "disable" else "scaled()/set_delta_scale()"
        return (f"freeze: {operation} is not supported: the trained modules are the model's "
                "own, changed in place, and no copy of the originals is kept, so there is no "
                "delta to switch off or scale; keep a frozen copy of the original model "
                "(copy.deepcopy(model) before apply, or load the base model again) for base "
                "outputs, or train a delta method (LoRA, IA3, ...) with modules_to_save")


def _unfreeze_matching(model: nn.Module, patterns: list[str], require_each: bool,
                       what: str) -> list[str]:
    """Unfreezes modules matching the patterns; returns their names. `require_each`: every
    pattern must match (user-chosen modules); otherwise at least one must (the default head
    list covers several architectures at once)."""
    names = [n for n, _ in model.named_modules() if n]
    hit_names: list[str] = []
    for pattern in patterns:
        hits = [n for n in names if module_matches(n, pattern)]
        if not hits and require_each:
            raise TargetNotFoundError(f"freeze: {what} '{pattern}' matches no module; module "
                                      f"names: {suggest_target_names(names)}")
        hit_names.extend(hits)
    if not hit_names:
        raise TargetNotFoundError(
            f"freeze: none of the {what} {patterns} matches a module of this model; pass the "
            f"head's name, one of: {suggest_target_names(names)}"
        )
    for name in hit_names:
        for parameter in model.get_submodule(name).parameters():
            parameter.requires_grad_(True)
    return hit_names


def _unfreeze_above(model: nn.Module, config: FreezeConfig) -> None:
    """Unfreezes every parameter above the embeddings and the lowest `num_frozen_layers` blocks."""
    stack = find_blocks(model, config.block_module)
    if stack is None:
        raise ConfigError("freeze: mode 'bottom' needs the model's list of transformer blocks and "
                          "none named like 'layers'/'layer'/'h'/'blocks' was found; pass "
                          "block_module='<name of the ModuleList>'")
    if config.num_frozen_layers > len(stack):
        raise ConfigError(f"freeze: num_frozen_layers={config.num_frozen_layers} but the model "
                          f"has {len(stack)} blocks in '{stack.name}'; use 0..{len(stack)}")
    depths = parameter_depths(model, stack)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(depths[name] > config.num_frozen_layers)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is module), "")


def _covers(selected: list[str], name: str) -> bool:
    """Whether `name` is one of the selected modules or inside one."""
    return any(name == s or name.startswith(s + ".") for s in selected)


def _tied_modules(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(input embedding, output head) when they share one weight tensor, else None."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return None
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return None
    return embedding, head


def _resolve_tied_head(model: nn.Module, config: FreezeConfig, selected: list[str] | None) -> bool:
    """A tied head and the input embeddings are one tensor. When the head is to train but the
    embeddings are not, untie (default) so the embeddings stay as they were, or — with
    `untie_tied_head=False` — train the shared tensor. `selected`: chosen module names (None in
    "bottom" mode, where the head is always above the frozen part). Returns whether it untied."""
    tied = _tied_modules(model)
    if tied is None:
        return False
    embedding, head = tied
    if selected is None:
        head_selected, embedding_selected = True, False
    else:
        head_selected = _covers(selected, _module_name(model, head))
        embedding_selected = _covers(selected, _module_name(model, embedding))
    if not head_selected or embedding_selected:
        return False
    if not config.untie_tied_head:
        head.weight.requires_grad_(True)
        return False
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=True)
    embedding.weight.requires_grad_(False)
    _mark_untied(model)
    return True


def _mark_untied(model: nn.Module) -> None:
    # Stops transformers from tying the two again (save_pretrained, tie_weights).
    config = getattr(model, "config", None)
    if config is None:
        return
    configs = [config]
    if hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for item in configs:
        if hasattr(item, "tie_word_embeddings"):
            item.tie_word_embeddings = False


def apply_freeze(model: nn.Module, config: FreezeConfig) -> FreezeHandle:
    """Freezes everything, then unfreezes what the mode selects (and `modules_to_save`)."""
    freeze_all(model)
    selected: list[str] | None
    if config.mode == "probe":
        selected = _unfreeze_matching(model, config.head_patterns, False, "head_patterns")
    elif config.mode == "modules":
        selected = _unfreeze_matching(model, config.train_modules, True, "train_modules")
    else:
        _unfreeze_above(model, config)
        selected = None
    saved = unfreeze_modules_to_save(model, config.modules_to_save, "freeze")
    if selected is not None:
        selected += saved
    untied = _resolve_tied_head(model, config, selected)
    return FreezeHandle(model, config, untied)
