"""Classification data: label names and their order, unseen labels, encoding with the real
MiniLM (BERT) tokenizer, text pairs and truncation."""
from __future__ import annotations

import pytest

from deltatune.data.classification import (encode_classification, encode_classification_records,
                                           label_to_index, resolve_label_names)
from deltatune.errors import DataError


def test_string_labels_are_sorted_unique():
    assert resolve_label_names(["pos", "neg", "pos", "neutral"]) == ["neg", "neutral", "pos"]


def test_integer_labels_give_0_to_max():
    assert resolve_label_names([2, 0, 2]) == ["0", "1", "2"]
    # TSV/CSV integers arrive as strings; "10" must not sort before "2".
    assert resolve_label_names(["0", "10", "2"]) == [str(index) for index in range(11)]


def test_user_given_label_names_win():
    names = resolve_label_names(["a", "b"], ["b", "a", "c"])
    assert names == ["b", "a", "c"]
    assert label_to_index("a", names, "x") == 1
    assert label_to_index(2, names, "x") == 2


def test_bad_labels():
    with pytest.raises(DataError, match="0 or more"):
        resolve_label_names([0, -1])
    with pytest.raises(DataError, match="duplicates"):
        resolve_label_names([], ["a", "a"])
    with pytest.raises(DataError, match=r"dev record 3: label 'maybe' is not one of the 2 "
                                        r"training labels \(neg, pos\)"):
        label_to_index("maybe", ["neg", "pos"], "dev record 3")
    with pytest.raises(DataError, match="label 5"):
        label_to_index(5, ["0", "1"], "dev record 1")


def test_encode_single_text(minilm_tokenizer):
    example = encode_classification({"text": "hello world", "label": "pos"}, minilm_tokenizer,
                                    ["neg", "pos"], max_length=32)
    assert example["label"] == 1
    assert minilm_tokenizer.decode(example["input_ids"]) == "[CLS] hello world [SEP]"
    assert example["token_type_ids"] == [0] * len(example["input_ids"])


def test_encode_text_pair_and_truncation(minilm_tokenizer):
    records = [{"text": "a b c d e f g h", "text_pair": "x y z", "label": 0},
               {"text": "short", "text_pair": "pair", "label": 1}]
    long, short = encode_classification_records(records, minilm_tokenizer, ["0", "1"],
                                                max_length=8)
    assert len(long["input_ids"]) == 8
    assert short["token_type_ids"] == [0, 0, 0, 1, 1]
    assert minilm_tokenizer.decode(short["input_ids"]) == "[CLS] short [SEP] pair [SEP]"
    assert [long["label"], short["label"]] == [0, 1]


def test_mixed_pairs_are_encoded_one_by_one(minilm_tokenizer):
    records = [{"text": "one", "label": 0}, {"text": "two", "text_pair": "three", "label": 1}]
    first, second = encode_classification_records(records, minilm_tokenizer, ["0", "1"], 16)
    assert minilm_tokenizer.decode(first["input_ids"]) == "[CLS] one [SEP]"
    assert minilm_tokenizer.decode(second["input_ids"]) == "[CLS] two [SEP] three [SEP]"


def test_tokenizer_without_token_type_ids(smollm2_tokenizer):
    example = encode_classification({"text": "hello", "label": 0}, smollm2_tokenizer, ["0"], 8)
    assert set(example) == {"input_ids", "label"}
