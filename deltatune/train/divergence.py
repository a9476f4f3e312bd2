"""Noticing that training has blown up while the loss is still a finite number.

The loop stops on a NaN or infinite loss by itself, but a learning rate far too high usually
gives finite, huge losses first (MiniLM at lr 1e6: 0.69 → 3.3e7) and would otherwise finish with
exit code 0 and a saved, useless adapter. `DivergenceGuard` follows a smoothed loss (an
exponential moving average, so one hard batch does not trip it) and calls training diverged when
the smoothed loss exceeds `factor` times the first step's loss and is also more than `margin`
above it (the margin keeps a near-zero first loss from making every wobble a divergence). It
then warns once — on stderr and as a `warning` record in metrics.jsonl — or, with
`stop=True` (`--stop-on-divergence`), stops the run with a TrainingError.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Callable

from deltatune.errors import TrainingError
from deltatune.train.loop import Callback, TrainState

SMOOTHING = 0.3  # weight of the newest loss in the moving average
FACTOR = 4.0
MARGIN = 1.0


class DivergenceGuard(Callback):
    def __init__(self, log: Callable[[dict[str, Any]], None] | None = None, stop: bool = False,
                 factor: float = FACTOR, margin: float = MARGIN, announce: bool = True):
        self.log, self.stop = log, stop
        self.factor, self.margin, self.announce = factor, margin, announce
        self.first_loss: float | None = None
        self.smoothed: float | None = None
        self.diverged_at: int | None = None

    def on_step_end(self, state: TrainState) -> None:
        loss = float(state.loss)
        if not math.isfinite(loss):
            return
        if self.first_loss is None:
            self.first_loss = self.smoothed = loss
            return
        self.smoothed = SMOOTHING * loss + (1 - SMOOTHING) * self.smoothed
        if self.diverged_at is None and self._diverged():
            self.diverged_at = state.step
            self._report(state)

    def _diverged(self) -> bool:
        limit = max(self.factor * self.first_loss, self.first_loss + self.margin)
        return self.smoothed > limit

    def _report(self, state: TrainState) -> None:
        message = (f"training diverged at step {state.step}: the smoothed loss is "
                   f"{self.smoothed:.4g}, {self.smoothed / max(self.first_loss, 1e-12):.1f}x the "
                   f"first step's {self.first_loss:.4g}; lower the learning rate (now "
                   f"{state.learning_rate:.3g}) or add warm-up")
        if self.stop:
            raise TrainingError(message)
        if self.log is not None:
            self.log({"step": state.step, "warning": message})
        if self.announce and state.is_main_process:
            print(f"\nwarning: {message} (--stop-on-divergence makes this an error)",
                  file=sys.stderr, flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"first_loss": self.first_loss, "smoothed": self.smoothed,
                "diverged_at": self.diverged_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_loss, self.smoothed = state["first_loss"], state["smoothed"]
        self.diverged_at = state["diverged_at"]
