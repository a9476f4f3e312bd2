"""Resumable training checkpoints, written without pickles.

A checkpoint is a folder `checkpoints/step-000040/` in the run directory holding everything the
loop needs to continue as if it had never stopped: the trainable state, the optimizer and
scheduler state, the Python / NumPy / torch random states, the data position and counters, and
each callback's own state (early stopping's best adapter, the metrics log's length). Tensors go
to `tensors.safetensors`; the structure around them (nested dicts, lists, tuples, numbers) to
`state.json`, with `{"__tensor__": key}` where a tensor was. The folder is built under a
temporary name and renamed into place, so a reader (or a resume after `kill -9`) only ever sees
complete checkpoints; older ones are deleted after the new one is in place.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from deltatune.errors import ConfigError
from deltatune.fileio import write_json, write_safetensors

FORMAT_VERSION = 1
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"
CHECKPOINTS_FOLDER = "checkpoints"


def capture_checkpoint(state: Any, callbacks: Sequence[Any]) -> dict[str, Any]:
    """Everything a checkpoint holds, taken at a step boundary (see the module docstring)."""
    return {
        "format": FORMAT_VERSION,
        "counters": state.counters(),
        "trainable": {k: v.detach() for k, v in state.target.state_dict().items()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "callbacks": {_callback_key(i, c): c.state_dict() for i, c in enumerate(callbacks)},
        "random": random_states(),
    }


def write_checkpoint(run_path: str | Path, captured: dict[str, Any], keep: int = 1) -> Path:
    """Writes `captured` as `checkpoints/step-NNNNNN/` atomically; keeps the newest `keep`."""
    root = Path(run_path) / CHECKPOINTS_FOLDER
    final = root / f"step-{captured['counters']['step']:06d}"
    staging = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(captured, tensors, "")
    write_safetensors(staging / TENSORS_FILE, tensors)
    write_json(staging / STATE_FILE, structure)
    _fsync_folder(staging)
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)
    for old in complete_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_path: str | Path) -> list[Path]:
    """Finished checkpoint folders of a run, oldest first (temporary folders are ignored)."""
    root = Path(run_path) / CHECKPOINTS_FOLDER
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file())


def latest_checkpoint(run_path: str | Path) -> Path:
    found = complete_checkpoints(run_path)
    if not found:
        raise ConfigError(f"'{run_path}' has no checkpoint to resume from (checkpoints/step-*); "
                          "train with --save-every N, or interrupt with Ctrl-C, to write one")
    return found[-1]


class Checkpoint:
    """A checkpoint read back; the loop calls `restore_training` after building its optimizer
    and `restore_random_state` right before the first step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        structure = json.loads((self.path / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(self.path / TENSORS_FILE))
        self.data = _decode(structure, tensors)
        if self.data.get("format") != FORMAT_VERSION:
            raise ConfigError(f"checkpoint {self.path} has format {self.data.get('format')}, this "
                              f"deltatune reads format {FORMAT_VERSION}")

    @property
    def step(self) -> int:
        return int(self.data["counters"]["step"])

    def restore_training(self, state: Any, callbacks: Sequence[Any]) -> None:
        state.target.load_state_dict(self.data["trainable"])
        state.optimizer.load_state_dict(self.data["optimizer"])
        state.scheduler.load_state_dict(self.data["scheduler"])
        state.load_counters(self.data["counters"])
        state.learning_rate = state.scheduler.get_last_lr()[0]
        saved = self.data["callbacks"]
        for index, callback in enumerate(callbacks):
            key = _callback_key(index, callback)
            if key in saved:
                callback.load_state_dict(saved[key])

    def restore_random_state(self) -> None:
        set_random_states(self.data["random"])


# -- random states ---------------------------------------------------------------------------

def random_states() -> dict[str, Any]:
    states: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- nested structure <-> JSON + tensors -----------------------------------------------------

def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu()
        return {"__tensor__": path}
    if isinstance(value, np.ndarray):
        tensors[path] = torch.from_numpy(value.copy())
        return {"__numpy__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(f"cannot store {type(value).__name__} at '{path}' in a checkpoint")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__numpy__" in value:
            return tensors[value["__numpy__"]].numpy()
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__items__" in value:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        return {k: _decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    return value


def _callback_key(index: int, callback: Any) -> str:
    return f"{index}:{type(callback).__name__}"


def _fsync_folder(folder: Path) -> None:
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
