"""Sequence classification data: records with `text` (optional `text_pair`) and `label` become
token ids and an integer class.

Labels may be strings or integers (CSV/TSV integers arrive as digit strings and count as
integers). `label_names` fixes the class order: given by the user, else 0..max for integer
labels, else the sorted unique strings of the training set. An evaluation label the training set
never had is an error, because the head has no output for it.
"""
from __future__ import annotations

from typing import Any

from deltatune.errors import DataError

ENCODE_CHUNK = 1000


def _as_int(label: Any) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label.strip())
    return None


def resolve_label_names(train_labels: list[Any], label_names: list[str] | None = None) -> list[str]:
    """The class names in head order (see module docstring)."""
    if label_names:
        names = [str(name) for name in label_names]
        if len(set(names)) != len(names):
            raise DataError(f"label_names has duplicates: {names}")
        return names
    if not train_labels:
        raise DataError("no training labels to derive label_names from")
    integers = [_as_int(label) for label in train_labels]
    if all(value is not None for value in integers):
        if min(integers) < 0:
            raise DataError(f"integer labels must be 0 or more, found {min(integers)}")
        return [str(index) for index in range(max(integers) + 1)]
    return sorted({str(label) for label in train_labels})


def label_to_index(label: Any, label_names: list[str], where: str) -> int:
    """The class index of one raw label; integer labels index `label_names` unless they are
    themselves one of the names."""
    text = str(label)
    if text in label_names:
        return label_names.index(text)
    value = _as_int(label)
    if value is not None and 0 <= value < len(label_names):
        return value
    raise DataError(f"{where}: label {label!r} is not one of the {len(label_names)} training "
                    f"labels ({', '.join(label_names)}); the model has no output for it. Remove "
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
