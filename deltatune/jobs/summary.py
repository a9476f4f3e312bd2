"""What a training run reports: `RunSummary`, written as summary.json (its keys are the
file's schema, read by reports and comparisons)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class RunSummary:
    model: str
    method: str
    task: str
    baseline_metrics: dict[str, Any] | None
    final_metrics: dict[str, Any]
    best_metrics_during_training: dict[str, Any] | None
    trainable_parameters: int
    total_parameters: int
    trainable_percent: float
    steps: int
    stopped_early: bool
    # The step where the loss was first seen diverging (deltatune/train/divergence.py), or None.
    diverged_at_step: int | None
    train_input_tokens: int
    train_label_tokens: int
    train_wall_seconds: float
    train_tokens_per_second: float
    final_train_loss: float
    final_train_loss_terms: dict[str, float]
    peak_memory_bytes: int
    adapter_bytes: int
    resumed_from_step: int | None
    processes: int
    # Linear layers frozen in a number format (quant.model.QuantizedModelInfo), or None.
    quantization: dict[str, Any] | None
    # The frozen base's precision: requested, chosen and why (quant.precision.BaseDtypeChoice).
    base_dtype: dict[str, Any] | None
    data: dict[str, Any]
    finished_at: str
    # Task gain next to each retention change, the mitigations used and what they cost
    # (deltatune/jobs/forgetting.py); None for summaries written before it existed.
    forgetting: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def rounded(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    if metrics is None:
        return None
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
