"""Padding batches and the deterministic per-epoch order."""
from __future__ import annotations

import pytest
import torch

from deltatune.data.collate import iterate_batches, num_batches, pad_batch
from deltatune.errors import ConfigError


def test_pad_causal_lm_batch():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "prompt_ids": [5],
                 "reference": "x"},
                {"input_ids": [8], "labels": [8]}]
    batch = pad_batch(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


def test_pad_classification_batch():
    examples = [{"input_ids": [101, 7, 102], "token_type_ids": [0, 0, 0], "label": 1},
                {"input_ids": [101, 102], "token_type_ids": [0, 1], "label": 0}]
    batch = pad_batch(examples, pad_token_id=3)
    assert batch["input_ids"].tolist() == [[101, 7, 102], [101, 102, 3]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_pad_errors():
    with pytest.raises(ConfigError, match="empty batch"):
        pad_batch([], 0)
    with pytest.raises(ConfigError, match="pad token"):
        pad_batch([{"input_ids": [1]}], None)


def test_batch_order_is_deterministic_per_seed_and_epoch():
    examples = [{"id": index} for index in range(23)]

    def order(seed, epoch, **options):
        return [[example["id"] for example in batch]
                for batch in iterate_batches(examples, 5, seed, epoch, **options)]

    first = order(0, 0)
    assert first == order(0, 0)
    assert first != order(0, 1) and first != order(1, 0)
    assert sorted(i for batch in first for i in batch) == list(range(23))
    assert [len(batch) for batch in first] == [5, 5, 5, 5, 3]
    assert [len(batch) for batch in order(0, 0, drop_last=True)] == [5, 5, 5, 5]
    assert order(0, 0, drop_last=True) == first[:4]
    assert order(4, 2, shuffle=False)[0] == [0, 1, 2, 3, 4]
    assert num_batches(23, 5) == 5 and num_batches(23, 5, drop_last=True) == 4
    # Independent of any global RNG state.
    torch.manual_seed(123)
    assert order(0, 0) == first
