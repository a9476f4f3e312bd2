"""Mixed batch sources: replay puts exactly k = round(fraction * B) replay examples in every
micro-batch, passes over the task data once per epoch and cycles the replay data in seeded
permutations across epochs; multi-task sampling draws tasks with p ∝ n^(1/T). Both are fixed by
(seed, epoch), shard into the same global batches as one process, drop the `task` key before
collating, and collate instruction examples and text blocks together, padded and packed."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from deltatune.data.collate import IGNORE_INDEX
from deltatune.data.mixing import (mixture_weights, multitask_batch_source,
                                   multitask_batches_per_epoch, replay_batch_source,
                                   replay_batches_per_epoch, replay_count, spread)
from deltatune.errors import ConfigError, DataError
from tests.conftest import SHARED_DATA

PAD = 0
REPLAY_BASE = 10_000


def _task_examples(count: int, task: str | None = None, base: int = 1) -> list[dict]:
    """Instruction-like examples whose first token is their id: prompt without loss."""
    examples = []
    for index in range(count):
        uid = base + index
        example = {"input_ids": [uid, 3, 4], "labels": [IGNORE_INDEX, 3, 4],
                   "prompt_ids": [uid], "reference": "x"}
        if task is not None:
            example["task"] = task
        examples.append(example)
    return examples


def _replay_examples(count: int) -> list[dict]:
    """Text blocks (every token labelled), ids from REPLAY_BASE."""
    return [{"input_ids": [REPLAY_BASE + i, 5, 6, 7], "labels": [REPLAY_BASE + i, 5, 6, 7]}
            for i in range(count)]


def _ids(batch: dict) -> list[int]:
    """The first token of every example in a padded or packed batch."""
    if "cu_seq_lens" in batch:
        flat = batch["input_ids"].flatten()
        return [int(flat[start]) for start in batch["cu_seq_lens"][:-1]]
    return batch["input_ids"][:, 0].tolist()


def _epoch_ids(source, epoch: int) -> list[list[int]]:
    return [_ids(batch) for batch in source(epoch)]


# -- replay ----------------------------------------------------------------------------------

def _replay_source(n_task=20, n_replay=5, fraction=0.25, batch_size=8, seed=0, packed=False,
                   rank=0, world_size=1):
    return replay_batch_source(_task_examples(n_task), _replay_examples(n_replay), fraction,
                               batch_size, seed, PAD, packed, rank, world_size)


@pytest.mark.parametrize("packed", [False, True])
def test_every_batch_has_exactly_k_replay_examples(packed):
    source = _replay_source(packed=packed)
    batches = _epoch_ids(source, 0)
    assert replay_count(8, 0.25) == 2
    assert len(batches) == replay_batches_per_epoch(20, 8, 0.25) == 4  # ceil(20 / 6)
    for index, ids in enumerate(batches):
        replayed = [i for i in ids if i >= REPLAY_BASE]
        assert len(replayed) == 2
        assert len(ids) - len(replayed) == (6 if index < 3 else 2)  # 20 = 6 + 6 + 6 + 2


def test_replay_count_rounds_and_keeps_room_for_the_task():
    assert replay_count(10, 0.25) == 2  # round(2.5) = 2, Python's half to even
    assert replay_count(16, 0.01) == 1  # at least one
    assert replay_count(2, 0.9) == 1  # at most B - 1
    with pytest.raises(ConfigError, match="at least 2"):
        replay_count(1, 0.25)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        replay_count(8, 1.0)


def test_each_task_example_once_per_epoch_in_a_new_order():
    source = _replay_source()
    orders = []
    for epoch in range(3):
        task_ids = [i for ids in _epoch_ids(source, epoch) for i in ids if i < REPLAY_BASE]
        assert sorted(task_ids) == list(range(1, 21))
        orders.append(task_ids)
    assert orders[0] != orders[1] != orders[2]


def test_same_seed_same_batches_and_a_different_seed_differs():
    first, again = _replay_source(seed=3), _replay_source(seed=3)
    for epoch in (0, 1):
        for one, two in zip(first(epoch), again(epoch)):
            assert one.keys() == two.keys()
            assert all(torch.equal(one[key], two[key]) for key in one)
    assert _epoch_ids(_replay_source(seed=4), 0) != _epoch_ids(first, 0)
    # Resuming at epoch 1 directly gives what an uninterrupted source gives.
    assert _epoch_ids(_replay_source(seed=3), 1) == _epoch_ids(first, 1)


def test_replay_cycles_in_fresh_permutations_across_epochs():
    source = _replay_source(n_replay=5)
    stream = [i - REPLAY_BASE for epoch in range(3) for ids in _epoch_ids(source, epoch)
              for i in ids if i >= REPLAY_BASE]
    assert len(stream) == 3 * 4 * 2
    cycles = [stream[start:start + 5] for start in range(0, 20, 5)]
    assert all(sorted(cycle) == list(range(5)) for cycle in cycles)
    assert len({tuple(cycle) for cycle in cycles}) > 1  # reshuffled, not repeated


@pytest.mark.parametrize("packed", [False, True])
def test_two_ranks_split_the_global_batch_of_one(packed):
    single = _epoch_ids(_replay_source(batch_size=8, packed=packed), 0)
    ranks = [_epoch_ids(_replay_source(batch_size=4, packed=packed, rank=rank, world_size=2), 0)
             for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for whole, first, second in zip(single, *ranks):
        assert first + second == whole
        # Replay is spread through the batch: each process gets its share.
        assert any(i >= REPLAY_BASE for i in first) and any(i >= REPLAY_BASE for i in second)


def test_spread_interleaves_evenly():
    assert spread([1, 2, 3, 4, 5, 6], ["a", "b"]) == [1, 2, "a", 3, 4, 5, "b", 6]
    assert spread([1], ["a"]) == [1, "a"]


def test_task_key_is_removed_and_instruction_and_text_collate_together():
    examples = _task_examples(4, task="instruct")
    source = replay_batch_source(examples, _replay_examples(2), 0.5, 4, 0, PAD, False)
    batch = next(iter(source(0)))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    for row, uid in enumerate(_ids(batch)):
        length = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row, :length].tolist()
        if uid >= REPLAY_BASE:
            assert labels == [uid, 5, 6, 7]  # text: every token has loss
        else:
            assert length == 3 and labels == [IGNORE_INDEX, 3, 4]  # response only
            assert batch["labels"][row, 3:].eq(IGNORE_INDEX).all()  # padding has no loss


def test_mismatched_or_empty_sources_are_refused():
    classification = [{"input_ids": [1, 2], "label": 0}]
    with pytest.raises(DataError, match="encoded differently"):
        replay_batch_source(_task_examples(4), classification, 0.25, 4, 0, PAD, False)
    with pytest.raises(DataError, match="replay"):
        replay_batch_source(_task_examples(4), [], 0.25, 4, 0, PAD, False)


def test_real_instruction_data_and_c4_text_mix_padded_and_packed(smollm2_tokenizer):
    from deltatune.data.readers import read_records
    from deltatune.data.templates import encode_instructions
    from deltatune.data.text import build_text_blocks

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    tokenizer = smollm2_tokenizer
    records = read_records(str(SHARED_DATA / "instruct" / "alpaca_en_demo.json"), limit=6)
    instructions, _ = encode_instructions(records, tokenizer, "chat", 96)
    text = build_text_blocks(read_records(str(SHARED_DATA / "text" / "c4_demo.jsonl"), limit=3),
                             tokenizer, 48)
    source_of = {tuple(e["input_ids"]): e for e in instructions + text}
    padded = replay_batch_source(instructions, text, 0.5, 4, 0, tokenizer.pad_token_id, False)
    packed = replay_batch_source(instructions, text, 0.5, 4, 0, tokenizer.pad_token_id, True)
    for padded_batch, packed_batch in zip(padded(0), packed(0)):
        rows = padded_batch["attention_mask"].sum(1).tolist()
        kinds = set()
        for row, length in enumerate(rows):
            example = source_of[tuple(padded_batch["input_ids"][row, :length].tolist())]
            assert padded_batch["labels"][row, :length].tolist() == example["labels"]
            kinds.add(example["labels"][0] == IGNORE_INDEX)
        assert kinds == {True, False}  # an instruction example and a text block in each batch
        flat_ids, flat_labels = packed_batch["input_ids"][0], packed_batch["labels"][0]
        bounds = packed_batch["cu_seq_lens"].tolist()
        for start, stop in zip(bounds, bounds[1:]):
            example = source_of[tuple(flat_ids[start:stop].tolist())]
            assert flat_labels[start:stop].tolist() == [IGNORE_INDEX] + example["labels"][1:]


# -- multi-task sampling ---------------------------------------------------------------------

def test_mixture_weights():
    assert mixture_weights([10, 30, 60], 1.0) == pytest.approx([0.1, 0.3, 0.6])
    assert mixture_weights([10, 30, 60], 1e6) == pytest.approx([1 / 3] * 3, abs=1e-5)
    root = [10 ** 0.5, 30 ** 0.5, 60 ** 0.5]
    assert mixture_weights([10, 30, 60], 2.0) == pytest.approx([r / sum(root) for r in root])
    assert mixture_weights([0, 5], 2.0) == [0.0, 1.0]
    assert sum(mixture_weights([10**9, 3], 0.05)) == pytest.approx(1.0)  # no overflow
    with pytest.raises(ConfigError):
        mixture_weights([10, 30], 0.0)
    with pytest.raises(ConfigError):
        mixture_weights([0, 0], 1.0)


def _pools() -> dict[str, list[dict]]:
    return {"a": _task_examples(20, "a", base=1000), "b": _task_examples(60, "b", base=2000),
            "c": _task_examples(120, "c", base=3000)}


def _task_of(uid: int) -> str:
    return "abc"[uid // 1000 - 1]


def _multitask(temperature=2.0, batch_size=8, seed=0, packed=False, rank=0, world_size=1):
    return multitask_batch_source(_pools(), batch_size, seed, PAD, packed, temperature, rank,
                                  world_size)


def test_epoch_length_and_full_batches():
    batches = _epoch_ids(_multitask(), 0)
    assert len(batches) == multitask_batches_per_epoch([20, 60, 120], 8) == 25
    assert all(len(ids) == 8 for ids in batches)


def test_task_frequencies_follow_the_mixture_weights():
    source = _multitask(temperature=2.0)
    counts = Counter(_task_of(uid) for epoch in range(20) for ids in _epoch_ids(source, epoch)
                     for uid in ids)
    total = sum(counts.values())
    assert total == 20 * 25 * 8
    expected = mixture_weights([20, 60, 120], 2.0)
    for name, probability in zip("abc", expected):
        assert abs(counts[name] / total - probability) < 0.02
    # T = 2 upsamples the small task relative to its share of the data (0.1).
    assert counts["a"] / total > 0.15


def test_within_a_task_examples_come_in_permutations_that_continue_across_epochs():
    source = _multitask(temperature=5.0)
    drawn = [uid - 1000 for epoch in range(4) for ids in _epoch_ids(source, epoch)
             for uid in ids if _task_of(uid) == "a"]
    full = len(drawn) - len(drawn) % 20
    assert full >= 60
    cycles = [drawn[start:start + 20] for start in range(0, full, 20)]
    assert all(sorted(cycle) == list(range(20)) for cycle in cycles)


def test_multitask_is_deterministic_and_shards_like_one_process():
    assert _epoch_ids(_multitask(seed=1), 2) == _epoch_ids(_multitask(seed=1), 2)
    assert _epoch_ids(_multitask(seed=1), 0) != _epoch_ids(_multitask(seed=1), 1)
    assert _epoch_ids(_multitask(seed=1), 0) != _epoch_ids(_multitask(seed=2), 0)
    single = _epoch_ids(_multitask(batch_size=8, packed=True), 1)
    ranks = [_epoch_ids(_multitask(batch_size=4, packed=True, rank=r, world_size=2), 1)
             for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks)] == single


def test_multitask_batches_carry_no_task_key():
    batch = next(iter(_multitask()(0)))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    with pytest.raises(DataError, match="'b'"):
        multitask_batch_source({"a": _task_examples(2), "b": []}, 4, 0, PAD, False)
