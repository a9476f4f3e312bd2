"""Composition: a run spec becomes a Task and a prepared Job (model + method + data), the loop
trains it, and a run summary comes out; inference requests load a trained run back.
`run_training(spec)` is what `deltatune train` calls."""
from deltatune.jobs.inference import (EvalRequest, GenerateRequest, evaluate_saved, generate_text,
                                      load_for_inference)
from deltatune.jobs.prepare import Job, prepare
from deltatune.jobs.run import run_training
from deltatune.jobs.summary import RunSummary

__all__ = ["Job", "prepare", "run_training", "RunSummary", "EvalRequest", "GenerateRequest",
           "evaluate_saved", "generate_text", "load_for_inference"]
