"""Full fine-tuning: every parameter trains. The one option worth having is layer-wise
learning-rate decay (LLRD, "controlled gradient update"): the embeddings learn slowest, each
block a little faster than the one below, the head at the full rate — which keeps the general
features of the lower layers and so fights forgetting. Blocks are found by name (the largest
`...layers`/`...layer`/`...h`/`...blocks` ModuleList), never by model class. The adapter is the
whole model's weights; merging is a no-op because the weights already are the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.errors import AdapterFormatError, ConfigError, MergeNotSupportedError
from deltatune.methods.base import (PEFT_PREFIX, BlockStack, MethodConfig, MethodHandle,
                                    find_blocks, is_no_decay, parameter_depths)


@dataclass
class FullFinetuneConfig(MethodConfig):
    """`layerwise_lr_decay` d in (0, 1]: block i of L trains at lr * d^(L-i), the embeddings at
    lr * d^(L+1), everything above the last block at lr. 1.0 = one learning rate for all.
    `block_module` names the ModuleList of blocks when automatic detection picks the wrong one."""

    method_name: ClassVar[str] = "full"
    peft_type: ClassVar[str] = "DELTATUNE_FULL"

    layerwise_lr_decay: float = 1.0
    block_module: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.layerwise_lr_decay <= 1.0:
            raise ConfigError(f"full: layerwise_lr_decay must be in (0, 1], got "
                              f"{self.layerwise_lr_decay}; use e.g. 0.8, or 1.0 to switch it off")


class FullFinetuneHandle(MethodHandle):
    config: FullFinetuneConfig

    def __init__(self, model: nn.Module, config: FullFinetuneConfig, stack: BlockStack | None):
        super().__init__(model, config)
        self.stack = stack

    def learning_rate_scales(self) -> dict[str, float]:
        """Multiplier of the base learning rate for every parameter name (1.0 without decay)."""
        decay = self.config.layerwise_lr_decay
        if decay == 1.0 or self.stack is None:
            return {name: 1.0 for name, _ in self.model.named_parameters()}
        top = len(self.stack) + 1
        depths = parameter_depths(self.model, self.stack)
        return {name: decay ** (top - depth) for name, depth in depths.items()}

    def parameter_groups(self, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]:
        """One group per (learning-rate scale, decay or not); biases and norms get no decay."""
        scales = self.learning_rate_scales()
        groups: dict[tuple[float, bool], dict[str, Any]] = {}
        for name, parameter in self.named_trainable_parameters().items():
            no_decay = is_no_decay(name, parameter)
            key = (scales[name], no_decay)
            if key not in groups:
                groups[key] = {"params": [], "lr": learning_rate * scales[name],
                               "weight_decay": 0.0 if no_decay else weight_decay,
                               "name": f"lr_x{scales[name]:.4g}{'_no_decay' if no_decay else ''}"}
            groups[key]["params"].append(parameter)
        return sorted(groups.values(), key=lambda group: group["lr"])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {PEFT_PREFIX + name: tensor for name, tensor in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k[len(PEFT_PREFIX):]: v for k, v in state.items() if k.startswith(PEFT_PREFIX)}
        result = self.model.load_state_dict(weights, strict=False)
        if result.missing_keys or result.unexpected_keys or len(weights) != len(state):
            raise AdapterFormatError(
                f"full: saved weights do not fit this model (missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}); load them on the architecture they "
                "were trained from"
            )

    @property
    def can_merge(self) -> bool:
        return True

    def merge(self) -> None:
        # The trained weights are the model itself: there is nothing to fold in.
        self.merged = True

    def unmerge(self) -> None:
        raise MergeNotSupportedError(
            "full: full fine-tuning keeps no copy of the original weights, so it cannot be "
            "unmerged; load the base model again to get them back"
        )

    def unsupported_message(self, capability: str) -> str:
        operation = "disabled()" if capability == "disable" else "scaled()/set_delta_scale()"
        return (f"full: {operation} is not supported: full fine-tuning changes the model's own "
                "weights and keeps no copy of the originals, so there is no delta to switch off "
                "or scale; keep a frozen copy of the original model (copy.deepcopy(model) "
                "before apply, or load the base model again) for base outputs and for weight "
                "interpolation, or train a delta method (LoRA, IA3, ...)")


def apply_full(model: nn.Module, config: FullFinetuneConfig) -> FullFinetuneHandle:
    """Makes every parameter trainable; finds the blocks when layer-wise decay is on."""
    stack = find_blocks(model, config.block_module)
    if config.layerwise_lr_decay != 1.0 and stack is None:
        raise ConfigError(
            "full: layerwise_lr_decay needs the model's list of transformer blocks, and no "
            "ModuleList named like 'layers'/'layer'/'h'/'blocks' was found; pass "
            "block_module='<name of the ModuleList>' or set layerwise_lr_decay=1.0"
        )
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return FullFinetuneHandle(model, config, stack)
