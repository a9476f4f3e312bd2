"""Sequence classification: an encoder (or decoder) with a new classification head, trained with
cross-entropy and evaluated by accuracy / macro-F1. Training packs the sentences of a batch into
one row when the model pools each of them exactly (deltatune.train.packed_classification; checked
on a probe), and pads them otherwise. The head's size comes from
the class names found in the training data (after the same split and limits the data set uses),
and the head trains with any method (it joins `modules_to_save`). The class names are saved as
labels.json beside the adapter."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from deltatune.data import ClassificationEncoding, DataConfig, discover_label_names
from deltatune.errors import AdapterFormatError, ConfigError
from deltatune.eval.config import EvalConfig
from deltatune.eval.evaluate import evaluate_classification
from deltatune.jobs.tasks.base import Evaluate, Task, require_training_file
from deltatune.methods.base import MethodConfig
from deltatune.train.objectives import ClassificationObjective, LossTerm, Objective
from deltatune.train.packed_classification import can_pack_classification

# Names of a freshly initialised task head, per architecture family (BERT-style `classifier`,
# decoder `score`).
HEAD_NAMES = ("classifier", "score")
LABELS_FILE = "labels.json"


class ClassificationTask(Task):
    name = "classification"
    model_kind = "classification"
    models_language = False
    new_head_names = HEAD_NAMES
    encoding = ClassificationEncoding()
    packs = True
    pools_packed_rows = True

    def resolve_data(self, data: DataConfig) -> DataConfig:
        return require_training_file(self.name, data)

    def head_labels(self, data: DataConfig, seed: int) -> list[str]:
        return discover_label_names(data, seed)

    def model_can_pack(self, model: Any) -> bool:
        return can_pack_classification(model)

    def adjust_method(self, config: MethodConfig, model: Any, options: dict[str, Any]) -> None:
        if "modules_to_save" not in options:
            children = dict(model.named_children())
            config.modules_to_save = [n for n in HEAD_NAMES if n in children]

    def objective(self, terms: Sequence[LossTerm] = ()) -> Objective:
        return ClassificationObjective(terms)

    def evaluator(self, loaded: Any, examples: list[dict], info: dict[str, Any],
                  config: EvalConfig, progress: bool) -> Evaluate:
        if config.metric not in ("auto", "accuracy"):
            raise ConfigError(f"metric {config.metric} is for language models; classification "
                              "reports accuracy and macro_f1")
        num_classes = len(info.get("label_names") or [])
        pad = loaded.tokenizer.pad_token_id
        return lambda: evaluate_classification(loaded.model, examples, num_classes, pad,
                                               config.batch_size, progress)

    def save_artifacts(self, run: Any, info: dict[str, Any]) -> None:
        run.write_json(LABELS_FILE, {"label_names": info["label_names"]})

    def saved_labels(self, run_dir: Path) -> list[str]:
        path = Path(run_dir) / LABELS_FILE
        if not path.is_file():
            raise AdapterFormatError(f"{run_dir} has no {LABELS_FILE}; a classification run "
                                     "written by `deltatune train` keeps its class names there")
        try:
            names = json.loads(path.read_text(encoding="utf-8")).get("label_names")
        except (ValueError, AttributeError):  # invalid JSON, or JSON that is not an object
            names = None
        if not (isinstance(names, list) and names
                and all(isinstance(name, str) for name in names)):
            raise AdapterFormatError(f"{path} must be a JSON object like "
                                     '{"label_names": ["negative", "positive"]} (the class '
                                     "names in head order); restore it or train again")
        return names
