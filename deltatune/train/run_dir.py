"""The run directory every command writes: the resolved config, one metrics line per logged step
(metrics.jsonl), the final summary.json and the artifacts (adapter/). All writes are atomic."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from deltatune.fileio import append_jsonl, write_json, write_text


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    @property
    def adapter_path(self) -> Path:
        return self.path / "adapter"

    def write_config(self, config: dict[str, Any]) -> None:
        write_text(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))

    def log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, {"time": round(time.time(), 3), **record})

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / "summary.json", summary)

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        write_json(self.path / name, data)


def default_run_name(model: str, method: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{model.replace('/', '_')}-{method}"
