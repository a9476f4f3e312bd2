"""Micro-batches for the training loop: the examples of each step in an order fixed by
(seed, epoch), padded or packed, and split across processes. With `world_size` processes each
global micro-batch holds `batch_size * world_size` examples — exactly the examples one process
with that batch size would see — and process `rank` takes its contiguous share, so a
distributed run trains on the same global batches as a single one."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch

from deltatune.data.collate import iterate_batches

BatchSource = Callable[[int], Iterator[dict[str, torch.Tensor]]]


def make_batch_source(examples: list[dict], batch_size: int, seed: int, pad_token_id: int,
                      packed: bool, rank: int = 0, world_size: int = 1,
                      encoding: Any = None) -> BatchSource:
    """epoch -> this process's micro-batches. `packed` puts each micro-batch's examples in one
    row (no padding computed; see deltatune.data.packing); otherwise they are padded. The
    `encoding` (a deltatune.data.DataEncoding; default: instruction/text examples) collates."""
    if encoding is None:
        from deltatune.data.dataset import InstructionEncoding
        encoding = InstructionEncoding()
    collate = encoding.collate_packed if packed else encoding.collate_padded

    def epoch_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        for group in iterate_batches(examples, batch_size * world_size, seed, epoch):
            share = shard(group, rank, world_size)
            if share is None:
                continue
            yield collate(share, pad_token_id)

    return epoch_batches


def shard(group: list[dict], rank: int, world_size: int) -> list[dict] | None:
    """Process `rank`'s contiguous share of a global micro-batch; None for every process when
    the group is too small to give each one an example (a short last group)."""
    if world_size == 1:
        return group
    size = math.ceil(len(group) / world_size)
    if len(group) <= (world_size - 1) * size:  # the last process would get nothing
        return None
    return group[rank * size:(rank + 1) * size]
