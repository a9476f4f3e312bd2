"""The method-agnostic training loop.

Its contract is a few types: a `Trainable` target (a model plus its parameter groups and
trainable state — `MethodHandle` satisfies it without this package importing `methods/`), a
`BatchSource` (epoch -> micro-batches; padding or packing is the caller's choice), an `Objective`
(`(model, batch) -> ObjectiveOutput` with named loss terms) and `Callback`s. The loop owns
AdamW, the learning-rate schedule, gradient accumulation (a short last window is averaged over
the micro-batches it has), clipping, NaN detection and the step counters; everything else —
metrics log, progress bar, periodic evaluation, early stopping, checkpoints, pruning schedules —
is a callback (deltatune.train.callbacks). Ctrl-C finishes the current step, lets the callbacks
save a checkpoint and raises `TrainingInterrupted`. With a `Distributed` (deltatune.train.
distributed) every rank runs this loop on its shard of each global micro-batch; the loss is
weighted so that the gradient equals one process's on the whole global batch.
"""
from __future__ import annotations

import math
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch
from torch import nn

from deltatune.errors import ConfigError, TrainingError
from deltatune.train.checkpoint import capture_checkpoint
from deltatune.train.config import TrainConfig
from deltatune.train.schedule import make_scheduler, warmup_steps_for

Batch = dict[str, torch.Tensor]
BatchSource = Callable[[int], Iterable[Batch]]  # epoch -> micro-batches of that epoch
Objective = Callable[[nn.Module, Batch], Any]  # -> ObjectiveOutput (loss, terms, token counts)


class Trainable(Protocol):
    """What the loop trains: `model` in place, through `parameter_groups`; `state_dict` /
    `load_state_dict` are the trainable state (checkpoints, best-state restore)."""
    model: nn.Module

    def parameter_groups(self, learning_rate: float, weight_decay: float) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class TrainState:
    """Where training stands, passed to every callback. The counters are saved in checkpoints;
    the references (`target`, `model`, `optimizer`, `scheduler`) are for callbacks to use."""
    total_steps: int
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` consumed so far
    micro_batches: int = 0
    input_tokens: int = 0
    label_tokens: int = 0
    elapsed_seconds: float = 0.0  # training time, summed over resumed sessions
    loss: float = float("nan")  # the last step's loss
    terms: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    learning_rate: float = 0.0
    stopped_early: bool = False
    interrupted: bool = False
    finished: bool = False
    target: Any = None
    model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    is_main_process: bool = True
    # Returns everything a checkpoint holds (set by the loop; see deltatune.train.checkpoint).
    capture: Callable[[], dict[str, Any]] | None = None

    COUNTERS = ("step", "epoch", "batch_in_epoch", "micro_batches", "input_tokens",
                "label_tokens", "elapsed_seconds", "loss", "terms")

    def counters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.COUNTERS}

    def load_counters(self, counters: dict[str, Any]) -> None:
        for name in self.COUNTERS:
            setattr(self, name, counters[name])


class Callback:
    """Hooks the loop calls; override what you need. `state_dict`/`load_state_dict` make a
    callback's own progress part of a checkpoint (values may be tensors)."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def should_stop(self, state: TrainState) -> bool:
        return False

    def on_interrupt(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingInterrupted(Exception):
    """Ctrl-C during training; `checkpoint` is the folder a callback saved, if any."""

    def __init__(self, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        where = f"; checkpoint saved in {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted after step {step}{where}")


@dataclass
class TrainResult:
    steps: int
    micro_batches: int
    input_tokens: int
    label_tokens: int
    wall_seconds: float
    final_loss: float
    stopped_early: bool = False
    final_terms: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / max(self.wall_seconds, 1e-9)


def total_optimizer_steps(config: TrainConfig, micro_batches_per_epoch: int) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return max(1, math.ceil(micro_batches_per_epoch * config.epochs / config.gradient_accumulation))


def make_optimizer(target: Trainable, config: TrainConfig) -> torch.optim.Optimizer:
    groups = target.parameter_groups(config.learning_rate, config.weight_decay)
    if not any(group["params"] for group in groups):
        raise TrainingError("nothing to train: the method left no trainable parameters")
    if config.optimizer == "paged_adamw_8bit":
        return _paged_adamw_8bit(groups, config)
    # foreach keeps the update to a few fused kernels instead of one per tensor.
    return torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay,
                             foreach=True)


def _paged_adamw_8bit(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    """QLoRA's optimizer: 8-bit AdamW states in CUDA unified memory, paged to the CPU when the
    GPU runs short. bitsandbytes implements it for CUDA tensors only."""
    devices = {p.device.type for group in groups for p in group["params"]}
    if devices != {"cuda"}:
        raise ConfigError("optimizer paged_adamw_8bit needs the model on a CUDA GPU (bitsandbytes "
                          f"pages optimizer state through CUDA memory; here: {sorted(devices)}); "
                          "use optimizer adamw on CPU")
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("optimizer paged_adamw_8bit needs bitsandbytes: pip install "
                          "bitsandbytes") from None
    return bitsandbytes.optim.PagedAdamW8bit(groups, lr=config.learning_rate,
                                             weight_decay=config.weight_decay)


def train(target: Trainable, batches: BatchSource, objective: Objective, config: TrainConfig,
          callbacks: Sequence[Callback] = (), *, micro_batches_per_epoch: int | None = None,
          model: nn.Module | None = None, distributed: Any = None,
          resume: Any = None) -> TrainResult:
    """Trains `target.model` in place and returns what happened (see the module docstring).

    `model` is the module to call when it wraps `target.model` (DistributedDataParallel);
    `distributed` the process group helper; `resume` a `Checkpoint` to continue from."""
    config.validate()
    model = model if model is not None else target.model
    device = next(target.model.parameters()).device
    if micro_batches_per_epoch is None and config.max_steps is None:
        micro_batches_per_epoch = sum(1 for _ in batches(0))
    total_steps = total_optimizer_steps(config, micro_batches_per_epoch or 0)
    optimizer = make_optimizer(target, config)
    scheduler = make_scheduler(optimizer, total_steps,
                               warmup_steps_for(total_steps, config.warmup_steps,
                                                config.warmup_ratio), config.schedule)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    state = TrainState(total_steps=total_steps, target=target, model=model, optimizer=optimizer,
                       scheduler=scheduler,
                       is_main_process=distributed is None or distributed.is_main)
    state.learning_rate = scheduler.get_last_lr()[0]
    state.capture = lambda: capture_checkpoint(state, callbacks)
    if resume is not None:
        resume.restore_training(state, callbacks)
    epochs = None if config.max_steps is not None else config.epochs
    stream = _micro_batches(batches, epochs, state.epoch, state.batch_in_epoch)
    for callback in callbacks:
        callback.on_train_start(state)
    if resume is not None:
        resume.restore_random_state()  # last, so nothing above shifts the dropout masks
    model.train()
    session_started, elapsed_before = time.perf_counter(), state.elapsed_seconds
    try:
        with _interrupt_requests(state):
            while state.step < total_steps:
                window = _next_window(stream, config.gradient_accumulation)
                if not window:
                    break
                _train_step(model, window, objective, device, state, distributed)
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.learning_rate = scheduler.get_last_lr()[0]
                state.elapsed_seconds = elapsed_before + time.perf_counter() - session_started
                for callback in callbacks:
                    callback.on_step_end(state)
                if _agree(distributed, state.interrupted):
                    _stop_for_interrupt(state, callbacks)
                if any([callback.should_stop(state) for callback in callbacks]):
                    state.stopped_early = True
                    break
            state.finished = True
    finally:
        model.eval()
        for callback in callbacks:
            callback.on_train_end(state)
    return TrainResult(state.step, state.micro_batches, state.input_tokens, state.label_tokens,
                       state.elapsed_seconds, state.loss, state.stopped_early, dict(state.terms))


# -- one optimizer step ----------------------------------------------------------------------

def _train_step(model: nn.Module, window: list[tuple[int, int, Batch]], objective: Objective,
                device: torch.device, state: TrainState, distributed: Any) -> None:
    """Forward and backward over the window's micro-batches, each weighing 1/len(window);
    updates the counters, the step's loss and its named terms."""
    totals: dict[str, torch.Tensor] = {}
    tokens = torch.zeros(2, dtype=torch.float64)
    for index, (epoch, position, batch) in enumerate(window):
        last = index == len(window) - 1
        sync = distributed.gradient_sync(model, last) if distributed else nullcontext()
        with sync:
            output = objective(model, _to_device(batch, device))
            weight = _loss_weight(output, distributed)
            loss = output.loss
            if not torch.isfinite(loss):
                raise TrainingError(f"loss became {loss.item()} at step {state.step + 1}; "
                                    "lower the learning rate or enable grad_clip")
            (loss * (weight / len(window))).backward()
        # Logged values: this process's part of the global window mean (summed over ranks).
        share = weight / (len(window) * (distributed.world_size if distributed else 1))
        for name, value in {"loss": loss, **output.terms}.items():
            totals[name] = totals.get(name, 0.0) + value.detach().double().cpu() * share
        tokens += torch.tensor([output.input_tokens, output.label_tokens], dtype=torch.float64)
        state.micro_batches += 1
        state.epoch, state.batch_in_epoch = epoch, position + 1
    names = list(totals)
    values = torch.stack([torch.as_tensor(totals[n]) for n in names] + list(tokens))
    if distributed:
        values = distributed.all_reduce_sum(values)
    state.loss = float(values[0])
    state.terms = {name: float(values[i]) for i, name in enumerate(names) if name != "loss"}
    state.input_tokens += int(values[-2])
    state.label_tokens += int(values[-1])


def _loss_weight(output: Any, distributed: Any) -> float:
    """This process's weight for its micro-batch loss: 1 alone; with several processes its
    label share of the global micro-batch times the world size, because DDP averages the
    gradients over processes — so the result is the global micro-batch's token mean."""
    if distributed is None:
        return 1.0
    local = float(output.label_tokens)
    total = float(distributed.all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])
    return local * distributed.world_size / max(total, 1.0)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


# -- data position ---------------------------------------------------------------------------

def _micro_batches(source: BatchSource, epochs: int | None, start_epoch: int = 0,
                   skip: int = 0) -> Iterator[tuple[int, int, Batch]]:
    """(epoch, index in epoch, batch) across epochs from (start_epoch, skip); endless when
    `epochs` is None (max_steps decides). Skipped batches are built but not run, so a resumed
    run sees exactly the batches an uninterrupted one would."""
    epoch = start_epoch
    while epochs is None or epoch < epochs:
        produced = False
        for index, batch in enumerate(source(epoch)):
            produced = True
            if epoch == start_epoch and index < skip:
                continue
            yield epoch, index, batch
        if not produced:
            raise TrainingError("the training data produced no batches; check that the dataset "
                                "is not empty after filtering and truncation")
        epoch += 1


def _next_window(stream: Iterator[tuple[int, int, Batch]],
                 size: int) -> list[tuple[int, int, Batch]]:
    window = []
    for item in stream:
        window.append(item)
        if len(window) == size:
            break
    return window


# -- Ctrl-C ----------------------------------------------------------------------------------

@contextmanager
def _interrupt_requests(state: TrainState) -> Iterator[None]:
    """The first Ctrl-C asks the loop to stop after the current step (and save); a second one
    aborts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, frame: Any) -> None:
        if state.interrupted:
            raise KeyboardInterrupt
        state.interrupted = True
        print("\ninterrupt: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without one)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _agree(distributed: Any, flag: bool) -> bool:
    """True when any process has the flag (all ranks must stop at the same step)."""
    if distributed is None:
        return flag
    return bool(distributed.all_reduce_sum(torch.tensor([float(flag)]))[0] > 0)


def _stop_for_interrupt(state: TrainState, callbacks: Sequence[Callback]) -> None:
    state.interrupted = True
    for callback in callbacks:
        callback.on_interrupt(state)
    saved = [getattr(c, "last_saved", None) for c in callbacks if getattr(c, "last_saved", None)]
    raise TrainingInterrupted(state.step, str(saved[-1]) if saved else None)
