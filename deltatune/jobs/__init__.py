"""Composition: a run spec becomes a Task and a prepared Job (model + method + data), the loop
trains it, and a run summary comes out; inference requests load a trained run back.
`run_training(spec)` is what `deltatune train` calls. Names load lazily, so `deltatune.spec` can
ask `deltatune.jobs.tasks` for the task names without importing the rest."""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Job": "deltatune.jobs.preparation", "prepare": "deltatune.jobs.preparation",
    "run_training": "deltatune.jobs.run", "RunSummary": "deltatune.jobs.summary",
    "EvalRequest": "deltatune.jobs.inference", "GenerateRequest": "deltatune.jobs.inference",
    "evaluate_saved": "deltatune.jobs.inference", "generate_text": "deltatune.jobs.inference",
    "load_for_inference": "deltatune.jobs.inference",
    "ExportRequest": "deltatune.jobs.export", "export_merged": "deltatune.jobs.export",
    "QuantizeRequest": "deltatune.jobs.quantize", "quantize_saved": "deltatune.jobs.quantize",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deltatune.jobs' has no attribute '{name}'")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = list(_EXPORTS)
