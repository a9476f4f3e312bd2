"""The run directory every command writes: the resolved config, one metrics line per logged step
(metrics.jsonl), the final summary.json, checkpoints/ and the artifacts (adapter/). All writes
are atomic. In a distributed run only the main process writes: the others get a RunDirectory
with `writes=False`, whose writing methods do nothing."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml

from deltatune.fileio import append_jsonl, write_json, write_text


class RunDirectory:
    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        if writes:
            self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writes:
            write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        if self.writes:
            append_jsonl(self.metrics_path, {"time": round(time.time(), 3), **record})

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        if self.writes:
            write_json(self.path / name, data)

    def logged(self) -> list[dict[str, Any]]:
        """The metrics.jsonl records written so far."""
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def default_run_name(model: str, method: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{model.replace('/', '_')}-{method}"
