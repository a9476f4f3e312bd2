"""The run directory every command writes: the resolved config, one metrics line per logged step
(metrics.jsonl), the final summary.json, checkpoints/ and the artifacts (adapter/). All writes
are atomic. In a distributed run only the main process writes: the others get a RunDirectory
with `writes=False`, whose writing methods do nothing. Listeners (experiment trackers,
deltatune/train/trackers.py) receive every metrics line exactly as it was written.

A run owns its folder from `start` on, and only then is anything written: `problem(overwrite)`
says beforehand (before the model loads) why a path cannot take a new run — a file is in the
way, or another run or other files are there; `start` replaces an old run only with
`overwrite`; `discard` removes the folder of a run that failed before it left anything worth
keeping (a checkpoint to resume from), so a failed command leaves nothing behind.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from deltatune.fileio import append_jsonl, write_json, write_text
from deltatune.train.checkpoint import CHECKPOINTS_FOLDER

CONFIG_NAME = "config.yaml"


class RunDirectory:
    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self.metrics_path = self.path / "metrics.jsonl"
        self.created = False  # this process made the folder (so may remove it on failure)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def problem(self, overwrite: bool = False) -> str | None:
        """Why a new run cannot start in this folder (None: it can)."""
        for parent in [self.path, *self.path.parents]:
            if parent.exists() and not parent.is_dir():
                return (f"output directory {self.path}: {parent} is a file, not a folder; "
                        "choose another --output-dir")
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return None
        if not (self.path / CONFIG_NAME).is_file():
            return (f"output directory {self.path} holds files that are not a deltatune run; "
                    "choose an empty or new --output-dir")
        if not overwrite:
            return (f"output directory {self.path} already holds a run; pass --overwrite to "
                    "replace it, --resume to continue it, or choose another --output-dir")
        return None

    def start(self, config: dict[str, Any], overwrite: bool = False) -> None:
        """Makes the folder this run's (replacing an old run with `overwrite`) and writes the
        config."""
        if not self.writes:
            return
        if overwrite and (self.path / CONFIG_NAME).is_file():
            shutil.rmtree(self.path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_config(config)

    def discard(self) -> bool:
        """Removes the folder of a failed run that this process created and that holds no
        checkpoint; True when removed."""
        if not (self.writes and self.created and self.path.is_dir()):
            return False
        checkpoints = self.path / CHECKPOINTS_FOLDER
        if checkpoints.is_dir() and any(checkpoints.iterdir()):
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        return True

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writes:
            self._ensure()
            write_text(self.path / CONFIG_NAME, yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        if self.writes:
            self._ensure()
            line = {"time": round(time.time(), 3), **record}
            append_jsonl(self.metrics_path, line)
            if self.listeners:
                # As read back from the file, so a listener sees exactly metrics.jsonl's values.
                written = json.loads(json.dumps(line, default=str))
                for listener in self.listeners:
                    listener(written)

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.writes:
            self._ensure()
            write_json(self.path / name, data)

    def _ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    def logged(self) -> list[dict[str, Any]]:
        """The metrics.jsonl records written so far."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def default_run_name(model: str, method: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    # Only [A-Za-z0-9._-]: a model id or path cannot steer the run out of runs/.
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{model}-{method}").replace("..", "_")
    return f"{stamp}-{safe}"
