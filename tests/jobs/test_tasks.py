"""Task objects and job preparation: each task kind answers for its data encoding, head, packing,
objective and evaluator; the classification head is sized from the labels the training data
really has after --train-limit (the same names labels.json records)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.data import ClassificationEncoding, InstructionEncoding, TextBlockEncoding
from deltatune.errors import ConfigError
from deltatune.jobs import prepare, run_training
from deltatune.jobs.tasks import get_task, task_names
from deltatune.spec import parse_run_spec
from deltatune.train.objectives import CausalLMObjective, ClassificationObjective
from tests.conftest import tiny_bert
from tests.models.test_loading import WORDS, bert_tokenizer


def test_registry_and_capabilities():
    assert task_names() == ["causal-lm", "classification", "text"]
    causal, classification, text = (get_task(name) for name in task_names())
    assert isinstance(causal.encoding, InstructionEncoding) and causal.packs and causal.fuses_loss
    assert isinstance(text.encoding, TextBlockEncoding) and text.packs
    assert isinstance(classification.encoding, ClassificationEncoding)
    assert classification.packs and classification.pools_packed_rows
    assert not classification.fuses_loss and not causal.pools_packed_rows
    assert classification.model_kind == "classification"
    assert isinstance(causal.objective(), CausalLMObjective)
    assert isinstance(classification.objective(), ClassificationObjective)
    with pytest.raises(ConfigError, match="unknown task 'seq2seq'"):
        get_task("seq2seq")


def test_data_defaults_belong_to_the_task():
    from deltatune.data import DataConfig

    assert get_task("causal-lm").resolve_data(DataConfig()).builtin == "dates"
    for name in ("classification", "text"):
        with pytest.raises(ConfigError, match=f"task '{name}' needs training data"):
            get_task(name).resolve_data(DataConfig())


@pytest.fixture
def bert_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-bert"
    tiny_bert(num_labels=2).bert.save_pretrained(folder)
    bert_tokenizer(tmp_path).save_pretrained(folder)
    return folder


def _labelled_files(tmp_path: Path) -> tuple[Path, Path]:
    """40 rows labelled a/b, then 10 rows labelled c: --train-limit 30 must see two classes.
    The eval file has a and b only."""
    rows = [f"{WORDS[i]} {WORDS[i + 1]}\t{'ab'[i % 2]}" for i in range(40)]
    rows += [f"{WORDS[i]} {WORDS[i + 2]}\tc" for i in range(10)]
    train, evaluation = tmp_path / "train.tsv", tmp_path / "eval.tsv"
    train.write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    evaluation.write_text("text\tlabel\n" + "\n".join(rows[:8]) + "\n")
    return train, evaluation


def test_head_size_and_labels_json_honour_train_limit(bert_folder, tmp_path):
    train, evaluation = _labelled_files(tmp_path)
    base = {"model": str(bert_folder), "task": "classification", "progress": False,
            "data": {"train": str(train), "eval": str(evaluation), "max_length": 16},
            "train": {"max_steps": 1, "batch_size": 8},
            "method_options": {"r": 2, "targets": ["query", "value"]}}
    limited = parse_run_spec({**base, "output_dir": str(tmp_path / "limited"),
                              "data": {**base["data"], "train_limit": 30}})
    job = prepare(limited)
    assert job.packs  # a BERT head reads [CLS]: sentences are packed for training
    assert job.loaded.model.classifier.out_features == 2
    assert job.data_info["label_names"] == ["a", "b"]
    summary = run_training(limited)
    labels = json.loads((tmp_path / "limited" / "labels.json").read_text())["label_names"]
    assert labels == ["a", "b"] and summary.trainable_parameters > 0
    everything = prepare(parse_run_spec({**base, "output_dir": str(tmp_path / "all")}))
    assert everything.loaded.model.classifier.out_features == 3
