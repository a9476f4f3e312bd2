"""Switches that trade memory, time and start-up cost during training, each measured in
docs/speed.md: the output head fused with the loss (deltatune/models/fused_loss.py: no
full-vocabulary logits), packed attention (per-example attention for packed batches), the fused
gated MLP
(less activation memory, deltatune/train/fused_mlp.py), activation
checkpointing (recompute each decoder layer in backward instead of storing its activations),
torch.compile of the decoder layers, and the CPU allocator policy. `apply_speed_options(model,
SpeedOptions(...))` turns on the chosen ones; the fused loss, packed attention (which changes
nothing for padded batches), the fused MLP and the "reuse" allocator policy are on by default.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.models.fused_loss import install_fused_loss, remove_fused_loss
from deltatune.train.fused_mlp import fuse_gated_mlps, unfuse_gated_mlps
from deltatune.train.packed_attention import enable_packed_attention
from deltatune.train.packed_classification import (install_packed_classification,
                                                   remove_packed_classification)


@dataclass
class SpeedOptions:
    fused_loss: bool = True
    packed_attention: bool = True
    # One row of logits per packed sentence (first-token pooling; deltatune/train/
    # packed_classification.py). Only for classification on packed rows.
    packed_classification: bool = False
    fused_mlp: bool = True
    activation_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1
    compile: bool = False
    allocator: str = "reuse"

    def __post_init__(self) -> None:
        if self.allocator not in ALLOCATOR_POLICIES:
            raise ConfigError(f"allocator '{self.allocator}' is not one of "
                              f"{list(ALLOCATOR_POLICIES)}")


def apply_speed_options(model: nn.Module, options: SpeedOptions) -> None:
    """Turns on the chosen switches on a transformers model (after the method is applied)."""
    set_allocator_policy(options.allocator)
    if options.fused_loss:
        # First: its exactness probe must run the model before anything is compiled.
        install_fused_loss(model)
    if options.packed_attention:
        enable_packed_attention(model)
    if options.packed_classification and not install_packed_classification(model):
        raise ConfigError(f"{type(model).__name__} cannot classify packed rows exactly; train "
                          "it with packing off")
    if options.fused_mlp:
        fuse_gated_mlps(model)
    if options.activation_checkpointing:
        enable_activation_checkpointing(model, options.checkpoint_every_n_layers)
    if options.compile:
        compile_decoder_layers(model)


@contextmanager
def speed_options_applied(model: nn.Module, options: SpeedOptions) -> Iterator[None]:
    """`apply_speed_options` for the duration of the block, then the model's own forward,
    attention, MLP forward and (no) checkpointing again, so evaluation and generation afterwards
    run the model as loaded. Compiled layers stay compiled (same outputs); the allocator policy is
    process-wide and stays."""
    attention = model.config._attn_implementation
    apply_speed_options(model, options)
    try:
        yield
    finally:
        remove_fused_loss(model)
        remove_packed_classification(model)
        unfuse_gated_mlps(model)
        if options.packed_attention:
            model.set_attn_implementation(attention)
        if options.activation_checkpointing:
            model.activation_checkpointing_disable()


def enable_activation_checkpointing(model: nn.Module, every_n_layers: int = 1) -> None:
    """Non-reentrant checkpointing of every `every_n_layers`-th decoder layer. transformers also
    makes the input embeddings require grad (reentrant checkpointing needs it); non-reentrant
    does not, and that flag would back-propagate through the first layer's frozen weights for
    nothing, so it is switched off again."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(model).__name__} does not support activation checkpointing; "
                          "turn activation_checkpointing off")
    model.activation_checkpointing_enable({"use_reentrant": False}, every_n_layers=every_n_layers)
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def compile_decoder_layers(model: nn.Module) -> int:
    """torch.compile's each repeated block (the entries of the model's largest ModuleList) in
    place, with dynamic shapes so varying batch lengths do not recompile; returns how many.
    Identical layers share one compiled graph."""
    layers = _largest_module_list(model)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no list of layers to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _largest_module_list(model: nn.Module) -> nn.ModuleList | None:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len, default=None)


# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
ALLOCATOR_POLICIES = ("reuse", "release", "system")


def set_allocator_policy(policy: str) -> bool:
    """Process-wide, glibc only; returns whether the setting took effect. A training step frees
    and re-allocates gigabytes of activations (1,436 packed tokens of smollm2-135m: ~12 GB of
    pages per step). How glibc serves them decides both speed and peak RSS (measured, 1 thread):

    - "reuse": tensors up to 32 MB come from the heap and freed memory stays there (no trimming),
      so after the first steps no page is faulted in again: 181 real tok/s, peak RSS 6.3 GB;
    - "release": tensors of 1 MB or more are mmap'ed and returned on free, so every step faults
      ~3 M fresh zeroed pages in: 99 tok/s (a third of the step in the kernel), 4.1 GB;
    - "system": glibc's default dynamic threshold, between the two and creeping for many steps.
    """
    if policy == "system" or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
        if policy == "release":
            return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 20))
        return all([mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD),
                    mallopt(_M_TRIM_THRESHOLD, 1 << 30), mallopt(_M_TOP_PAD, 64 << 20)])
    except (OSError, AttributeError):
        return False


def set_threads(threads: int | None) -> int:
    """Sets torch's intra-op threads (None: leave torch's default, one per core); returns it."""
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
