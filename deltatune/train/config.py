"""Training-loop settings: one dataclass, filled from CLI flags or YAML by deltatune.cli."""
from __future__ import annotations

from dataclasses import dataclass

from deltatune.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 1
    # Optimizer steps; when set it overrides `epochs` (the data repeats as needed).
    max_steps: int | None = None
    batch_size: int = 8
    gradient_accumulation: int = 1
    grad_clip: float | None = 1.0
    schedule: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    # Evaluate every N optimizer steps (None: only at the end).
    eval_every: int | None = None
    log_every: int = 10
    # Stop after this many evaluations without improvement of `metric_for_best`.
    early_stopping_patience: int | None = None
    metric_for_best: str | None = None
    greater_is_better: bool = True
    # Several examples per row (padding-free) for causal-LM training; see docs/speed.md.
    packing: bool = True
    seed: int = 0

    def validate(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1 or self.gradient_accumulation < 1:
            raise ConfigError("batch_size and gradient_accumulation must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule '{self.schedule}' unknown; choose one of {SCHEDULES}")
        if self.max_steps is None and self.epochs < 1:
            raise ConfigError("set epochs >= 1 or max_steps >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.early_stopping_patience is not None and not self.eval_every:
            raise ConfigError("early stopping needs periodic evaluation: set eval_every")
