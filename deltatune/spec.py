"""The run specification at the CLI/YAML boundary. Its sections are the library's own config
dataclasses — `data:` is `deltatune.data.DataConfig`, `train:` is
`deltatune.train.config.TrainConfig`, `eval:` is `deltatune.eval.config.EvalConfig` — so every
setting and its default exists once; pydantic checks what a user wrote (types, ranges, unknown
keys) here, once, and the library receives the plain dataclasses."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from deltatune.data import DataConfig
from deltatune.data.multitask import MultitaskConfig
from deltatune.errors import ConfigError
from deltatune.eval.config import EvalConfig
from deltatune.forgetting.config import ForgettingConfig
from deltatune.jobs.tasks import task_names
from deltatune.methods import make_config
from deltatune.train.config import TrainConfig

CONFIG_FILE = "config.yaml"


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    task: str = "causal-lm"
    method: str = "lora"
    method_options: dict[str, Any] = Field(default_factory=dict)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig)
    # Start from the weights of a finished run (its adapter merged in, or its full weights)
    # instead of the plain model: the second stage of sequential fine-tuning. A classifier's
    # head keeps that run's classes and adds the new data's.
    init_from: str | None = None
    # Several data sets in one run (deltatune/data/multitask.py); replaces `data:`'s files.
    multitask: MultitaskConfig | None = None
    # Freeze the base's linear layers in this deltatune.quant format ("nf4" for QLoRA); None: as
    # loaded (or the method's own, e.g. qlora's nf4).
    quantize: str | None = None
    # Precision of the frozen base: auto (bf16 where the CPU has it natively and it measures
    # faster), fp32 or bf16. Trainable weights and optimizer state are fp32 either way.
    base_dtype: str = "fp32"
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True

    @model_validator(mode="before")
    @classmethod
    def _paths_as_retain_sets(cls, raw: Any) -> Any:
        """`retain: [c4.jsonl]` and `replay: c4.jsonl` are short for `{path: c4.jsonl}`."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        for section, key, many in (("eval", "retain", True), ("forgetting", "replay", False),
                                   ("forgetting", "ewc_data", False)):
            values = raw.get(section)
            if not isinstance(values, dict) or values.get(key) is None:
                continue
            entry = values[key]
            values = dict(values)
            if many and isinstance(entry, list):
                values[key] = [{"path": e} if isinstance(e, str) else e for e in entry]
            elif not many and isinstance(entry, str):
                values[key] = {"path": entry}
            raw[section] = values
        return raw

    @field_validator("quantize")
    @classmethod
    def _known_format(cls, value: str | None) -> str | None:
        if value is not None:
            from deltatune.quant.formats import get_format
            try:
                get_format(value)
            except ConfigError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("base_dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        from deltatune.quant.precision import BASE_DTYPES
        if value not in BASE_DTYPES:
            raise ValueError(f"choose one of {', '.join(BASE_DTYPES)}")
        return value

    def quantization(self) -> str | None:
        """The format the base's linear layers are frozen in: asked for, or the method's own."""
        return self.quantize or make_config(self.method, self.method_options).base_quantization

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        if value not in task_names():
            raise ValueError(f"unknown task; choose one of {', '.join(task_names())}")
        return value


def parse_run_spec(raw: dict[str, Any]) -> RunSpec:
    """Validates a merged YAML+flags dict; errors become one ConfigError line naming the field."""
    try:
        spec = RunSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"config field '{where}': {first['msg']} "
                          f"(got {first.get('input')!r})") from None
    # Fail on a wrong method name or option now, not after loading the model.
    make_config(spec.method, spec.method_options)
    return spec


def read_run_spec(run_dir: str | Path) -> RunSpec:
    """The spec a run directory was trained with (its config.yaml)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE}); pass the "
                          "folder `deltatune train` wrote")
    damaged = "; the run folder is damaged: restore config.yaml or train again"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is not valid YAML ({yaml_problem(error)}){damaged}") from None
    if not isinstance(raw, dict) or not raw:
        what = "is empty" if raw is None or raw == {} else f"holds a {type(raw).__name__}"
        raise ConfigError(f"{path} {what}, not the run's settings{damaged}")
    try:
        return parse_run_spec(raw)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}{damaged}") from None


def read_config_mapping(path: str, label: str = "config file", hint: str = "") -> dict[str, Any]:
    """A YAML file of run settings as a dict ({} when empty), every problem one ConfigError:
    "<label> '<path>' does not exist", not valid YAML (where), or not a mapping; `hint` (the fix)
    follows a missing file."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{label} '{path}' does not exist{'; ' + hint if hint else ''}")
    try:
        loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{label} '{path}' is not valid YAML ({yaml_problem(error)})") \
            from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{label} '{path}' must hold a mapping at the top level")
    return loaded


def yaml_problem(error: Exception) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's text spans several lines)."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())
