"""Training settings: one dataclass, the `train:` section of a run config. The loop reads the
optimisation fields; the job reads the speed switches and applies them to the model around the
loop (deltatune/train/speed.py). The annotations are checked once at the CLI/YAML boundary;
`validate()` repeats the checks the loop cannot work without, for library callers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import ConfigDict, Field

from deltatune.errors import ConfigError

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class TrainConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")

    learning_rate: Annotated[float, Field(gt=0)] = 2e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    epochs: Annotated[int, Field(ge=1)] = 1
    # Optimizer steps; when set it overrides `epochs` (the data repeats as needed).
    max_steps: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 8
    gradient_accumulation: Annotated[int, Field(ge=1)] = 1
    grad_clip: float | None = 1.0
    # "paged_adamw_8bit": bitsandbytes' paged 8-bit AdamW (QLoRA's optimizer), CUDA only.
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    # Evaluate every N optimizer steps (None: only at the end).
    eval_every: Annotated[int, Field(ge=1)] | None = None
    log_every: Annotated[int, Field(ge=1)] = 10
    # A loss that climbs far above the first step's is reported (deltatune/train/divergence.py);
    # True makes it an error that stops the run.
    stop_on_divergence: bool = False
    # Stop after this many evaluations without improvement of `metric_for_best`.
    early_stopping_patience: Annotated[int, Field(ge=1)] | None = None
    metric_for_best: str | None = None
    greater_is_better: bool = True
    # Write a resumable checkpoint every N optimizer steps (None: only on Ctrl-C).
    save_every: Annotated[int, Field(ge=1)] | None = None
    # Several examples per row (padding-free) for causal-LM training; see docs/speed.md.
    packing: bool = True
    # Speed switches, applied to the model for the loop only (deltatune/train/speed.py).
    activation_checkpointing: bool = False
    compile: bool = False
    allocator: Literal["reuse", "release", "system"] = "reuse"
    # torch threads; None: one per core that other processes leave free, re-checked every few
    # seconds (deltatune/train/threads.py).
    threads: Annotated[int, Field(ge=1)] | None = None
    # Several processes (torchrun): "ddp" replicates the model, "fsdp" shards it (FSDP2).
    distributed: Literal["ddp", "fsdp"] = "ddp"
    # Experiment trackers that receive metrics.jsonl's numbers (deltatune/train/trackers.py,
    # docs/tracking.md): "none", "tensorboard", or several as a list or "a,b".
    report_to: str | list[str] = "none"

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
