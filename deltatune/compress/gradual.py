"""Pruning during training, as loop callbacks: `MaskKeeper` holds fixed masks (pruned weights
stay exactly zero while the rest heals), `GradualPruning` raises the sparsity along Zhu & Gupta's
(2017) cubic schedule, recomputing the masks every few steps by magnitude or Wanda. Masks only
grow: a weight once pruned stays pruned. Both keep their masks in the loop's checkpoints, so a
resumed run prunes exactly like an uninterrupted one.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from deltatune.compress.unstructured import (Masks, apply_masks, magnitude_masks,
                                             sparsity_report, wanda_masks)
from deltatune.errors import ConfigError
from deltatune.train.loop import Callback, TrainState

METHODS = ("magnitude", "wanda")
# AdamW's running moments; zeroed where a weight is pruned so it does not drift back.
_OPTIMIZER_MOMENTS = ("exp_avg", "exp_avg_sq")


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's schedule s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))³: `initial` up
    to `start`, `final` from `end` on, rising fast at first and slowly near the end."""
    if step <= start:
        return float(initial)
    if step >= end:
        return float(final)
    remaining = 1.0 - (step - start) / (end - start)
    return float(final + (initial - final) * remaining ** 3)


class MaskKeeper(Callback):
    """Re-applies `masks` after every optimizer step and zeroes the optimizer's moments at the
    pruned positions, so pruned weights stay exactly zero during further training. Outside the
    loop, `apply(optimizer=None)` does the same once."""

    def __init__(self, model: nn.Module, masks: Masks):
        self.model = model
        self.masks: Masks = {}
        self.set_masks(masks)

    def set_masks(self, masks: Masks) -> None:
        device = next(self.model.parameters()).device
        self.masks = {name: mask.to(device=device, dtype=torch.bool)
                      for name, mask in masks.items()}
        apply_masks(self.model, self.masks)  # also checks names and shapes

    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        apply_masks(self.model, self.masks)
        if optimizer is not None:
            zero_optimizer_moments(self.model, self.masks, optimizer)

    def on_train_start(self, state: TrainState) -> None:
        self.apply()

    def on_step_end(self, state: TrainState) -> None:
        self.apply(state.optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: mask.cpu() for name, mask in self.masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set_masks(state["masks"])


def zero_optimizer_moments(model: nn.Module, masks: Masks,
                           optimizer: torch.optim.Optimizer) -> None:
    """Zeroes Adam-style moment buffers at pruned positions (other optimizers: nothing to do)."""
    with torch.no_grad():
        for name, mask in masks.items():
            parameter = model.get_submodule(name).weight
            slots = optimizer.state.get(parameter, {})
            for moment in _OPTIMIZER_MOMENTS:
                value = slots.get(moment)
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.masked_fill_(~mask.to(value.device), 0.0)


class GradualPruning(Callback):
    """Prunes `model` from `initial_sparsity` at `start_step` to `final_sparsity` at `end_step`
    along `cubic_sparsity`, recomputing the masks every `every` steps (and at `end_step`) with
    `method` ("magnitude" with `scope` "local"/"global", or "wanda" on `batches_for_wanda`, a
    re-iterable list of calibration batches) and holding them fixed in between and after.
    `current_sparsity` is the target last applied; `history` holds one entry per update
    (step, target and measured sparsity of the prunable weights) for the job to log."""

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int,
                 every: int, method: str = "magnitude", scope: str = "local",
                 batches_for_wanda: Iterable[dict[str, torch.Tensor]] | None = None,
                 initial_sparsity: float = 0.0):
        _check_schedule(final_sparsity, initial_sparsity, start_step, end_step, every)
        _check_method(method, scope, batches_for_wanda)
        self.model = model
        self.final_sparsity, self.initial_sparsity = float(final_sparsity), float(initial_sparsity)
        self.start_step, self.end_step, self.every = start_step, end_step, every
        self.method, self.scope = method, scope
        self.batches_for_wanda = (list(batches_for_wanda) if batches_for_wanda is not None
                                  else None)
        self.keeper: MaskKeeper | None = None
        self.current_sparsity = 0.0
        self.history: list[dict[str, Any]] = []

    @property
    def masks(self) -> Masks | None:
        return self.keeper.masks if self.keeper is not None else None

    def is_update_step(self, step: int) -> bool:
        if step < self.start_step or step > self.end_step:
            return False
        return (step - self.start_step) % self.every == 0 or step == self.end_step

    def on_train_start(self, state: TrainState) -> None:
        if self.end_step > state.total_steps:
            raise ConfigError(f"gradual pruning ends at step {self.end_step} but training has "
                              f"only {state.total_steps} steps; lower end_step or train longer")
        if self.keeper is not None:  # resumed: the loaded masks hold from the first step
            self.keeper.apply()
        elif self.start_step == 0 and self.initial_sparsity > 0:
            self.prune_to(0, self.initial_sparsity)

    def on_step_end(self, state: TrainState) -> None:
        if self.is_update_step(state.step):
            target = cubic_sparsity(state.step, self.initial_sparsity, self.final_sparsity,
                                    self.start_step, self.end_step)
            if target > self.current_sparsity or self.keeper is None:
                self.prune_to(state.step, target)
        if self.keeper is not None:
            self.keeper.apply(state.optimizer)

    def prune_to(self, step: int, sparsity: float) -> Masks:
        """Recomputes the masks at `sparsity` (never unpruning a weight) and applies them."""
        previous = self.masks
        if self.method == "wanda":
            masks = wanda_masks(self.model, self.batches_for_wanda or [], sparsity,
                                already_pruned=previous)
        else:
            masks = magnitude_masks(self.model, sparsity, self.scope, already_pruned=previous)
        if self.keeper is None:
            self.keeper = MaskKeeper(self.model, masks)
        else:
            self.keeper.set_masks(masks)
        self.current_sparsity = sparsity
        measured = sparsity_report(self.model, masks)["sparsity"]
        self.history.append({"step": step, "target_sparsity": round(sparsity, 6),
                             "sparsity": round(measured, 6)})
        return masks

    def state_dict(self) -> dict[str, Any]:
        return {"masks": None if self.keeper is None else self.keeper.state_dict()["masks"],
                "current_sparsity": self.current_sparsity,
                "history": [dict(entry) for entry in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current_sparsity = float(state["current_sparsity"])
        self.history = [dict(entry) for entry in state["history"]]
        if state["masks"] is None:
            self.keeper = None
        elif self.keeper is None:
            self.keeper = MaskKeeper(self.model, state["masks"])
        else:
            self.keeper.set_masks(state["masks"])


def _check_schedule(final: float, initial: float, start: int, end: int, every: int) -> None:
    if not 0.0 <= initial <= final < 1.0:
        raise ConfigError(f"need 0 <= initial_sparsity <= final_sparsity < 1, got {initial} and "
                          f"{final}")
    if start < 0 or end < start:
        raise ConfigError(f"need 0 <= start_step <= end_step, got {start} and {end}")
    if every < 1:
        raise ConfigError(f"every must be at least 1 step, got {every}")


def _check_method(method: str, scope: str, batches: Any) -> None:
    if method not in METHODS:
        raise ConfigError(f"unknown pruning method {method!r}; use one of {METHODS}")
    if method == "wanda" and batches is None:
        raise ConfigError("method='wanda' needs calibration batches: pass batches_for_wanda")
    if method == "wanda" and scope != "local":
        raise ConfigError("Wanda compares weights within each output row; drop scope='global' "
                          "or use method='magnitude'")
    if scope not in ("local", "global"):
        raise ConfigError(f"scope must be 'local' or 'global', got {scope!r}")
