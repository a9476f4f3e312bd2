"""Sequential fine-tuning (task A, then task B, ...) as one job: the continual-learning experiment
in one command with one report. Every stage is an ordinary run (a YAML run config, or a finished
run directory to start from) written under one folder; stage k starts from stage k-1's weights
(`init_from`), is evaluated on every earlier stage's eval data as retain sets (accuracy among
each task's own classes, or perplexity), and uses the requested mitigations with the earlier
stages' training data: replay mixes it in, EWC estimates its Fisher on it, L2-SP and KL anchor at
the weights stage k starts from. A stage whose folder already holds a finished run with the same
settings is not trained again, so an interrupted sequence continues where it stopped and
variants can share their first stage. The report is the accuracy matrix: after each stage, the
metric on every task seen so far.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltatune.errors import ConfigError
from deltatune.fileio import write_json, write_text
from deltatune.jobs.sources import is_run_directory
from deltatune.spec import CONFIG_FILE, RunSpec, parse_run_spec, read_run_spec

SUMMARY_FILE = "sequence_summary.json"
# An earlier stage's eval file is measured whole (unless its config limits it), not the first
# RETENTION_EVAL_LIMIT examples a retain set defaults to.
WHOLE_FILE = 1_000_000
REPORT_FILE = "report.md"


@dataclass
class SequentialRequest:
    """`stages`: YAML run configs or finished run directories, in training order. `mitigation`:
    forgetting settings for every stage after the first (kl_weight, ewc_weight, l2sp_weight,
    replay_fraction: replay the earlier stages' training data; ewc_batches)."""
    stages: list[str]
    out: str
    mitigation: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True
    trust_remote_code: bool = False


@dataclass
class Stage:
    name: str
    spec: RunSpec
    path: Path
    given_run: bool = False


def run_sequential(request: SequentialRequest) -> dict[str, Any]:
    from deltatune.jobs.run import run_training
    if len(request.stages) < 2:
        raise ConfigError("sequential fine-tuning needs at least two stages: --stage A.yaml "
                          "--stage B.yaml")
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    finished: list[Stage] = []
    for index, source in enumerate(request.stages):
        stage = _stage(index, source, finished, request, out)
        if not stage.given_run and not _already_trained(stage):
            print(f"stage {index + 1}/{len(request.stages)}: {stage.name} -> {stage.path}",
                  flush=True)
            run_training(stage.spec, overwrite=request.overwrite,
                         trust_remote_code=request.trust_remote_code)
        finished.append(stage)
    summary = _matrix(finished, request)
    write_json(out / SUMMARY_FILE, summary)
    write_text(out / REPORT_FILE, _markdown(summary))
    return summary


def _stage(index: int, source: str, earlier: list[Stage], request: SequentialRequest,
           out: Path) -> Stage:
    if is_run_directory(source):
        if index > 0:
            raise ConfigError(f"stage {index + 1}: {source} is a run directory; only the first "
                              "stage may be a finished run, the later ones are YAML configs")
        if not (Path(source) / "summary.json").is_file():
            raise ConfigError(f"stage 1: run {source} has not finished (no summary.json)")
        spec = read_run_spec(source)
        return Stage(_task_name(spec, source), spec, Path(source), given_run=True)
    raw = _read_config(source)
    name = Path(source).stem
    raw["output_dir"] = str(out / f"{index + 1:02d}-{name}")
    raw["progress"] = request.progress
    if earlier:
        _continue_from(raw, earlier, request.mitigation)
    spec = parse_run_spec(raw)
    if index < len(request.stages) - 1 and not spec.data.eval:
        raise ConfigError(f"stage {index + 1} ({source}) needs its own eval file (data.eval): "
                          "the later stages measure what they forget on it")
    return Stage(name, spec, Path(raw["output_dir"]))


def _read_config(source: str) -> dict[str, Any]:
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"stage config '{source}' not found; give a YAML run config (see "
                          "examples/) or, for the first stage, a finished run directory")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"stage config '{source}' must hold a mapping at the top level")
    return raw


def _task_name(spec: RunSpec, source: str) -> str:
    data = spec.data.eval or spec.data.train or spec.data.builtin or source
    return Path(str(data)).parent.name or Path(source).name


def _continue_from(raw: dict[str, Any], earlier: list[Stage], mitigation: dict[str, Any]) -> None:
    """Stage k's settings: start from stage k-1, measure every earlier task, mitigate with the
    earlier stages' training data."""
    raw["init_from"] = str(earlier[-1].path)
    evaluation = raw.setdefault("eval", {})
    evaluation["retain"] = list(evaluation.get("retain") or []) + [
        _retain_entry(stage, "eval") for stage in earlier]
    forgetting = dict(raw.get("forgetting") or {})
    for key in ("kl_weight", "ewc_weight", "l2sp_weight", "ewc_batches", "kl_temperature"):
        if mitigation.get(key) is not None:
            forgetting[key] = mitigation[key]
    if mitigation.get("replay_fraction"):
        forgetting["replay"] = _retain_entry(earlier[-1], "train")
        forgetting["replay_fraction"] = mitigation["replay_fraction"]
    if forgetting.get("ewc_weight") and not forgetting.get("ewc_data"):
        forgetting["ewc_data"] = _retain_entry(earlier[-1], "train")
    raw["forgetting"] = forgetting


def _retain_entry(stage: Stage, split: str) -> dict[str, Any]:
    data = stage.spec.data
    path = data.eval if split == "eval" else data.train
    if path is None:
        raise ConfigError(f"stage {stage.name} has no {split} file to measure or replay; give "
                          f"its config data.{split}")
    columns = (data.eval_columns or data.columns) if split == "eval" else data.columns
    limit = data.eval_limit if split == "eval" else data.train_limit
    return {"path": path, "name": stage.name, "columns": dict(columns), "header": data.header,
            "template": data.template, "limit": limit or WHOLE_FILE}


def _already_trained(stage: Stage) -> bool:
    """A finished run in the stage's folder, trained with exactly these settings."""
    summary, config = stage.path / "summary.json", stage.path / CONFIG_FILE
    if not (summary.is_file() and config.is_file()):
        return False
    return read_run_spec(stage.path).model_dump() == stage.spec.model_dump()


def _matrix(stages: list[Stage], request: SequentialRequest) -> dict[str, Any]:
    """After stage i, the metric on task j <= i: its own eval metric for j = i, the retain
    metric measured on task j's eval data otherwise."""
    rows = []
    for index, stage in enumerate(stages):
        summary = json.loads((stage.path / "summary.json").read_text(encoding="utf-8"))
        final = summary["final_metrics"]
        row = {"after": stage.name, "run": str(stage.path), "metrics": {}}
        for earlier in stages[:index]:
            row["metrics"][earlier.name] = _retain_metric(final, earlier.name)
        row["metrics"][stage.name] = _own_metric(final)
        rows.append(row)
    first, last = stages[0].name, rows[-1]["metrics"]
    return {"stages": [s.name for s in stages], "mitigation": request.mitigation, "rows": rows,
            "first_task_before": rows[0]["metrics"][first], "first_task_after": last[first],
            "forgetting_of_first_task": round(rows[0]["metrics"][first] - last[first], 6)}


def _own_metric(final: dict[str, Any]) -> float:
    for name in ("accuracy", "exact_match", "perplexity"):
        if name in final:
            return final[name]
    raise ConfigError("a stage's summary has no accuracy, exact_match or perplexity")


def _retain_metric(final: dict[str, Any], name: str) -> float:
    for suffix in ("accuracy", "perplexity"):
        key = f"retain_{name}_{suffix}"
        if key in final:
            return final[key]
    raise ConfigError(f"the later stage's summary has no retain metric for task {name}")


def _markdown(summary: dict[str, Any]) -> str:
    names = summary["stages"]
    lines = ["| after stage | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for row in summary["rows"]:
        cells = [f"{row['metrics'][n]:.4f}" if n in row["metrics"] else "" for n in names]
        lines.append(f"| {row['after']} | " + " | ".join(cells) + " |")
    mitigation = ", ".join(f"{k}={v}" for k, v in summary["mitigation"].items() if v) or "none"
    return (f"# Sequential fine-tuning: {' -> '.join(names)}\n\nMitigation: {mitigation}.\n\n"
            + "\n".join(lines) + f"\n\nForgetting of {names[0]}: "
            f"{summary['forgetting_of_first_task']:+.4f} ({summary['first_task_before']:.4f} -> "
            f"{summary['first_task_after']:.4f}).\n")
