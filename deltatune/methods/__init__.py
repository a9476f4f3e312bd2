"""Adaptation methods and their registry.

Each method lives in its own file and is listed once in `_METHODS` below (module, config class,
apply function). Entries import lazily, so a method's dependencies load only when it is used.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from deltatune.errors import ConfigError
from deltatune.methods.base import MethodConfig, MethodHandle


@dataclass(frozen=True)
class MethodEntry:
    module: str
    config_class: str
    apply_function: str
    summary: str


_METHODS: dict[str, MethodEntry] = {
    "lora": MethodEntry("deltatune.methods.lora", "LoraConfig", "apply_lora",
                        "LoRA low-rank deltas (rsLoRA, DoRA, Linear/Embedding/Conv2d)"),
    "qlora": MethodEntry("deltatune.methods.lora", "QLoraConfig", "apply_lora",
                         "QLoRA: LoRA on a base frozen in NF4 with double quantization"),
    "full": MethodEntry("deltatune.methods.full", "FullFinetuneConfig", "apply_full",
                        "full fine-tuning, optional layer-wise learning-rate decay"),
    "freeze": MethodEntry("deltatune.methods.freeze", "FreezeConfig", "apply_freeze",
                          "linear probe / freeze bottom k layers / train chosen modules"),
    "adapter": MethodEntry("deltatune.methods.bottleneck", "BottleneckConfig", "apply_bottleneck",
                           "bottleneck adapters (Houlsby or Pfeiffer)"),
    "prefix": MethodEntry("deltatune.methods.prefix", "PrefixTuningConfig", "apply_prefix",
                          "prefix tuning: trainable key/value prefixes in every layer"),
    "prompt": MethodEntry("deltatune.methods.prompt", "PromptTuningConfig", "apply_prompt",
                          "prompt tuning: trainable soft prompt at the input"),
    "ptuning": MethodEntry("deltatune.methods.ptuning", "PTuningConfig", "apply_ptuning",
                           "P-tuning: virtual tokens from a prompt encoder (MLP/LSTM)"),
    "ia3": MethodEntry("deltatune.methods.ia3", "IA3Config", "apply_ia3",
                       "IA3: learned scaling of keys, values and FFN activations"),
    "textual-inversion": MethodEntry("deltatune.methods.textual_inversion",
                                     "TextualInversionConfig", "apply_textual_inversion",
                                     "new placeholder-token embeddings, model frozen"),
    "hyperlora": MethodEntry("deltatune.methods.hyperlora", "HyperLoraConfig", "apply_hyperlora",
                             "hypernetwork generating every layer's LoRA from layer embeddings"),
    "subspace": MethodEntry("deltatune.methods.subspace", "SubspaceConfig", "apply_subspace",
                            "intrinsic dimension: train d numbers, θ = θ₀ + P z (Fastfood)"),
}

# adapter_config.json `peft_type` values PEFT writes, mapped to our method names.
PEFT_TYPE_TO_METHOD = {
    "LORA": "lora",
    "IA3": "ia3",
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
    "P_TUNING": "ptuning",
}


def method_names() -> list[str]:
    return list(_METHODS)


def method_summary(name: str) -> str:
    return _entry(name).summary


def _entry(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def config_class(name: str) -> type[MethodConfig]:
    entry = _entry(name)
    return getattr(importlib.import_module(entry.module), entry.config_class)


def _apply_function(name: str) -> Callable[[nn.Module, MethodConfig], MethodHandle]:
    entry = _entry(name)
    return getattr(importlib.import_module(entry.module), entry.apply_function)


def make_config(name: str, options: dict[str, Any] | None = None) -> MethodConfig:
    """A method's config from a name and an options dict (CLI/YAML)."""
    return config_class(name).from_options(dict(options or {}))


def apply(model: nn.Module, config: MethodConfig) -> MethodHandle:
    """Freezes the base model, inserts the method's delta modules in place, returns the handle."""
    return _apply_function(config.method_name)(model, config)


__all__ = ["MethodConfig", "MethodHandle", "apply", "make_config", "config_class",
           "method_names", "method_summary", "PEFT_TYPE_TO_METHOD"]
