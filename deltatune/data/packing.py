"""Sequence packing: several examples per row instead of one example plus padding.

Instruction data has very uneven lengths, so per-batch padding computes mostly pad tokens (about
half on the Alpaca demo). Packing puts whole examples side by side without letting them see each
other: `position_ids` restart at 0 for every example, the first label of every example is -100
(the previous example's last token must not learn to predict it), and `cu_seq_lens` (cumulative
segment lengths over the flattened batch, flash-attention's varlen convention) tells attention
where each example starts. Without an attention mask, transformers builds a block-diagonal mask
from restarting `position_ids`; `deltatune.train.packed_attention` instead runs attention per
segment, which skips the masked blocks entirely. Rows are filled first-fit-decreasing (or greedily
in order); `max_length=None` puts a whole batch into one row: no padding at all. Batches are a pure
function of (examples, seed, epoch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from deltatune.data.collate import IGNORE_INDEX, iterate_batches
from deltatune.errors import ConfigError

STRATEGIES = ("ffd", "greedy")


@dataclass
class PackingStats:
    """Rows and tokens of packed (or padded) batches; `padding_fraction` of computed tokens."""
    rows: int
    real_tokens: int
    computed_tokens: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / max(self.computed_tokens, 1)


def plan_rows(lengths: Sequence[int], max_length: int, strategy: str = "ffd") -> list[list[int]]:
    """Example indices per row, each row's total length <= `max_length`. "ffd": longest first,
    each into the first row with room (few rows, little padding); "greedy": in the given order,
    a new row when the next example does not fit (keeps the order)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown packing strategy {strategy!r}; use one of {STRATEGIES}")
    if max_length < 1:
        raise ConfigError(f"packing max_length must be at least 1, got {max_length}")
    too_long = [i for i, length in enumerate(lengths) if length > max_length]
    if too_long:
        raise ConfigError(f"example {too_long[0]} has {lengths[too_long[0]]} tokens, more than "
                          f"the packing row length {max_length}; raise the row length or "
                          "truncate examples to it when encoding")
    if strategy == "greedy":
        return _greedy_rows(lengths, max_length)
    return _first_fit_decreasing_rows(lengths, max_length)


def _greedy_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room = 0
    for index, length in enumerate(lengths):
        if not rows or length > room:
            rows.append([])
            room = max_length
        rows[-1].append(index)
        room -= length
    return rows


def _first_fit_decreasing_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    # Ties keep the original order so the plan depends on nothing but the inputs.
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    rooms: list[int] = []
    for index in order:
        for row, room in enumerate(rooms):
            if lengths[index] <= room:
                rows[row].append(index)
                rooms[row] -= lengths[index]
                break
        else:
            rows.append([index])
            rooms.append(max_length - lengths[index])
    return rows


def pack_examples(examples: Sequence[dict], max_length: int | None = None,
                  strategy: str = "ffd") -> list[dict]:
    """Packed rows: dicts with the concatenated `input_ids`, `labels` (-100 on every example's
    first token), `position_ids` (restarting per example) and `seq_lens` (example lengths in row
    order). `max_length=None` packs all examples into one row."""
    if not examples:
        raise ConfigError("cannot pack an empty list of examples")
    lengths = [len(example["input_ids"]) for example in examples]
    if max_length is None:
        plan = [list(range(len(examples)))]
    else:
        plan = plan_rows(lengths, max_length, strategy)
    return [_concatenate([examples[index] for index in row]) for row in plan]


def _concatenate(examples: list[dict]) -> dict:
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [],
                                 "seq_lens": []}
    for example in examples:
        length = len(example["input_ids"])
        labels = list(example.get("labels", example["input_ids"]))
        row["input_ids"].extend(example["input_ids"])
        row["labels"].extend([IGNORE_INDEX] + labels[1:])
        row["position_ids"].extend(range(length))
        row["seq_lens"].append(length)
    return row


def collate_packed(rows: Sequence[dict], pad_token_id: int,
                   width: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows as tensors, padded on the right to `width` (default: the longest row):
    input_ids, labels, position_ids (the padding tail is a segment of its own, positions from 0),
    segment_ids (example number within the batch, -1 on padding) and cu_seq_lens (int32
    boundaries of every segment, padding tails included, over the flattened batch). No
    attention_mask on purpose: with one, transformers would let packed examples see each other."""
    if not rows:
        raise ConfigError("cannot collate an empty list of packed rows")
    longest = max(sum(row["seq_lens"]) for row in rows)
    width = longest if width is None else width
    if width < longest:
        raise ConfigError(f"collate width {width} is shorter than the longest packed row "
                          f"({longest} tokens)")
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [],
                                           "segment_ids": []}
    boundaries = [0]
    example_number = 0
    for row_number, row in enumerate(rows):
        padding = width - len(row["input_ids"])
        columns["input_ids"].append(row["input_ids"] + [pad_token_id] * padding)
        columns["labels"].append(row["labels"] + [IGNORE_INDEX] * padding)
        columns["position_ids"].append(row["position_ids"] + list(range(padding)))
        segments = []
        for length in row["seq_lens"]:
            segments.extend([example_number] * length)
            example_number += 1
            boundaries.append(boundaries[-1] + length)
        columns["segment_ids"].append(segments + [-1] * padding)
        if padding:
            boundaries.append(boundaries[-1] + padding)
    batch = {key: torch.tensor(value, dtype=torch.long) for key, value in columns.items()}
    batch["cu_seq_lens"] = torch.tensor(boundaries, dtype=torch.int32)
    return batch


def collate_packed_sequences(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Classification examples (`input_ids`, optional `token_type_ids`, `label`) side by side
    in one row without padding: input_ids, token_type_ids, position_ids restarting per example,
    cu_seq_lens (int32 example boundaries) and `labels`, one class per example. The model must
    pool each segment (deltatune.train.packed_classification)."""
    if not examples:
        raise ConfigError("cannot pack an empty list of examples")
    row: dict[str, list[int]] = {"input_ids": [], "position_ids": []}
    if "token_type_ids" in examples[0]:
        row["token_type_ids"] = []
    boundaries = [0]
    for example in examples:
        length = len(example["input_ids"])
        row["input_ids"].extend(example["input_ids"])
        row["position_ids"].extend(range(length))
        if "token_type_ids" in row:
            row["token_type_ids"].extend(example["token_type_ids"])
        boundaries.append(boundaries[-1] + length)
    batch = {key: torch.tensor([values], dtype=torch.long) for key, values in row.items()}
    batch["cu_seq_lens"] = torch.tensor(boundaries, dtype=torch.int32)
    batch["labels"] = torch.tensor([example["label"] for example in examples], dtype=torch.long)
    return batch


def packed_batches(examples: Sequence[dict], seed: int, epoch: int, pad_token_id: int,
                   batch_size: int | None = None, tokens_per_batch: int | None = None,
                   max_length: int | None = None, strategy: str = "ffd",
                   shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Ready packed batches for one epoch, fixed by (seed, epoch). Give exactly one of
    `batch_size` (examples per batch: the same examples per step as
    `deltatune.data.collate.iterate_batches` with per-batch padding, so the two are comparable
    step by step) or `tokens_per_batch` (examples in shuffled order until the next one would
    exceed the budget). Each batch's examples are packed into rows of `max_length` tokens, or
    into a single row when `max_length` is None."""
    if (batch_size is None) == (tokens_per_batch is None):
        raise ConfigError("packed_batches needs exactly one of batch_size or tokens_per_batch")
    if batch_size is not None:
        groups = iterate_batches(list(examples), batch_size, seed, epoch, shuffle=shuffle)
    else:
        groups = _token_budget_groups(examples, tokens_per_batch, seed, epoch, shuffle)
    for group in groups:
        yield collate_packed(pack_examples(group, max_length, strategy), pad_token_id)


def _token_budget_groups(examples: Sequence[dict], tokens_per_batch: int, seed: int, epoch: int,
                         shuffle: bool) -> Iterator[list[dict]]:
    if tokens_per_batch < 1:
        raise ConfigError(f"tokens_per_batch must be at least 1, got {tokens_per_batch}")
    group: list[dict] = []
    used = 0
    for (example,) in iterate_batches(list(examples), 1, seed, epoch, shuffle=shuffle):
        length = len(example["input_ids"])
        if length > tokens_per_batch:
            raise ConfigError(f"an example has {length} tokens, more than tokens_per_batch="
                              f"{tokens_per_batch}; raise tokens_per_batch")
        if group and used + length > tokens_per_batch:
            yield group
            group, used = [], 0
        group.append(example)
        used += length
    if group:
        yield group


def packing_stats(batches: Sequence[dict[str, torch.Tensor]]) -> PackingStats:
    """Rows, real tokens and computed tokens of packed batches (from `collate_packed`) or padded
    ones (from `pad_batch`, using their attention_mask)."""
    rows = real = computed = 0
    for batch in batches:
        rows += batch["input_ids"].shape[0]
        computed += batch["input_ids"].numel()
        if "segment_ids" in batch:
            real += int((batch["segment_ids"] >= 0).sum())
        else:
            real += int(batch["attention_mask"].sum())
    return PackingStats(rows=rows, real_tokens=real, computed_tokens=computed)
