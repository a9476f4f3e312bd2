"""The one entry point from config to training data: `build_datasets(DataConfig, tokenizer,
encoding)` reads the records (files, a Hugging Face dataset or a built-in task), splits off an
evaluation set when no eval file is given, applies limits, encodes them and describes the result
in `info` (counts, drops, lengths, share of tokens with loss, label names).

How records become examples is a `DataEncoding`: instruction data (loss on responses), sequence
classification, or plain-text blocks. A task kind (deltatune/jobs/tasks/) names its encoding;
`ENCODINGS` maps the task names for callers that only have a name.

Splitting and limiting are deterministic from `seed`: the split shuffles record indices with
`random.Random(seed)` (per label for classification, so rare classes land in both sets; a label
with one record stays in training) and a limit keeps the first N records (use `sample_records` for
a seeded random subset). A split of two or more records always leaves at least one on each side.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from deltatune.data.builtin import BUILTIN_TASKS, builtin_task
from deltatune.data.classification import encode_classification_records, resolve_label_names
from deltatune.data.collate import pad_batch
from deltatune.data.packing import collate_packed, collate_packed_sequences, pack_examples
from deltatune.data.readers import read_records, record_location, require_fields, require_text
from deltatune.data.templates import (IGNORE_INDEX, TEMPLATES, count_unfilled_placeholders,
                                      encode_instructions, fill_placeholders)
from deltatune.data.text import build_text_blocks
from deltatune.errors import ConfigError, DataError


@dataclass
class DataConfig:
    """Where the data comes from and how it becomes examples (the `data:` section of a run
    config; the annotations are checked once, at the CLI/YAML boundary).

    `columns` maps canonical names (text, text_pair, label, instruction, input, output,
    messages) to the source's column names; `eval_columns` does the same for the eval file and
    defaults to `columns` (SST-2's dev file names its text `content`, its train file `sentence`).
    `header=False`: the CSV/TSV files have no header row and their columns are named by position,
    so `columns` maps to "0", "1", ... (`{label: "0", text: "1"}`). `template` applies to
    instruction data. `placeholders` fills `{{name}}`-style fields
    (identity data). Limits keep the first N records."""

    # Numbers coerce so that YAML may say `columns: {label: 0, text: 1}` for a headerless file.
    __pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    train: str | None = None
    eval: str | None = None
    builtin: str | None = None
    builtin_train_size: Annotated[int, Field(ge=1)] = 1000
    builtin_eval_size: Annotated[int, Field(ge=0)] = 100
    columns: dict[str, str] = field(default_factory=dict)
    header: bool = True
    eval_columns: dict[str, str] | None = None
    template: Literal["alpaca", "chat", "none"] = "chat"
    max_length: Annotated[int, Field(ge=8)] = 256
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    train_limit: Annotated[int, Field(ge=1)] | None = None
    eval_limit: Annotated[int, Field(ge=1)] | None = None
    label_names: list[str] | None = None
    placeholders: dict[str, str] = field(default_factory=dict)
    # Multi-task training: this text goes in front of every record's text (classification) or
    # instruction (instruction data), so the model knows which task an example is from.
    task_prefix: str | None = None


@dataclass
class Datasets:
    train: list[dict]
    eval: list[dict]
    info: dict[str, Any]


class DataEncoding:
    """How records become examples for one kind of task. `stratify_by` names the field the
    train/eval split balances; `encode` turns both splits into examples, adding to `info`;
    `collate_padded` / `collate_packed` turn a micro-batch of its examples into tensors."""

    name: ClassVar[str] = ""
    stratify_by: ClassVar[str | None] = None
    # False for record kinds only files provide (built-in tasks are instruction data).
    accepts_builtin: ClassVar[bool] = False

    def encode(self, train_records: list[dict], eval_records: list[dict], config: DataConfig,
               tokenizer: Any, sources: dict, info: dict) -> tuple[list[dict], list[dict]]:
        raise NotImplementedError

    def collate_padded(self, examples: list[dict], pad_token_id: int) -> dict:
        return pad_batch(examples, pad_token_id)

    def collate_packed(self, examples: list[dict], pad_token_id: int) -> dict:
        """All examples in one row (no padding), positions restarting per example."""
        return collate_packed(pack_examples(examples), pad_token_id)


class InstructionEncoding(DataEncoding):
    """Instruction/chat records rendered with `config.template`, loss on the responses only."""

    name = "instruction"
    accepts_builtin = True

    def encode(self, train_records, eval_records, config, tokenizer, sources, info):
        info["template"] = config.template
        info["unfilled_placeholders"] = count_unfilled_placeholders(train_records + eval_records)
        splits = []
        for name, records in (("train", train_records), ("eval", eval_records)):
            examples, counts = encode_instructions(records, tokenizer, config.template,
                                                   config.max_length, sources[f"{name}_source"])
            info[f"{name}_dropped"] = counts["dropped"]
            info[f"{name}_truncated"] = counts["truncated"]
            info[f"{name}_boundary_fallbacks"] = counts["boundary_fallbacks"]
            splits.append(examples)
        return splits[0], splits[1]


class ClassificationEncoding(DataEncoding):
    """`text` (+ optional `text_pair`) and a `label` per record; labels become class indices in
    the order `label_names` fixes (see deltatune.data.classification)."""

    name = "classification"
    stratify_by = "label"

    def encode(self, train_records, eval_records, config, tokenizer, sources, info):
        hint = " (and text_pair for sentence pairs)"
        require_fields(train_records, ["text", "label"], sources["train_source"], hint)
        require_fields(eval_records, ["text", "label"], sources["eval_source"], hint)
        require_text(train_records, ["text", "text_pair"], sources["train_source"])
        require_text(eval_records, ["text", "text_pair"], sources["eval_source"])
        label_names = resolve_label_names([record["label"] for record in train_records],
                                          config.label_names,
                                          _locator(train_records, sources["train_source"]))
        train = encode_classification_records(train_records, tokenizer, label_names,
                                              config.max_length, sources["train_source"])
        eval_examples = encode_classification_records(eval_records, tokenizer, label_names,
                                                      config.max_length, sources["eval_source"])
        if not config.label_names:
            _check_eval_labels_seen(train, eval_examples, eval_records, label_names, sources)
        info["label_names"] = label_names
        info["num_labels"] = len(label_names)
        # The tokenizer truncates silently: an example at exactly max_length counts as truncated.
        info["train_truncated"] = sum(len(e["input_ids"]) >= config.max_length for e in train)
        info["eval_truncated"] = sum(len(e["input_ids"]) >= config.max_length
                                     for e in eval_examples)
        info["train_dropped"] = info["eval_dropped"] = 0
        return train, eval_examples

    def collate_packed(self, examples: list[dict], pad_token_id: int) -> dict:
        return collate_packed_sequences(examples)


class TextBlockEncoding(DataEncoding):
    """Plain `text` records concatenated and cut into `max_length` blocks (loss everywhere)."""

    name = "text"

    def encode(self, train_records, eval_records, config, tokenizer, sources, info):
        require_fields(train_records, ["text"], sources["train_source"])
        require_fields(eval_records, ["text"], sources["eval_source"])
        require_text(train_records, ["text"], sources["train_source"])
        require_text(eval_records, ["text"], sources["eval_source"])
        return (build_text_blocks(train_records, tokenizer, config.max_length),
                build_text_blocks(eval_records, tokenizer, config.max_length)
                if eval_records else [])


# Task name -> its encoding, for callers that have only a name (tests, `deltatune eval`).
ENCODINGS: dict[str, DataEncoding] = {"causal-lm": InstructionEncoding(),
                                      "classification": ClassificationEncoding(),
                                      "text": TextBlockEncoding()}


def encoding_for(encoding: DataEncoding | str) -> DataEncoding:
    if isinstance(encoding, DataEncoding):
        return encoding
    if encoding not in ENCODINGS:
        raise ConfigError(f"unknown task {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    return ENCODINGS[encoding]


def build_datasets(config: DataConfig, tokenizer: Any,
                   encoding: DataEncoding | str = "causal-lm", seed: int = 0) -> Datasets:
    """Train and eval examples encoded by `encoding` (an object or a task name), plus `info`."""
    encoding = encoding_for(encoding)
    train_records, eval_records, sources = _filled_records(config, encoding, seed)
    info: dict[str, Any] = {"encoding": encoding.name, "max_length": config.max_length,
                            **sources, "train_records": len(train_records),
                            "eval_records": len(eval_records)}
    train, eval_examples = encoding.encode(train_records, eval_records, config, tokenizer,
                                           sources, info)
    if not train:
        raise DataError(f"no training examples are left from {sources['train_source']} after "
                        f"encoding with max_length={config.max_length}; raise max_length")
    for name, examples in (("train", train), ("eval", eval_examples)):
        info.update(_describe(name, examples))
    return Datasets(train, eval_examples, info)


def load_records(config: DataConfig, encoding: DataEncoding | str = "causal-lm",
                 seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The raw (train, eval) records `build_datasets` would encode, after the same split, limits
    and placeholder filling: for jobs that rewrite records (sequence-level distillation)."""
    train_records, eval_records, _ = _filled_records(config, encoding_for(encoding), seed)
    return train_records, eval_records


def _filled_records(config: DataConfig, encoding: DataEncoding,
                    seed: int) -> tuple[list[dict], list[dict], dict]:
    _validate(config, encoding)
    train_records, eval_records, sources = _load_records(config, encoding, seed)
    if config.placeholders:
        train_records = fill_placeholders(train_records, config.placeholders)
        eval_records = fill_placeholders(eval_records, config.placeholders)
    if config.task_prefix:
        train_records = _with_task_prefix(train_records, config.task_prefix)
        eval_records = _with_task_prefix(eval_records, config.task_prefix)
    return train_records, eval_records, sources


def _with_task_prefix(records: list[dict], prefix: str) -> list[dict]:
    """Copies of `records` with `prefix` before the text or the instruction (the first user
    message of chat records)."""
    prefixed = []
    for original in records:
        record = type(original)(original)
        if hasattr(original, "where"):
            record.where = original.where
        if isinstance(record.get("text"), str):
            record["text"] = prefix + record["text"]
        elif isinstance(record.get("instruction"), str):
            record["instruction"] = prefix + record["instruction"]
        elif isinstance(record.get("messages"), list):
            messages = [dict(m) if isinstance(m, dict) else m for m in record["messages"]]
            first_user = next((m for m in messages if isinstance(m, dict)
                               and m.get("role") == "user"), None)
            if first_user is not None and isinstance(first_user.get("content"), str):
                first_user["content"] = prefix + first_user["content"]
            record["messages"] = messages
        prefixed.append(record)
    return prefixed


def discover_label_names(config: DataConfig, seed: int = 0) -> list[str]:
    """The class names `build_datasets` will report for a classification config, known before
    the model (and its head size) is loaded: `config.label_names`, else derived from the
    training records after the same split and limits."""
    if config.label_names:
        return resolve_label_names([], config.label_names)
    encoding = ENCODINGS["classification"]
    _validate(config, encoding)
    train_records, _, sources = _load_records(config, encoding, seed)
    require_fields(train_records, ["label"], sources["train_source"],
                   " (map it with --column label=NAME)")
    return resolve_label_names([record["label"] for record in train_records],
                               locate=_locator(train_records, sources["train_source"]))


def _locator(records: list[dict], source: str):
    """`locate(i)` for resolve_label_names: where records[i] was read."""
    return lambda index: record_location(records[index], source, index + 1)


def _validate(config: DataConfig, encoding: DataEncoding) -> None:
    if config.template not in TEMPLATES:
        raise ConfigError(f"unknown template {config.template!r}; choose one of "
                          f"{', '.join(TEMPLATES)}")
    if (config.train is None) == (config.builtin is None):
        raise ConfigError("give exactly one of data.train (a file or hf:NAME) and data.builtin "
                          f"(one of {', '.join(sorted(BUILTIN_TASKS))})")
    if config.builtin is not None and not encoding.accepts_builtin:
        raise ConfigError(f"built-in task {config.builtin!r} is instruction data; use it with "
                          "task causal-lm")
    if not 0 <= config.eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.max_length < 2:
        raise ConfigError(f"max_length must be at least 2, got {config.max_length}")
    for name in ("train_limit", "eval_limit"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive number of records, got {value}")


def _load_records(config: DataConfig, encoding: DataEncoding,
                  seed: int) -> tuple[list[dict], list[dict], dict]:
    if config.builtin is not None:
        train, eval_records = builtin_task(config.builtin, seed, config.builtin_train_size,
                                           config.builtin_eval_size)
        sources = {"train_source": f"builtin:{config.builtin}",
                   "eval_source": f"builtin:{config.builtin}"}
        if config.eval is not None:
            eval_records = read_records(config.eval, _eval_columns(config),
                                        header=config.header)
            sources["eval_source"] = config.eval
    else:
        train = read_records(config.train, config.columns, header=config.header)
        sources = {"train_source": config.train}
        if config.eval is not None:
            eval_records = read_records(config.eval, _eval_columns(config),
                                        header=config.header)
            sources["eval_source"] = config.eval
        else:
            train, eval_records = split_records(train, config.eval_fraction, seed,
                                                encoding.stratify_by)
            sources["eval_source"] = f"{config.eval_fraction:g} of {config.train}"
    # Limits take the first rows, as papers and the CLI help state ("the first 4,000 sentences");
    # `sample_records` is there for a random subset instead.
    train = train[:config.train_limit] if config.train_limit else train
    eval_records = eval_records[:config.eval_limit] if config.eval_limit else eval_records
    return train, eval_records, sources


def _eval_columns(config: DataConfig) -> dict[str, str]:
    return config.columns if config.eval_columns is None else config.eval_columns


def split_records(records: list[dict], eval_fraction: float, seed: int,
                  stratify: str | None = None) -> tuple[list[dict], list[dict]]:
    """(train, eval) by a seeded shuffle of indices; both keep file order. With `stratify`,
    each value of that field is split on its own. Two or more records always give both parts at
    least one."""
    if eval_fraction <= 0:
        return list(records), []
    groups: dict[Any, list[int]] = {}
    for index, record in enumerate(records):
        groups.setdefault(str(record.get(stratify)) if stratify else None, []).append(index)
    rng = random.Random(seed)
    eval_indices: set[int] = set()
    for key in sorted(groups, key=str):
        indices = groups[key]
        rng.shuffle(indices)
        count = round(len(indices) * eval_fraction)
        # Small groups: keep at least one example on each side when there are two or more.
        count = min(max(count, 1), len(indices) - 1) if len(indices) >= 2 else 0
        eval_indices.update(indices[:count])
    if not eval_indices and len(records) >= 2:
        # Every group has a single record: an empty eval set would only fail at scoring time.
        eval_indices.add(rng.randrange(len(records)))
    train = [record for index, record in enumerate(records) if index not in eval_indices]
    eval_records = [record for index, record in enumerate(records) if index in eval_indices]
    return train, eval_records


def sample_records(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """At most `limit` records: a seeded random subset kept in the original order."""
    if limit is None or limit >= len(records):
        return records
    keep = set(random.Random(seed).sample(range(len(records)), limit))
    return [record for index, record in enumerate(records) if index in keep]


def _check_eval_labels_seen(train: list[dict], eval_examples: list[dict],
                            eval_records: list[dict], label_names: list[str],
                            sources: dict) -> None:
    seen = {example["label"] for example in train}
    for index, example in enumerate(eval_examples):
        if example["label"] not in seen:
            raise DataError(f"{sources['eval_source']} record {index + 1}: label "
                            f"{eval_records[index]['label']!r} never occurs in the training data "
                            f"(training labels: {', '.join(label_names[i] for i in sorted(seen))})"
                            "; remove those examples or give label_names explicitly")


def _describe(name: str, examples: list[dict]) -> dict[str, Any]:
    lengths = [len(example["input_ids"]) for example in examples]
    description: dict[str, Any] = {
        f"{name}_examples": len(examples),
        f"{name}_tokens": sum(lengths),
        f"{name}_mean_length": round(sum(lengths) / len(lengths), 2) if lengths else 0.0,
        f"{name}_max_length": max(lengths, default=0),
    }
    if examples and "labels" in examples[0]:
        with_loss = sum(label != IGNORE_INDEX for example in examples
                        for label in example["labels"])
        description[f"{name}_loss_token_fraction"] = round(with_loss / max(sum(lengths), 1), 4)
    return description
