"""Sequence packing: row plans, the packed layout (restarting positions, boundary labels,
segments), determinism per (seed, epoch), and — the point of it all — that packing never changes
any example's loss, with transformers' own packed-sequence mask and with the packed attention."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.data.collate import iterate_batches, pad_batch
from deltatune.data.packing import (collate_packed, pack_examples, packed_batches,
                                    packing_stats, plan_rows)
from deltatune.errors import ConfigError
from deltatune.data.collate import model_inputs
from deltatune.train.packed_attention import (PACKED_ATTENTION, enable_packed_attention,
                                              segment_lengths_per_row)
from tests.conftest import tiny_llama

LENGTHS = [7, 12, 5, 20, 9, 3, 16, 11]


def _examples(lengths=LENGTHS, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        prompt = length // 3
        examples.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:],
                         "prompt_ids": ids[:prompt], "reference": "x"})
    return examples


def test_ffd_plan_fits_covers_everything_and_beats_greedy():
    for strategy in ("ffd", "greedy"):
        rows = plan_rows(LENGTHS, 24, strategy)
        assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))
        assert all(sum(LENGTHS[i] for i in row) <= 24 for row in rows)
    assert len(plan_rows(LENGTHS, 24, "ffd")) == 4 < len(plan_rows(LENGTHS, 24, "greedy")) == 5
    assert plan_rows(LENGTHS, 24, "greedy")[0] == [0, 1, 2]  # keeps the order


def test_plan_rejects_an_example_longer_than_a_row():
    with pytest.raises(ConfigError, match="more than the packing row length 10"):
        plan_rows([4, 11], 10)


def test_packed_row_layout():
    examples = _examples([4, 3])
    (row,) = pack_examples(examples, max_length=8)
    assert row["input_ids"] == examples[0]["input_ids"] + examples[1]["input_ids"]
    assert row["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    assert row["labels"] == ([-100] + examples[0]["labels"][1:]
                             + [-100] + examples[1]["labels"][1:])
    assert row["seq_lens"] == [4, 3]


def test_first_token_label_is_masked_even_when_labelled():
    (row,) = pack_examples([{"input_ids": [5, 6]}, {"input_ids": [7, 8, 9]}])
    assert row["labels"] == [-100, 6, -100, 8, 9]


def test_collate_pads_rows_as_own_segments_without_attention_mask():
    rows = pack_examples(_examples([4, 3, 5]), max_length=8)  # ffd: [5, 3] and [4]
    batch = collate_packed(rows, pad_token_id=0)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (2, 8)
    assert batch["cu_seq_lens"].tolist() == [0, 5, 8, 12, 16]
    assert batch["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert batch["segment_ids"].tolist() == [[0] * 5 + [1] * 3, [2] * 4 + [-1] * 4]
    assert batch["labels"][1, 4:].tolist() == [-100] * 4
    assert segment_lengths_per_row(batch["cu_seq_lens"], 2, 8) == [[5, 3], [4, 4]]


def _per_token_losses(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(**model_inputs(batch), use_cache=False).logits
    targets = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(),
                             ignore_index=-100, reduction="none").view(targets.shape)
    return losses, targets != -100


def _alone_losses(model, examples) -> list[float]:
    result = []
    for example in examples:
        batch = {"input_ids": torch.tensor([example["input_ids"]]),
                 "labels": torch.tensor([example["labels"]])}
        losses, _ = _per_token_losses(model, batch)
        result.append(losses.sum().item())
    return result


@pytest.mark.parametrize("attention", ["sdpa", PACKED_ATTENTION])
@pytest.mark.parametrize("max_length", [None, 24])
def test_packing_never_changes_an_example_loss(attention, max_length):
    model = tiny_llama()
    if attention == PACKED_ATTENTION:
        enable_packed_attention(model)
    examples = _examples()
    rows = pack_examples(examples, max_length)
    batch = collate_packed(rows, pad_token_id=0)
    losses, _ = _per_token_losses(model, batch)
    segments = batch["segment_ids"][:, :-1]
    order = [examples.index(_example_with(examples, ids)) for ids in _row_examples(rows)]
    alone = _alone_losses(model, examples)
    for segment, example_index in enumerate(order):
        packed_loss = losses[segments == segment].sum().item()
        assert packed_loss == pytest.approx(alone[example_index], abs=1e-5)


def _row_examples(rows) -> list[list[int]]:
    found = []
    for row in rows:
        start = 0
        for length in row["seq_lens"]:
            found.append(row["input_ids"][start:start + length])
            start += length
    return found


def _example_with(examples, ids):
    return next(example for example in examples if example["input_ids"] == ids)


def test_transformers_packed_mask_needs_use_cache_off():
    """transformers 5 builds the block-diagonal mask from position_ids only without a cache;
    with the model's default use_cache=True packed examples silently attend to each other."""
    model = tiny_llama()
    batch = collate_packed(pack_examples(_examples([6, 5])), pad_token_id=0)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    alone = model(input_ids=batch["input_ids"][:, 6:], use_cache=False).logits
    no_cache = model(**inputs, use_cache=False).logits[:, 6:]
    with_cache = model(**inputs, use_cache=True).logits[:, 6:]
    torch.testing.assert_close(no_cache, alone, atol=1e-5, rtol=1e-5)
    assert (with_cache - alone).abs().max() > 1e-3


def test_packed_attention_is_plain_sdpa_for_padded_batches():
    examples = _examples([9, 4, 6])
    batch = pad_batch(examples, pad_token_id=0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = tiny_llama()
    expected = model(**inputs).logits
    enable_packed_attention(model)
    torch.testing.assert_close(model(**inputs).logits, expected)


def test_packed_batches_same_examples_per_step_as_padding():
    examples = _examples()
    packed = list(packed_batches(examples, seed=3, epoch=1, pad_token_id=0, batch_size=3))
    padded = list(iterate_batches(examples, 3, seed=3, epoch=1))
    assert len(packed) == len(padded) == 3
    for batch, group in zip(packed, padded):
        assert batch["input_ids"].shape[0] == 1  # max_length=None: one row, no padding
        assert sorted(batch["input_ids"][0].tolist()) == sorted(
            token for example in group for token in example["input_ids"])


def test_packed_batches_are_deterministic_per_seed_and_epoch():
    examples = _examples()

    def run(seed, epoch):
        return [b["input_ids"].tolist()
                for b in packed_batches(examples, seed, epoch, pad_token_id=0,
                                        tokens_per_batch=30, max_length=20)]

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1) and run(0, 0) != run(1, 0)
    batches = list(packed_batches(examples, 0, 0, pad_token_id=0, tokens_per_batch=30,
                                  max_length=20))
    real = [int((b["segment_ids"] >= 0).sum()) for b in batches]
    assert all(tokens <= 30 for tokens in real) and sum(real) == sum(LENGTHS)
    assert all(b["input_ids"].shape[1] <= 20 for b in batches)


def test_packed_batches_needs_exactly_one_batch_size():
    with pytest.raises(ConfigError, match="exactly one"):
        next(packed_batches(_examples(), 0, 0, pad_token_id=0))


def test_padding_fraction_padded_versus_packed():
    examples = _examples()
    padded = [pad_batch(group, 0) for group in iterate_batches(examples, 4, 0, 0)]
    packed = list(packed_batches(examples, 0, 0, pad_token_id=0, batch_size=4))
    rows = list(packed_batches(examples, 0, 0, pad_token_id=0, batch_size=4, max_length=24))
    assert packing_stats(packed).padding_fraction == 0.0
    assert packing_stats(padded).real_tokens == packing_stats(rows).real_tokens == sum(LENGTHS)
    assert packing_stats(padded).padding_fraction > packing_stats(rows).padding_fraction > 0
