"""The run specification at the CLI/YAML boundary: pydantic models validating what a user wrote
(YAML file and/or flags) before it becomes the plain dataclasses the library uses."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltatune.errors import ConfigError
from deltatune.methods import make_config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    train: str | None = None
    eval: str | None = None
    builtin: str | None = None
    builtin_train_size: int = 1000
    builtin_eval_size: int = 100
    columns: dict[str, str] = Field(default_factory=dict)
    # Column mapping of the eval file when it names columns differently (default: `columns`).
    eval_columns: dict[str, str] | None = None
    template: Literal["alpaca", "chat", "none"] = "chat"
    max_length: int = Field(256, ge=8)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    train_limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)
    label_names: list[str] | None = None
    placeholders: dict[str, str] = Field(default_factory=dict)


class TrainSpec(_Strict):
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    grad_clip: float | None = 1.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    warmup_steps: int = Field(0, ge=0)
    eval_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    early_stopping_patience: int | None = Field(None, ge=1)
    metric_for_best: str | None = None
    greater_is_better: bool = True
    packing: bool = True
    # Speed switches (deltatune/train/speed.py, measured in docs/speed.md).
    activation_checkpointing: bool = False
    compile: bool = False
    allocator: Literal["reuse", "release", "system"] = "reuse"
    threads: int | None = Field(None, ge=1)


class EvalSpec(_Strict):
    batch_size: int = Field(32, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    # exact_match needs instruction data with references; perplexity works on any LM data.
    metric: Literal["auto", "exact_match", "perplexity", "accuracy"] = "auto"
    baseline: bool = True


class RunSpec(_Strict):
    model: str = "smollm2-135m"
    task: Literal["causal-lm", "classification", "text"] = "causal-lm"
    method: str = "lora"
    method_options: dict[str, Any] = Field(default_factory=dict)
    data: DataSpec = Field(default_factory=DataSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True


def parse_run_spec(raw: dict[str, Any]) -> RunSpec:
    """Validates a merged YAML+flags dict; errors become one ConfigError line naming the field."""
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"config field '{where}': {first['msg']} "
                          f"(got {first.get('input')!r})") from None
    # Fail on a wrong method name or option now, not after loading the model.
    make_config(spec.method, spec.method_options)
    return spec
