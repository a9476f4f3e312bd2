"""The task protocol: a task kind (causal-LM instruction tuning, classification, plain text) is an
object that knows how its data is encoded, which model head it loads, whether its examples can be
packed, its objective, its evaluator and the extra files a run keeps. Job code asks the task and
never compares task names; a new kind is one file here plus one line in the registry
(deltatune/jobs/tasks/__init__.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from deltatune.data import DataConfig, DataEncoding
from deltatune.errors import ConfigError
from deltatune.eval.config import EvalConfig
from deltatune.methods.base import MethodConfig
from deltatune.train.objectives import LossTerm, Objective

Evaluate = Callable[[], dict[str, Any]]


class Task:
    name: ClassVar[str] = ""
    # What `deltatune.models.load_model` builds: "causal-lm" (LM head) or "classification".
    model_kind: ClassVar[str] = "causal-lm"
    encoding: ClassVar[DataEncoding]
    # Several examples may share a packed row (the method and the model must allow it too).
    packs: ClassVar[bool] = False
    # Packed rows need the model to pool each example (deltatune.train.packed_classification).
    pools_packed_rows: ClassVar[bool] = False
    # The objective's loss may be fused with the output head (deltatune.models.fused_loss).
    fuses_loss: ClassVar[bool] = False
    # The model is a language model: it generates text and has a perplexity on plain text
    # (what `deltatune quantize` measures); otherwise quality is the task's own evaluator.
    models_language: ClassVar[bool] = True
    # Names of the head modules this task adds freshly initialised (task-specific: forgetting
    # penalties leave them out).
    new_head_names: ClassVar[tuple[str, ...]] = ()

    def resolve_data(self, data: DataConfig) -> DataConfig:
        """The data config to use: a task may supply defaults (a built-in data set)."""
        return data

    def head_labels(self, data: DataConfig, seed: int) -> list[str] | None:
        """Class names the new head needs before the model is loaded (None: no new head)."""
        return None

    def model_can_pack(self, model: Any) -> bool:
        """Whether this model computes the task exactly on packed rows."""
        return True

    def adjust_method(self, config: MethodConfig, model: Any, options: dict[str, Any]) -> None:
        """Changes the method config for this task (e.g. train a new head), unless the user's
        `options` already decided."""

    def objective(self, terms: Sequence[LossTerm] = ()) -> Objective:
        raise NotImplementedError

    def evaluator(self, loaded: Any, examples: list[dict], info: dict[str, Any],
                  config: EvalConfig, progress: bool) -> Evaluate:
        raise NotImplementedError

    def save_artifacts(self, run: Any, info: dict[str, Any]) -> None:
        """Files beside the adapter that reloading the run needs (labels.json, ...)."""

    def saved_labels(self, run_dir: Path) -> list[str] | None:
        """The class names a trained run's head was built with (None: no new head)."""
        return None


def require_training_file(task_name: str, data: DataConfig) -> DataConfig:
    """`resolve_data` of the tasks whose data only files provide (the built-in sets are
    instruction data)."""
    if data.builtin:
        raise ConfigError(f"built-in task {data.builtin!r} is instruction data for task "
                          f"causal-lm; task '{task_name}' needs --train PATH instead (drop "
                          "--builtin, or use --task causal-lm)")
    if not data.train:
        raise ConfigError(f"task '{task_name}' needs training data: pass --train PATH")
    return data
