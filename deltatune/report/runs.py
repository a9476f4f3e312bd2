"""Reading finished run directories for reports: each run's summary.json (the schema of
`deltatune.jobs.summary.RunSummary`), its config.yaml (read as plain YAML: the report never
loads the library's training code) and its metrics.jsonl (loss curve, evaluations). A comparison
directory (`deltatune compare --out DIR`) names its variants in comparison.json; any other folder
is searched one level down for run directories. Unfinished runs are listed, not reported."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from deltatune.errors import ConfigError

COMPARISON_FILE = "comparison.json"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"


@dataclass
class RunRecord:
    """One finished run as a report sees it."""
    name: str
    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]
    # (optimizer step, training loss) from metrics.jsonl, in logged order.
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def method(self) -> str:
        return str(self.summary.get("method") or self.config.get("method") or "?")

    @property
    def learning_rate(self) -> float | None:
        value = (self.config.get("train") or {}).get("learning_rate")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def method_options(self) -> dict[str, Any]:
        return dict(self.config.get("method_options") or {})

    def number(self, key: str) -> float | None:
        value = self.summary.get(key)
        return float(value) if isinstance(value, (int, float)) else None


@dataclass
class RunCollection:
    runs: list[RunRecord]
    # Folders that hold a run which has not finished (no summary.json), skipped.
    unfinished: list[Path] = field(default_factory=list)
    # The CPU/GPU a comparison directory says its runs were measured on, if it says.
    machine: str | None = None


def is_run_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def read_run(path: str | Path, name: str | None = None) -> RunRecord:
    """A finished run directory; `name` defaults to the folder's name."""
    path = Path(path)
    summary_path = path / SUMMARY_FILE
    if not summary_path.is_file():
        raise ConfigError(f"run {path} has not finished (no {SUMMARY_FILE}); finish it with "
                          f"`deltatune train --resume {path}` or leave it out")
    summary = _read_json_object(summary_path)
    config = _read_config(path / CONFIG_FILE)
    return RunRecord(name or path.name, path, summary, config, _losses(path / METRICS_FILE))


def collect_runs(sources: Iterable[str | Path]) -> RunCollection:
    """Every finished run named by `sources`: run directories, comparison directories, or
    folders holding run directories (one level down, or under runs/)."""
    collection = RunCollection([])
    for source in sources:
        folder = Path(source)
        if not folder.is_dir():
            raise ConfigError(f"'{source}' is not a folder; pass run directories written by "
                              "`deltatune train` or a `deltatune compare --out` folder")
        if (folder / COMPARISON_FILE).is_file():
            collection.machine = _read_json_object(folder / COMPARISON_FILE).get("machine")
        for name, run_path in _runs_in(folder):
            if (run_path / SUMMARY_FILE).is_file():
                collection.runs.append(read_run(run_path, name))
            else:
                collection.unfinished.append(run_path)
    if not collection.runs:
        unfinished = f" ({len(collection.unfinished)} unfinished)" if collection.unfinished else ""
        raise ConfigError(f"no finished run found in {', '.join(map(str, sources))}{unfinished}; "
                          "pass run directories that hold summary.json")
    _make_names_unique(collection.runs)
    return collection


def _runs_in(folder: Path) -> list[tuple[str | None, Path]]:
    if is_run_folder(folder):
        return [(None, folder)]
    comparison = folder / COMPARISON_FILE
    if comparison.is_file():
        variants = _read_json_object(comparison).get("variants") or []
        return [(v["name"], folder / v["run"]) for v in variants
                if isinstance(v, dict) and "name" in v and "run" in v]
    found = [(None, child) for parent in (folder, folder / "runs") if parent.is_dir()
             for child in sorted(parent.iterdir()) if child.is_dir() and is_run_folder(child)]
    if not found:
        raise ConfigError(f"'{folder}' holds no run directory (a folder with {CONFIG_FILE}); "
                          "pass the folders `deltatune train` or `deltatune compare` wrote")
    return found


def _make_names_unique(runs: list[RunRecord]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); the folder is damaged: train "
                          "that run again or leave it out") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object; the folder "
                          "is damaged: train that run again or leave it out")
    return data


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise ConfigError(f"{path} is not valid YAML; the run folder is damaged: restore "
                          "config.yaml or train again") from None
    return data if isinstance(data, dict) else {}


def _losses(path: Path) -> list[tuple[int, float]]:
    """Training-loss points; a torn or foreign line is skipped (the log is append-only)."""
    if not path.is_file():
        return []
    points: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)) \
                and isinstance(record.get("step"), int):
            # A resumed run may log a step again: the later line is the one that counts.
            points[record["step"]] = float(record["loss"])
    return sorted(points.items())
