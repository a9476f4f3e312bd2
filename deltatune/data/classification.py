"""Sequence classification data: records with `text` (optional `text_pair`) and `label` become
token ids and an integer class.

Labels are strings or integers. CSV/TSV integers arrive as digit strings (ASCII, optional sign)
and count as integers; so do integral JSON numbers (1.0 is 1). Any other float, an empty string,
a boolean, null, a list or an object is a `DataError`, as is a `text`/`text_pair` that is a
boolean, a list or an object (numbers are read as text).

`label_names` fixes the class order (the head has one output per name): given by the user, else
derived from the training set (after the split and limits), where these rules hold:

- every label is an integer, or none is: a mix (0..10 and one "junk") is an error naming the
  first label of the rarer kind, since sorting them as text would put "10" before "2";
- there are at least two distinct labels;
- integer labels are 0 or more and give the classes 0..max, but only while that range is not far
  larger than the labels seen: max + 1 may be at most max(2 * distinct, distinct + 8), so a few
  unused ids (1-based labels, a class absent after a limit) are fine, and a stray 50000 among
  0..4 is an error naming its record instead of a 50,001-output head;
- at most MAX_DERIVED_CLASSES (10,000) classes; more need explicit `label_names`.

An evaluation label the training set never had is an error, because the head has no output for
it.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from deltatune.data.readers import json_kind
from deltatune.errors import DataError

ENCODE_CHUNK = 1000
MAX_DERIVED_CLASSES = 10_000
INTEGER = re.compile(r"\s*-?[0-9]+\s*")


def label_value(label: Any, where: str) -> int | str:
    """A raw label as an int (integers, digit strings, integral floats) or its string."""
    return _label_value(label, lambda: where)


def _label_value(label: Any, where: Callable[[], str]) -> int | str:
    # `where` is a callable so that the location is only spelled out for a bad label.
    if isinstance(label, bool) or not isinstance(label, (str, int, float)):
        raise DataError(f"{where()}: label is {json_kind(label)} ({label!r:.40}); a label must "
                        "be a class name or an integer class id — fix the record or map label "
                        "to another column")
    if isinstance(label, float):
        if not label.is_integer():
            raise DataError(f"{where()}: label {label} is not a whole number; classification "
                            "labels are class names or integer ids (0, 1, ...), not scores")
        return int(label)
    if isinstance(label, str) and not label.strip():
        raise DataError(f"{where()}: label is empty; give every record a label or remove it")
    if isinstance(label, str) and INTEGER.fullmatch(label):
        return int(label)
    return label


def resolve_label_names(train_labels: list[Any], label_names: list[str] | None = None,
                        locate: Callable[[int], str] | None = None) -> list[str]:
    """The class names in head order (see the module docstring). `locate(i)` names where
    `train_labels[i]` was read, for error messages."""
    if label_names:
        names = [str(name) for name in label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names has duplicates: {names}")
        if len(names) < 2:
            raise DataError(f"label_names has only one class ({names[0]!r}); classification "
                            "needs at least two")
        return names
    if not train_labels:
        raise DataError("no training labels to derive label_names from")
    locate = locate or (lambda index: f"training record {index + 1}")
    values = [_label_value(label, lambda index=index: locate(index))
              for index, label in enumerate(train_labels)]
    _check_one_kind(values, locate)
    distinct = set(values)
    if len(distinct) < 2:
        raise DataError(f"only one class ({train_labels[0]!r}) in {len(values):,} training "
                        "records; classification needs at least two — check that label maps to "
                        "the label column and that the training data (after any train_limit) "
                        "holds more than one class")
    if isinstance(values[0], int):
        return _integer_classes(values, distinct, locate)
    if len(distinct) > MAX_DERIVED_CLASSES:
        raise DataError(f"{len(distinct):,} distinct labels in {len(values):,} training records "
                        f"is more than the {MAX_DERIVED_CLASSES:,} classes derived from data "
                        "(does label map to a text column?); give label_names explicitly if you "
                        "mean that many")
    return sorted(str(value) for value in distinct)


def _check_one_kind(values: list[int | str], locate: Callable[[int], str]) -> None:
    texts = [index for index, value in enumerate(values) if isinstance(value, str)]
    if not texts or len(texts) == len(values):
        return
    integers = [index for index, value in enumerate(values) if isinstance(value, int)]
    odd = texts[0] if len(texts) <= len(integers) else integers[0]
    kind, other = ("non-integer", "integers") if odd in texts else ("integer", "class names")
    raise DataError(f"{locate(odd)}: label {values[odd]!r} is the first {kind} label, but "
                    f"{len(values) - min(len(texts), len(integers)):,} of the {len(values):,} "
                    f"training labels are {other}; fix that record (labels must all be integer "
                    "ids or all be class names) or give label_names")


def _integer_classes(values: list[int], distinct: set[int],
                     locate: Callable[[int], str]) -> list[str]:
    lowest, top = min(distinct), max(distinct)
    if lowest < 0:
        raise DataError(f"{locate(values.index(lowest))}: integer labels must be 0 or more, "
                        f"found {lowest}; map the labels to 0..K-1 or give label_names")
    allowed = max(2 * len(distinct), len(distinct) + 8)
    if top + 1 > allowed:
        seen = ", ".join(map(str, sorted(distinct)[:8])) + (", ..." if len(distinct) > 8 else "")
        raise DataError(f"{locate(values.index(top))}: label {top} would give the classifier "
                        f"{top + 1:,} outputs (classes 0..{top}), but the training data has only "
                        f"{len(distinct):,} distinct labels ({seen}); fix that record, map the "
                        f"labels to 0..{len(distinct) - 1}, or list the classes with label_names "
                        "(--label-names)")
    if top + 1 > MAX_DERIVED_CLASSES:
        raise DataError(f"integer labels 0..{top} would give {top + 1:,} classes, more than the "
                        f"{MAX_DERIVED_CLASSES:,} derived from data; give label_names explicitly "
                        "if you mean that many")
    return [str(index) for index in range(top + 1)]


def label_to_index(label: Any, label_names: list[str], where: str) -> int:
    """The class index of one raw label; integer labels index `label_names` unless they are
    themselves one of the names."""
    value = label_value(label, where)
    for text in (label, str(value)):
        if isinstance(text, str) and text in label_names:
            return label_names.index(text)
    if isinstance(value, int) and 0 <= value < len(label_names):
        return value
    shown = ", ".join(label_names[:10])
    more = f", ... ({len(label_names) - 10} more)" if len(label_names) > 10 else ""
    raise DataError(f"{where}: label {label!r} is not one of the {len(label_names)} training "
                    f"labels ({shown}{more}); the model has no output for it. Remove "
                    "those examples or give label_names that include it")


def encode_classification(record: dict, tokenizer: Any, label_names: list[str],
                          max_length: int) -> dict:
    """input_ids (+ token_type_ids when the tokenizer makes them) and `label` of one record."""
    return encode_classification_records([record], tokenizer, label_names, max_length)[0]


def encode_classification_records(records: list[dict], tokenizer: Any, label_names: list[str],
                                  max_length: int, source: str = "data") -> list[dict]:
    """Encodes records in chunks (the fast tokenizers batch in Rust)."""
    examples = []
    for start in range(0, len(records), ENCODE_CHUNK):
        chunk = records[start:start + ENCODE_CHUNK]
        labels = [label_to_index(record["label"], label_names,
                                 f"{source} record {start + offset + 1}")
                  for offset, record in enumerate(chunk)]
        for encoded, label in zip(_tokenize_chunk(chunk, tokenizer, max_length), labels):
            example = {"input_ids": list(encoded["input_ids"]), "label": label}
            if encoded.get("token_type_ids") is not None:
                example["token_type_ids"] = list(encoded["token_type_ids"])
            examples.append(example)
    return examples


def _tokenize_chunk(chunk: list[dict], tokenizer: Any, max_length: int) -> list[dict]:
    texts = [str(record["text"]) for record in chunk]
    pairs = [record.get("text_pair") for record in chunk]
    options = {"truncation": True, "max_length": max_length}
    if all(pair is None for pair in pairs):
        encoded = tokenizer(texts, **options)
    elif all(pair is not None for pair in pairs):
        encoded = tokenizer(texts, [str(pair) for pair in pairs], **options)
    else:
        return [_tokenize_chunk([record], tokenizer, max_length)[0] for record in chunk]
    keys = [key for key in ("input_ids", "token_type_ids") if key in encoded]
    return [{key: encoded[key][index] for key in keys} for index in range(len(chunk))]
