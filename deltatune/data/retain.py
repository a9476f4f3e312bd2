"""Data a run should not forget, or mixes in so as not to forget: a `RetainSet` names a file (and
how to read it) for a retention evaluation, for replay / data mixing, or for the Fisher
information of EWC. `encode_retain_examples` turns one into examples of the model's own kind,
exactly as training encodes them: for a language model, plain-text blocks of max_length (every
token labelled) when the records are `text`, instruction examples (loss on the responses, the
set's template) when they have `instruction` or `messages`; for a classifier, labelled sentences
whose classes are looked up in the model's head. `encode_retain_set` also gives the head ids of
the set's own classes, which a task-incremental evaluation restricts its argmax to. A limit keeps
the first N examples (text: the first N blocks, found without tokenising the whole file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable

from pydantic import ConfigDict, Field

from deltatune.data.classification import (encode_classification_records, label_to_index,
                                           resolve_label_names)
from deltatune.data.dataset import DataConfig, load_records
from deltatune.data.readers import record_location, require_fields, require_text
from deltatune.data.templates import encode_instructions
from deltatune.data.text import build_text_blocks
from deltatune.errors import ConfigError, DataError

RETENTION_EVAL_LIMIT = 64


@dataclass
class RetainSet:
    """A data file outside the run's own training data. `name` prefixes its metrics
    (`retain_<name>_perplexity`; default: the file's stem); `columns`/`header` read it as the
    `data:` section would; `limit` keeps the first N examples (text: N blocks of the run's
    max_length; None: `RETENTION_EVAL_LIMIT` for a retention evaluation, all for replay and
    EWC); `label_names` are a classification file's classes (default: those it holds),
    each of which must be a class of the model's head."""

    __pydantic_config__ = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    path: str
    name: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    header: bool = True
    limit: Annotated[int, Field(ge=1)] | None = None
    label_names: list[str] | None = None
    # Instruction records are rendered with this template (text records ignore it).
    template: str = "chat"

    @property
    def display_name(self) -> str:
        return self.name or Path(self.path.split(":", 1)[-1]).stem.replace("-", "_")


KINDS = ("language", "classification")
INSTRUCTION_FIELDS = ("instruction", "messages")


@dataclass
class EncodedRetainSet:
    """One retain set encoded for a model. `examples` are training examples of the model's kind;
    `label_ids` (classifiers only) are the head's ids of the set's own classes, in the set's
    class order: what a task-incremental evaluation takes its argmax over."""

    name: str
    examples: list[dict]
    label_ids: list[int] | None = None


def encode_retain_examples(source: RetainSet, tokenizer: Any, kind: str, max_length: int,
                           label_names: list[str] | None = None,
                           default_limit: int | None = None, seed: int = 0) -> list[dict]:
    """The examples of `encode_retain_set` (replay, EWC)."""
    return encode_retain_set(source, tokenizer, kind, max_length, label_names, default_limit,
                             seed).examples


def encode_retain_set(source: RetainSet, tokenizer: Any, kind: str, max_length: int,
                      label_names: list[str] | None = None, default_limit: int | None = None,
                      seed: int = 0) -> EncodedRetainSet:
    """`source` encoded for a model of `kind` ("language" or "classification"). `label_names`
    are a classifier's head classes in head order; `source.limit`, else `default_limit` (None:
    all), keeps the first examples. `seed` is the data pipeline's (records keep file order)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown retain-set kind {kind!r}; choose one of {', '.join(KINDS)}")
    # eval_fraction 0: the whole file is the set, nothing is split off.
    config = DataConfig(train=source.path, columns=dict(source.columns), header=source.header,
                        template=source.template, max_length=max_length, eval_fraction=0.0)
    records, _ = load_records(config, "classification" if kind == "classification"
                              else "causal-lm", seed)
    limit = source.limit if source.limit is not None else default_limit
    if limit is not None and limit < 1:
        raise ConfigError(f"retain set {source.display_name!r}: limit must be a positive number "
                          f"of examples, got {limit}")
    if kind == "classification":
        encoded = _classification_set(source, records, tokenizer, max_length, label_names,
                                      limit)
    else:
        encoded = EncodedRetainSet(source.display_name,
                                   _language_examples(source, records, tokenizer, max_length,
                                                      limit))
    if not encoded.examples:
        raise DataError(f"retain set {source.display_name!r} ({source.path}) gives no examples "
                        f"at max_length={max_length}: its responses are all cut off, or its text "
                        "is shorter than one block of two tokens; raise max_length or give a "
                        "file with more data")
    return encoded


# -- language models -------------------------------------------------------------------------

def _language_examples(source: RetainSet, records: list[dict], tokenizer: Any,
                       max_length: int, limit: int | None) -> list[dict]:
    first = records[0]
    if any(first.get(name) is not None for name in INSTRUCTION_FIELDS):
        return _first_examples(records, limit, lambda chunk: encode_instructions(
            chunk, tokenizer, source.template, max_length, source.path)[0])
    if "text" not in first:
        raise DataError(f"{record_location(first, source.path, 1)}: a language model's retain "
                        "set needs `text` records (plain text) or instruction records "
                        f"(`instruction` + `output`, or `messages`); found columns "
                        f"{', '.join(map(str, first)) or 'none'}. Map yours with "
                        "columns: {text: <your column>}")
    require_fields(records, ["text"], source.path)
    require_text(records, ["text"], source.path)
    return _first_examples(records, limit,
                           lambda chunk: build_text_blocks(chunk, tokenizer, max_length))


def _first_examples(records: list[dict], limit: int | None,
                    encode: Callable[[list[dict]], list[dict]]) -> list[dict]:
    """The first `limit` of `encode(records)`, encoding a doubling prefix of the records only."""
    if limit is None:
        return encode(records)
    count = limit
    while True:
        examples = encode(records[:count])
        # Only a text stream's last block can still grow, so with more than `limit` blocks the
        # first `limit` are those of the whole file.
        if len(examples) > limit or count >= len(records):
            return examples[:limit]
        count *= 2


# -- classifiers -----------------------------------------------------------------------------

def _classification_set(source: RetainSet, records: list[dict], tokenizer: Any,
                        max_length: int, label_names: list[str] | None,
                        limit: int | None) -> EncodedRetainSet:
    require_fields(records, ["text", "label"], source.path, " (and text_pair for sentence pairs)")
    require_text(records, ["text", "text_pair"], source.path)
    classes = retain_class_names(source, records)
    label_ids = retain_label_ids(source, classes, label_names)
    kept = records[:limit] if limit is not None else records
    # Each label is resolved against the set's own classes first (an integer label indexes the
    # set's label_names), then looked up by name in the head.
    named = [{**record, "label": classes[label_to_index(
        record["label"], classes, record_location(record, source.path, index))]}
        for index, record in enumerate(kept, start=1)]
    examples = encode_classification_records(named, tokenizer, list(label_names), max_length,
                                             source.path)
    return EncodedRetainSet(source.display_name, examples, label_ids)


def retain_class_names(source: RetainSet, records: list[dict]) -> list[str]:
    """The set's own classes: `source.label_names`, else those its records hold (derived by the
    rules of deltatune.data.classification, over the whole file)."""
    return resolve_label_names([record["label"] for record in records], source.label_names,
                               lambda index: record_location(records[index], source.path,
                                                             index + 1))


def retain_label_ids(source: RetainSet, classes: list[str],
                     label_names: list[str] | None) -> list[int]:
    """The head ids of `classes` (the set's own, in their order); ConfigError naming the classes
    the head lacks."""
    if not label_names:
        raise ConfigError(f"retain set {source.display_name!r} is classification data, which "
                          "needs the class names of the model's head (label_names) to find its "
                          "classes; pass them")
    head = [str(name) for name in label_names]
    missing = [name for name in classes if name not in head]
    if missing:
        raise ConfigError(
            f"retain set {source.display_name!r} ({source.path}) has classes "
            f"{', '.join(missing)} that the model's head does not have (head classes: "
            f"{', '.join(head)}); evaluate it on a model whose head holds them (one trained on "
            "that task, or started from such a run), or give the set's label_names as the head "
            "names them")
    return [head.index(name) for name in classes]
