"""The method-agnostic training loop.

It sees a `MethodHandle` (what to optimise), a source of ready batches per epoch (padding or
packing is decided by the caller), an objective `(model, batch) -> ObjectiveOutput` and an
optional evaluation callback. AdamW, linear/cosine schedule with warmup, gradient accumulation,
clipping, periodic evaluation with early stopping on a chosen metric (the best adapter state is
restored at the end), NaN detection, a progress bar with loss, tokens/s and ETA, and one
metrics.jsonl line per logged step. New losses plug into the objective, never into this loop.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from deltatune.errors import TrainingError
from deltatune.methods.base import MethodHandle
from deltatune.train.config import TrainConfig
from deltatune.train.run_dir import RunDirectory
from deltatune.train.schedule import make_scheduler, warmup_steps_for

Batch = dict[str, torch.Tensor]
BatchSource = Callable[[int], Iterable[Batch]]  # epoch -> micro-batches of that epoch
Objective = Callable[[torch.nn.Module, Batch], Any]
Evaluate = Callable[[], dict[str, float]]


@dataclass
class TrainResult:
    steps: int
    micro_batches: int
    input_tokens: int
    label_tokens: int
    wall_seconds: float
    final_loss: float
    stopped_early: bool = False
    best_metrics: dict[str, float] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / max(self.wall_seconds, 1e-9)


class _EarlyStopping:
    """Tracks the best value of one eval metric and the adapter state that produced it."""

    def __init__(self, metric: str | None, greater_is_better: bool, patience: int | None):
        self.metric, self.greater, self.patience = metric, greater_is_better, patience
        self.best_value: float | None = None
        self.best_metrics: dict[str, float] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evaluations = 0

    def update(self, metrics: dict[str, float], handle: MethodHandle) -> bool:
        """Records an evaluation; returns True when training should stop."""
        if self.metric is None:
            return False
        if self.metric not in metrics:
            raise TrainingError(f"metric_for_best '{self.metric}' is not among the evaluation "
                                f"metrics {sorted(metrics)}; pick one of those")
        value = metrics[self.metric]
        improved = self.best_value is None or (
            value > self.best_value if self.greater else value < self.best_value)
        if improved:
            self.best_value, self.best_metrics, self.bad_evaluations = value, metrics, 0
            self.best_state = {k: v.detach().clone() for k, v in handle.state_dict().items()}
            return False
        self.bad_evaluations += 1
        return self.patience is not None and self.bad_evaluations >= self.patience


def _micro_batches(source: BatchSource, epochs: int | None) -> Iterator[tuple[int, Batch]]:
    """Micro-batches across epochs; endless when `epochs` is None (max_steps decides)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        produced = False
        for batch in source(epoch):
            produced = True
            yield epoch, batch
        if not produced:
            raise TrainingError("the training data produced no batches; check that the dataset "
                                "is not empty after filtering and truncation")
        epoch += 1


def total_optimizer_steps(config: TrainConfig, micro_batches_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(micro_batches_per_epoch * config.epochs / config.gradient_accumulation))


def make_optimizer(handle: MethodHandle, config: TrainConfig) -> torch.optim.Optimizer:
    groups = handle.parameter_groups(config.learning_rate, config.weight_decay)
    if not any(group["params"] for group in groups):
        raise TrainingError(f"method '{handle.config.method_name}' left no trainable parameters")
    # foreach keeps the update to a few fused kernels instead of one per tensor.
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay,
                             foreach=True)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def train(handle: MethodHandle, batches: BatchSource, micro_batches_per_epoch: int,
          objective: Objective, config: TrainConfig, run: RunDirectory | None = None,
          evaluate: Evaluate | None = None, show_progress: bool = True) -> TrainResult:
    """Trains `handle.model` in place; returns what happened. See the module docstring."""
    config.validate()
    model = handle.model
    device = next(model.parameters()).device
    total_steps = total_optimizer_steps(config, micro_batches_per_epoch)
    optimizer = make_optimizer(handle, config)
    scheduler = make_scheduler(optimizer, total_steps,
                               warmup_steps_for(total_steps, config.warmup_steps,
                                                config.warmup_ratio), config.schedule)
    stopper = _EarlyStopping(config.metric_for_best, config.greater_is_better,
                             config.early_stopping_patience)
    trainable = handle.trainable_parameters()
    result = TrainResult(0, 0, 0, 0, 0.0, float("nan"))
    epochs = None if config.max_steps is not None else config.epochs
    stream = _micro_batches(batches, epochs)
    window_loss, window_count = 0.0, 0
    model.train()
    progress = tqdm(total=total_steps, desc="train", unit="step", disable=not show_progress,
                    dynamic_ncols=True)
    started = time.perf_counter()
    try:
        while result.steps < total_steps:
            step_loss, epoch = _accumulate(model, stream, objective, config, device, result)
            if epoch is None:
                break
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps += 1
            result.final_loss = step_loss
            window_loss, window_count = window_loss + step_loss, window_count + 1
            elapsed = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}",
                                 tok_s=f"{result.input_tokens / max(elapsed, 1e-9):.0f}")
            if result.steps % config.log_every == 0 or result.steps == total_steps:
                _log_step(run, result, epoch, window_loss / window_count,
                          scheduler.get_last_lr()[0], elapsed)
                window_loss, window_count = 0.0, 0
            if evaluate and config.eval_every and result.steps % config.eval_every == 0 \
                    and result.steps < total_steps:
                if _evaluate_and_check(evaluate, model, stopper, handle, result, run):
                    result.stopped_early = True
                    break
    finally:
        progress.close()
        model.eval()
    result.wall_seconds = time.perf_counter() - started
    _restore_best(stopper, handle, result)
    return result


def _accumulate(model: torch.nn.Module, stream: Iterator[tuple[int, Batch]], objective: Objective,
                config: TrainConfig, device: torch.device,
                result: TrainResult) -> tuple[float, int | None]:
    """Runs `gradient_accumulation` micro-batches forward and backward; returns the mean loss."""
    total, epoch = 0.0, None
    for _ in range(config.gradient_accumulation):
        try:
            epoch, batch = next(stream)
        except StopIteration:
            break
        output = objective(model, _to_device(batch, device))
        loss = output.loss
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {result.steps + 1}; lower "
                                "the learning rate or enable grad_clip")
        (loss / config.gradient_accumulation).backward()
        total += loss.item()
        result.micro_batches += 1
        result.input_tokens += int(output.input_tokens)
        result.label_tokens += int(output.label_tokens)
    return total / config.gradient_accumulation, epoch


def _log_step(run: RunDirectory | None, result: TrainResult, epoch: int, loss: float, lr: float,
              elapsed: float) -> None:
    if run is None:
        return
    run.log({"step": result.steps, "epoch": epoch, "loss": round(loss, 6), "lr": lr,
             "tokens": result.input_tokens, "label_tokens": result.label_tokens,
             "tokens_per_second": round(result.input_tokens / max(elapsed, 1e-9), 2),
             "elapsed_seconds": round(elapsed, 3)})


def _evaluate_and_check(evaluate: Evaluate, model: torch.nn.Module, stopper: _EarlyStopping,
                        handle: MethodHandle, result: TrainResult,
                        run: RunDirectory | None) -> bool:
    model.eval()
    metrics = evaluate()
    model.train()
    result.evaluations.append({"step": result.steps, **metrics})
    if run is not None:
        run.log({"step": result.steps, **{f"eval_{k}": v for k, v in metrics.items()}})
    return stopper.update(metrics, handle)


def _restore_best(stopper: _EarlyStopping, handle: MethodHandle, result: TrainResult) -> None:
    """With early stopping on, the model ends with the best evaluated adapter state, unless the
    final state (evaluated by the caller) might be better: then the caller compares."""
    result.best_metrics = stopper.best_metrics
    if stopper.best_state is not None and result.stopped_early:
        handle.load_state_dict(stopper.best_state)
