"""`init_from`: a run that starts from the weights of a finished run instead of the plain model —
the second stage of sequential fine-tuning (task A, then task B). The earlier run is loaded dense
(its adapter merged in, or its full weights) and copied into the freshly loaded model before the
new method is applied, so any method can follow any other. A classifier's head grows: it holds
the earlier run's classes first, in their order, then the new data's new ones, and the rows of
the earlier classes keep their trained weights (the new rows keep their fresh initialisation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune.errors import ConfigError
from deltatune.spec import RunSpec, read_run_spec


def check_starting_run(spec: RunSpec) -> RunSpec:
    """The earlier run's spec, after checking it can be a starting point for `spec`."""
    path = Path(spec.init_from)
    earlier = read_run_spec(path)
    if not (path / "summary.json").is_file():
        raise ConfigError(f"init_from {path}: the run has not finished (no summary.json); "
                          "finish or resume it first")
    if earlier.task != spec.task:
        raise ConfigError(f"init_from {path} was trained for task '{earlier.task}' and this run "
                          f"is '{spec.task}'; start from a run of the same task kind")
    if earlier.model != spec.model:
        raise ConfigError(f"init_from {path} fine-tuned model '{earlier.model}' and this run "
                          f"names '{spec.model}'; set --model {earlier.model}")
    if spec.quantization():
        raise ConfigError("init_from with a quantized base (qlora, --quantize) is not supported: "
                          "the earlier run's weights are dense; quantize after merging instead")
    return earlier


def grown_label_names(earlier: list[str] | None, new: list[str] | None) -> list[str] | None:
    """The earlier run's classes first (their head rows are kept), then the new ones."""
    if earlier is None or new is None:
        return new
    return list(earlier) + [name for name in new if name not in earlier]


def earlier_label_names(task: Any, spec: RunSpec) -> list[str] | None:
    return task.saved_labels(Path(spec.init_from)) if spec.init_from else None


def load_starting_weights(model: torch.nn.Module, init_from: str,
                          trust_remote_code: bool = False) -> dict[str, Any]:
    """Copies the earlier run's dense weights into `model` in place; returns what was copied."""
    from deltatune.jobs.sources import load_dense_source
    source = load_dense_source(init_from, trust_remote_code=trust_remote_code)
    theirs = source.loaded.model.state_dict()
    ours = model.state_dict()
    missing = sorted(set(ours) - set(theirs))
    if missing:
        raise ConfigError(f"init_from {init_from}: its model lacks {missing[:3]}; start from a "
                          "run of the same architecture")
    grown = []
    with torch.no_grad():
        for name, target in ours.items():
            weights = theirs[name].to(target.dtype)
            if weights.shape == target.shape:
                target.copy_(weights)
            elif _grown_rows(weights, target):
                target[:weights.shape[0]].copy_(weights)
                grown.append(name)
            else:
                raise ConfigError(f"init_from {init_from}: {name} has shape "
                                  f"{tuple(weights.shape)} there and {tuple(target.shape)} here; "
                                  "start from a run of the same architecture")
    del source
    return {"init_from": str(init_from), "grown_head_tensors": grown}


def _grown_rows(earlier: torch.Tensor, target: torch.Tensor) -> bool:
    return (earlier.dim() == target.dim() and earlier.dim() >= 1
            and earlier.shape[1:] == target.shape[1:] and earlier.shape[0] < target.shape[0])
