"""The loop's built-in callbacks: the metrics log (one metrics.jsonl line per logged step, with
every named loss term), the progress bar, periodic evaluation with early stopping (restoring the
best trainable state), and checkpoints (every N steps and on Ctrl-C). Each keeps its own state in
checkpoints, so a resumed run logs, evaluates and stops exactly as an uninterrupted one. Only
the main process of a distributed run writes anything.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from deltatune.errors import TrainingError
from deltatune.train.checkpoint import write_checkpoint
from deltatune.train.loop import Callback, TrainState

Evaluate = Callable[[], dict[str, Any]]


class MetricsLog(Callback):
    """Every `every` steps (and at the last one): the mean loss and loss terms over the steps
    since the previous line, learning rate, token counts and speed. `log` is the run directory's
    line writer (deltatune.train.run_dir.RunDirectory.log)."""

    def __init__(self, log: Callable[[dict[str, Any]], None], every: int):
        self.log, self.every = log, every
        self.window: dict[str, float] = {}
        self.window_steps = 0

    def on_step_end(self, state: TrainState) -> None:
        for name, value in {"loss": state.loss, **state.terms}.items():
            self.window[name] = self.window.get(name, 0.0) + value
        self.window_steps += 1
        if state.step % self.every and state.step != state.total_steps:
            return
        means = {name: round(total / self.window_steps, 6) for name, total in self.window.items()}
        record = {"step": state.step, "epoch": state.epoch, "loss": means.pop("loss"),
                  **{f"loss_{name}": value for name, value in means.items()},
                  "lr": state.learning_rate, "tokens": state.input_tokens,
                  "label_tokens": state.label_tokens,
                  "tokens_per_second": round(state.input_tokens
                                             / max(state.elapsed_seconds, 1e-9), 2),
                  "elapsed_seconds": round(state.elapsed_seconds, 3)}
        if state.is_main_process:
            self.log(record)
        self.window, self.window_steps = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"window": dict(self.window), "window_steps": self.window_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window, self.window_steps = dict(state["window"]), state["window_steps"]


class ProgressBar(Callback):
    """tqdm bar over optimizer steps with the loss, tokens/s and ETA."""

    def __init__(self, show: bool = True):
        self.show = show
        self.bar: Any = None

    def on_train_start(self, state: TrainState) -> None:
        self.bar = tqdm(total=state.total_steps, initial=state.step, desc="train", unit="step",
                        disable=not (self.show and state.is_main_process), dynamic_ncols=True)

    def on_step_end(self, state: TrainState) -> None:
        self.bar.update(1)
        terms = {name: f"{value:.4f}" for name, value in state.terms.items()
                 if len(state.terms) > 1}
        self.bar.set_postfix(loss=f"{state.loss:.4f}", **terms,
                             tok_s=f"{state.input_tokens / max(state.elapsed_seconds, 1e-9):.0f}")

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


class PeriodicEvaluation(Callback):
    """Evaluates every `every` steps (not at the last one: the job evaluates the final model),
    logs `eval_<metric>` lines, and with `metric` set tracks the best value and the trainable
    state that produced it; after `patience` evaluations without improvement it stops training,
    and the best state is restored when training ends early."""

    def __init__(self, evaluate: Evaluate, every: int,
                 log: Callable[[dict[str, Any]], None] | None = None, metric: str | None = None,
                 greater_is_better: bool = True, patience: int | None = None):
        self.evaluate, self.every, self.log = evaluate, every, log
        self.metric, self.greater, self.patience = metric, greater_is_better, patience
        self.best_value: float | None = None
        self.best_metrics: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_evaluations = 0
        self.evaluations: list[dict[str, Any]] = []
        self._stop = False

    def on_step_end(self, state: TrainState) -> None:
        if state.step % self.every or state.step >= state.total_steps:
            return
        metrics = self.evaluate()
        state.model.train()
        self.evaluations.append({"step": state.step, **_plain(metrics)})
        if self.log is not None and state.is_main_process:
            self.log({"step": state.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        self._stop = self._record(metrics, state)

    def should_stop(self, state: TrainState) -> bool:
        return self._stop

    def on_train_end(self, state: TrainState) -> None:
        if state.stopped_early and self.best_state is not None:
            state.target.load_state_dict(self.best_state)

    def _record(self, metrics: dict[str, Any], state: TrainState) -> bool:
        if self.metric is None:
            return False
        if self.metric not in metrics:
            raise TrainingError(f"metric_for_best '{self.metric}' is not among the evaluation "
                                f"metrics {sorted(metrics)}; pick one of those")
        value = metrics[self.metric]
        improved = self.best_value is None or (
            value > self.best_value if self.greater else value < self.best_value)
        if improved:
            self.best_value, self.best_metrics, self.bad_evaluations = value, _plain(metrics), 0
            self.best_state = {k: v.detach().clone() for k, v in state.target.state_dict().items()}
            return False
        self.bad_evaluations += 1
        return self.patience is not None and self.bad_evaluations >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "best_metrics": self.best_metrics,
                "best_state": self.best_state, "bad_evaluations": self.bad_evaluations,
                "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_value, self.best_metrics = state["best_value"], state["best_metrics"]
        self.best_state, self.bad_evaluations = state["best_state"], state["bad_evaluations"]
        self.evaluations = list(state["evaluations"])


class Checkpointing(Callback):
    """Writes a resumable checkpoint into `run_path` every `every` steps (None: only on Ctrl-C),
    keeping the newest `keep`. On resume it cuts metrics.jsonl back to the length it had at the
    checkpoint, so the lines of the steps that are run again are not there twice."""

    def __init__(self, run_path: str | Path, every: int | None, keep: int = 1,
                 metrics_path: str | Path | None = None):
        self.run_path, self.every, self.keep = Path(run_path), every, keep
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.last_saved: Path | None = None

    def on_step_end(self, state: TrainState) -> None:
        if self.every and state.step % self.every == 0 and state.step < state.total_steps:
            self.save(state)

    def on_interrupt(self, state: TrainState) -> None:
        self.save(state)

    def save(self, state: TrainState) -> None:
        captured = state.capture()
        if state.is_main_process:
            self.last_saved = write_checkpoint(self.run_path, captured, self.keep)

    def state_dict(self) -> dict[str, Any]:
        size = self.metrics_path.stat().st_size if self.metrics_path and \
            self.metrics_path.exists() else 0
        return {"metrics_bytes": size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.metrics_path and self.metrics_path.exists():
            with open(self.metrics_path, "r+b") as handle:
                handle.truncate(state["metrics_bytes"])
                handle.flush()
                os.fsync(handle.fileno())


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the non-number extras (generated samples), for checkpoint state."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
