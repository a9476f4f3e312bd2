"""build_datasets, the entry point the CLI calls: config validation, deterministic split and
limits, each task end to end on small and real files, and the numbers in `info`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deltatune.data import (DataConfig, TextBlockEncoding, build_datasets, discover_label_names,
                            sample_records,
                            split_records)
from deltatune.data.templates import IGNORE_INDEX
from deltatune.errors import ConfigError, DataError


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def test_split_is_deterministic_disjoint_and_complete():
    records = [{"id": index} for index in range(100)]
    train, eval_records = split_records(records, 0.2, seed=3)
    assert (train, eval_records) == split_records(records, 0.2, seed=3)
    assert split_records(records, 0.2, seed=4)[1] != eval_records
    assert len(eval_records) == 20 and len(train) == 80
    ids = [record["id"] for record in train + eval_records]
    assert sorted(ids) == list(range(100))
    # Both parts keep file order.
    assert [r["id"] for r in train] == sorted(r["id"] for r in train)
    assert split_records(records, 0.0, seed=3) == (records, [])


def test_stratified_split_puts_every_label_in_both_parts():
    records = [{"label": "common"}] * 50 + [{"label": "rare"}] * 3
    train, eval_records = split_records(records, 0.1, seed=0, stratify="label")
    assert {r["label"] for r in train} == {r["label"] for r in eval_records} == {"common", "rare"}
    assert len(eval_records) == 5 + 1


def test_sample_records_is_seeded_and_ordered():
    records = [{"id": index} for index in range(50)]
    sample = sample_records(records, 10, seed=1)
    assert sample == sample_records(records, 10, seed=1)
    assert sample != records[:10] and len(sample) == 10
    assert [r["id"] for r in sample] == sorted(r["id"] for r in sample)
    assert sample_records(records, None, 1) is records


@pytest.mark.parametrize("options,message", [
    ({}, "exactly one of data.train"),
    ({"train": "a.jsonl", "builtin": "dates"}, "exactly one of data.train"),
    ({"builtin": "dates", "encoding": "classification"}, "use it with task causal-lm"),
    ({"builtin": "dates", "encoding": "seq2seq"}, "unknown task 'seq2seq'"),
    ({"builtin": "dates", "template": "vicuna"}, "unknown template 'vicuna'"),
    ({"builtin": "dates", "eval_fraction": 1.0}, "eval_fraction"),
    ({"builtin": "dates", "max_length": 1}, "max_length"),
    ({"builtin": "dates", "train_limit": 0}, "train_limit"),
    ({"builtin": "colors"}, "unknown built-in task"),
])
def test_config_errors(smollm2_tokenizer, options, message):
    encoding = options.pop("encoding", "causal-lm")
    with pytest.raises(ConfigError, match=message):
        build_datasets(DataConfig(**options), smollm2_tokenizer, encoding)


def test_builtin_dates_end_to_end(smollm2_tokenizer):
    config = DataConfig(builtin="dates", builtin_train_size=40, builtin_eval_size=8,
                        template="alpaca", max_length=128)
    data = build_datasets(config, smollm2_tokenizer, seed=5)
    again = build_datasets(config, smollm2_tokenizer, seed=5)
    assert data.train == again.train and data.eval == again.eval
    assert len(data.train) == 40 and len(data.eval) == 8
    example = data.eval[0]
    assert set(example) == {"input_ids", "labels", "prompt_ids", "reference"}
    assert smollm2_tokenizer.decode(example["input_ids"][len(example["prompt_ids"]):]) == \
        example["reference"] + "<|im_end|>"
    info = data.info
    assert info["train_examples"] == 40 and info["eval_examples"] == 8
    assert info["train_dropped"] == info["eval_dropped"] == 0
    with_loss = sum(label != IGNORE_INDEX for e in data.train for label in e["labels"])
    assert info["train_loss_token_fraction"] == round(with_loss / info["train_tokens"], 4)
    assert 0.1 < info["train_loss_token_fraction"] < 0.4
    assert info["train_mean_length"] == round(info["train_tokens"] / 40, 2)
    assert info["train_source"] == "builtin:dates" and info["template"] == "alpaca"


def test_instruction_file_split_limit_and_drops(smollm2_tokenizer, tmp_path):
    records = [{"instruction": f"Repeat {index}", "output": f"{index}"} for index in range(30)]
    records.append({"instruction": "word " * 200, "output": "never seen"})
    source = write_jsonl(tmp_path / "train.jsonl", records)
    config = DataConfig(train=source, eval_fraction=0.2, max_length=64)
    data = build_datasets(config, smollm2_tokenizer, seed=1)
    assert data.info["train_records"] + data.info["eval_records"] == 31
    assert data.info["eval_records"] == 6
    assert data.info["train_dropped"] + data.info["eval_dropped"] == 1
    assert len(data.train) + len(data.eval) == 30
    assert all(len(example["input_ids"]) <= 64 for example in data.train + data.eval)
    limited = build_datasets(DataConfig(train=source, train_limit=5, eval_limit=2),
                             smollm2_tokenizer, seed=1)
    assert limited.info["train_records"] == 5 and limited.info["eval_records"] == 2


def test_everything_truncated_is_an_error(smollm2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "word " * 50, "output": "x"}])
    with pytest.raises(DataError, match="no training examples are left .* raise max_length"):
        build_datasets(DataConfig(train=source, max_length=16, eval_fraction=0),
                       smollm2_tokenizer)


def test_missing_instruction_columns_are_reported(smollm2_tokenizer, tmp_path):
    source = write_jsonl(tmp_path / "train.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"record 1: .*has question, answer"):
        build_datasets(DataConfig(train=source, eval_fraction=0), smollm2_tokenizer)
    data = build_datasets(DataConfig(train=source, eval_fraction=0,
                                     columns={"instruction": "question", "output": "answer"}),
                          smollm2_tokenizer)
    assert data.train[0]["reference"] == "a" and data.eval == []


def test_placeholders_from_config(smollm2_tokenizer, shared_data):
    config = DataConfig(train=str(shared_data / "instruct" / "identity.json"),
                        placeholders={"name": "DeltaBot", "author": "Acme"}, max_length=256)
    data = build_datasets(config, smollm2_tokenizer)
    assert data.info["unfilled_placeholders"] == 0
    text = smollm2_tokenizer.decode(data.train[0]["input_ids"])
    assert "{{" not in text and ("DeltaBot" in text or "Acme" in text)
    unfilled = build_datasets(DataConfig(train=config.train, max_length=256), smollm2_tokenizer)
    assert unfilled.info["unfilled_placeholders"] > 80


def test_chat_template_on_alpaca_file(smollm2_tokenizer, shared_data):
    config = DataConfig(train=str(shared_data / "instruct" / "alpaca_en_demo.json"),
                        template="chat", max_length=256, train_limit=40, eval_limit=10)
    data = build_datasets(config, smollm2_tokenizer)
    assert data.info["train_boundary_fallbacks"] == 0
    for example in data.train:
        runs = [index for index, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
        assert runs and example["input_ids"][:len(example["prompt_ids"])] == example["prompt_ids"]
        # A single assistant turn: the loss covers one contiguous run right after the prompt.
        assert runs == list(range(len(example["prompt_ids"]), runs[-1] + 1))


def test_sst2_classification_with_different_eval_columns(minilm_tokenizer, shared_data):
    config = DataConfig(train=str(shared_data / "sst2" / "train.tsv"),
                        eval=str(shared_data / "sst2" / "dev.tsv"),
                        columns={"text": "sentence"}, eval_columns={"text": "content"},
                        max_length=64, train_limit=300, eval_limit=50)
    data = build_datasets(config, minilm_tokenizer, "classification")
    assert data.info["label_names"] == ["0", "1"] and data.info["num_labels"] == 2
    assert len(data.train) == 300 and len(data.eval) == 50
    assert {example["label"] for example in data.train} == {0, 1}
    example = data.eval[0]
    assert set(example) == {"input_ids", "token_type_ids", "label"}
    assert all(len(e["input_ids"]) <= 64 for e in data.train + data.eval)
    assert "train_loss_token_fraction" not in data.info
    with pytest.raises(DataError, match="columns present: label, content"):
        build_datasets(DataConfig(train=config.train, eval=config.eval, columns=config.columns),
                       minilm_tokenizer, "classification")


def test_trec_string_labels_and_stratified_split(minilm_tokenizer, shared_data):
    config = DataConfig(train=str(shared_data / "trec" / "train.tsv"),
                        max_length=32, eval_fraction=0.05)
    data = build_datasets(config, minilm_tokenizer, "classification", seed=2)
    assert data.info["label_names"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert {e["label"] for e in data.eval} == set(range(6))
    assert data.info["train_records"] + data.info["eval_records"] == 5322


def test_eval_label_unseen_in_train_is_an_error(minilm_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "pos"},
                                                   {"text": "b", "label": "neg"}])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"text": "c", "label": "neutral"}])
    with pytest.raises(DataError, match=r"eval.jsonl record 1: label 'neutral' is not one of"):
        build_datasets(DataConfig(train=train, eval=evaluation), minilm_tokenizer,
                       "classification")
    int_train = write_jsonl(tmp_path / "int_train.jsonl", [{"text": "a", "label": 0},
                                                           {"text": "b", "label": 2}])
    int_eval = write_jsonl(tmp_path / "int_eval.jsonl", [{"text": "c", "label": 1}])
    with pytest.raises(DataError, match=r"label 1 never occurs in the training data"):
        build_datasets(DataConfig(train=int_train, eval=int_eval), minilm_tokenizer,
                       "classification")
    data = build_datasets(DataConfig(train=int_train, eval=int_eval,
                                     label_names=["a", "b", "c"]), minilm_tokenizer,
                          "classification")
    assert data.eval[0]["label"] == 1


def test_missing_label_column(minilm_tokenizer, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "label": 1}])
    with pytest.raises(DataError, match=r"missing column\(s\) text; columns present: sentence, "
                                        r"label"):
        build_datasets(DataConfig(train=train), minilm_tokenizer, "classification")


def test_text_task_splits_documents_before_blocking(smollm2_tokenizer, shared_data):
    config = DataConfig(train=str(shared_data / "text" / "c4_demo.jsonl"),
                        max_length=128, train_limit=20, eval_limit=5, eval_fraction=0.1)
    data = build_datasets(config, smollm2_tokenizer, "text")
    assert data.info["train_records"] == 20 and data.info["eval_records"] == 5
    assert all(len(block["input_ids"]) <= 128 for block in data.train + data.eval)
    assert all(block["labels"] == block["input_ids"] for block in data.train)
    assert data.info["train_loss_token_fraction"] == 1.0
    assert build_datasets(config, smollm2_tokenizer, TextBlockEncoding()).train == data.train


def test_discover_label_names_matches_build_datasets(minilm_tokenizer, shared_data):
    config = DataConfig(train=str(shared_data / "trec" / "train.tsv"),
                        max_length=32, train_limit=200, eval_fraction=0.1)
    assert discover_label_names(config) == build_datasets(config, minilm_tokenizer,
                                                          "classification").info[
        "label_names"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    given = DataConfig(train="not-read.tsv", label_names=["b", "a"])
    assert discover_label_names(given) == ["b", "a"]
