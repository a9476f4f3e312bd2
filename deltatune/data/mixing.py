"""Micro-batches that mix data: replay (a fixed share of every micro-batch comes from data the
model should not forget — general text, an earlier task) and multi-task sampling (each slot of a
micro-batch draws its task from size-based, temperature-scaled mixture weights). Both are batch
sources like `deltatune.data.batches.make_batch_source`: epoch -> this process's micro-batches,
fixed by (seed, epoch), padded or packed by the data's encoding, and cut into `shard`s so that a
run on `world_size` processes trains on exactly the global batches of one process with
`batch_size * world_size`. Examples drawn from a pool that is smaller than what is asked of it
come in a seeded permutation that continues across batches and epochs and starts a fresh
permutation each time the pool is used up, so nothing repeats before everything was seen. An
example may carry a `task` name; it is removed before collating.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch

from deltatune.data.batches import BatchSource, shard
from deltatune.data.collate import iterate_batches
from deltatune.errors import ConfigError, DataError

# The example keys collation turns into tensors: every source mixed into one batch must have
# the same ones (pad_batch reads the first example's keys for the whole batch).
COLLATED_KEYS = ("input_ids", "labels", "label", "token_type_ids", "position_ids")
TASK_KEY = "task"

Collate = Callable[[list[dict], int], dict[str, torch.Tensor]]


# -- replay ----------------------------------------------------------------------------------

def replay_count(global_batch_size: int, fraction: float) -> int:
    """Replay examples per global micro-batch: round(fraction * B) (Python's rounding, half to
    even), at least 1 and at most B - 1 so that task examples always have room."""
    if not 0 < fraction < 1:
        raise ConfigError(f"replay fraction must be between 0 and 1 (exclusive), got {fraction}")
    if global_batch_size < 2:
        raise ConfigError(f"replay needs at least 2 examples per micro-batch (one task, one "
                          f"replay), got {global_batch_size}; raise batch_size")
    return min(max(1, round(fraction * global_batch_size)), global_batch_size - 1)


def replay_batches_per_epoch(n_examples: int, batch_size: int, fraction: float,
                             world_size: int = 1) -> int:
    """Global micro-batches per epoch of `replay_batch_source`: one pass over the task examples,
    B - k of them per batch (B = batch_size * world_size, k = `replay_count(B, fraction)`)."""
    global_batch = batch_size * world_size
    return math.ceil(n_examples / (global_batch - replay_count(global_batch, fraction)))


def replay_batch_source(examples: list[dict], replay_examples: list[dict], fraction: float,
                        batch_size: int, seed: int, pad_token_id: int, packed: bool,
                        rank: int = 0, world_size: int = 1, encoding: Any = None) -> BatchSource:
    """epoch -> this process's micro-batches, each global one holding k = `replay_count(B,
    fraction)` replay examples and B - k task examples (B = batch_size * world_size; the last
    batch of an epoch has fewer task examples, still k replay ones). An epoch is one pass over
    `examples` in the order `iterate_batches` gives for (seed, epoch), the same order as without
    replay; replay examples continue one seeded permutation after another across batches and
    epochs. Replay examples are spread evenly through each global batch, so every process's
    share holds its part of them."""
    global_batch = batch_size * world_size
    replay_per_batch = replay_count(global_batch, fraction)
    _check_not_empty({"training": examples, "replay": replay_examples})
    _check_same_keys({"training": examples, "replay": replay_examples})
    collate = _collate_function(encoding, packed)
    task_per_batch = global_batch - replay_per_batch
    per_epoch = math.ceil(len(examples) / task_per_batch)
    replay = CyclingPool(replay_examples, seed, "replay")

    def epoch_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        groups = iterate_batches(examples, task_per_batch, seed, epoch)
        for index, task_group in enumerate(groups):
            first_draw = (epoch * per_epoch + index) * replay_per_batch
            group = spread(task_group, replay.take(first_draw, replay_per_batch))
            share = shard(group, rank, world_size)
            if share is not None:
                yield collate(share, pad_token_id)

    return epoch_batches


def spread(main: list[dict], extra: list[dict]) -> list[dict]:
    """`main` with `extra` evenly interleaved: extra item i at position floor((i + 1/2) m / k)
    of the m = len(main) + len(extra) slots (k = len(extra))."""
    size, count = len(main) + len(extra), len(extra)
    positions = {math.floor((i + 0.5) * size / count): i for i in range(count)}
    remaining = iter(main)
    return [extra[positions[slot]] if slot in positions else next(remaining)
            for slot in range(size)]


# -- multi-task sampling ---------------------------------------------------------------------

def mixture_weights(sizes: Sequence[int], temperature: float) -> list[float]:
    """Sampling probabilities p_i ∝ n_i^(1/T): T = 1 samples in proportion to size (every
    example equally often), larger T flattens towards uniform (small tasks are seen more, large
    ones less). T5 (Raffel et al. 2020) compares such temperatures; mT5 (Xue et al. 2021) samples
    with exponent 0.3, T ≈ 3.3."""
    if not temperature > 0:
        raise ConfigError(f"mixture temperature must be positive, got {temperature}")
    if not sizes or any(size < 0 for size in sizes) or not any(sizes):
        raise ConfigError(f"mixture weights need task sizes >= 0, at least one positive; got "
                          f"{list(sizes)}")
    # In log space: n^(1/T) overflows a float for large n and small T.
    logs = [math.log(size) / temperature if size else -math.inf for size in sizes]
    top = max(logs)
    powers = [math.exp(value - top) for value in logs]
    return [power / sum(powers) for power in powers]


def multitask_batches_per_epoch(sizes: Sequence[int], batch_size: int,
                                world_size: int = 1) -> int:
    """Global micro-batches per epoch of `multitask_batch_source`: ceil(sum n_i / B)."""
    return math.ceil(sum(sizes) / (batch_size * world_size))


def multitask_batch_source(pools: dict[str, list[dict]], batch_size: int, seed: int,
                           pad_token_id: int, packed: bool, temperature: float = 1.0,
                           rank: int = 0, world_size: int = 1,
                           encoding: Any = None) -> BatchSource:
    """epoch -> this process's micro-batches drawn from several tasks' examples (`pools`, by
    task name). An epoch has ceil(sum n_i / B) full global batches (B = batch_size *
    world_size); each of its slots draws a task with probability `mixture_weights(sizes,
    temperature)`, seeded by (seed, epoch), and takes that task's next example from its own
    seeded permutation, which continues across epochs and cycles when used up."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    _check_not_empty(pools)
    _check_same_keys(pools)
    names = list(pools)
    weights = torch.tensor(mixture_weights([len(pools[name]) for name in names], temperature),
                           dtype=torch.float64)
    global_batch = batch_size * world_size
    slots = multitask_batches_per_epoch([len(pool) for pool in pools.values()],
                                        batch_size, world_size) * global_batch
    streams = [CyclingPool(pools[name], seed, f"task:{name}") for name in names]
    draws = TaskDraws(weights, slots, seed)
    collate = _collate_function(encoding, packed)

    def epoch_batches(epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        tasks = draws.tasks(epoch)
        used = draws.used_before(epoch)
        chosen = []
        for task in tasks.tolist():
            chosen.append(streams[task].example(int(used[task])))
            used[task] += 1
        for start in range(0, slots, global_batch):
            share = shard(chosen[start:start + global_batch], rank, world_size)
            if share is not None:
                yield collate(share, pad_token_id)

    return epoch_batches


class TaskDraws:
    """Each epoch's task per slot, a pure function of (seed, epoch), and how many examples of
    each task earlier epochs used (so permutations continue where the previous epoch stopped)."""

    def __init__(self, weights: torch.Tensor, slots: int, seed: int):
        self.weights, self.slots, self.seed = weights, slots, seed
        self._used: list[torch.Tensor] = [torch.zeros(len(weights), dtype=torch.long)]

    def tasks(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "tasks", epoch))
        return torch.multinomial(self.weights, self.slots, replacement=True,
                                 generator=generator)

    def used_before(self, epoch: int) -> torch.Tensor:
        while len(self._used) <= epoch:
            done = len(self._used) - 1
            counts = torch.bincount(self.tasks(done), minlength=len(self.weights))
            self._used.append(self._used[-1] + counts)
        return self._used[epoch].clone()


# -- shared ----------------------------------------------------------------------------------

class CyclingPool:
    """Draw j of an endless stream over `examples`: permutation j // n (seeded by seed, the
    stream's name and that number) at position j % n."""

    def __init__(self, examples: list[dict], seed: int, name: str):
        self.examples, self.seed, self.name = examples, seed, name
        self._permutations: dict[int, list[int]] = {}

    def example(self, draw: int) -> dict:
        cycle, position = divmod(draw, len(self.examples))
        return self.examples[self._permutation(cycle)[position]]

    def take(self, first_draw: int, count: int) -> list[dict]:
        return [self.example(draw) for draw in range(first_draw, first_draw + count)]

    def _permutation(self, cycle: int) -> list[int]:
        if cycle not in self._permutations:
            if len(self._permutations) > 2:  # draws move forward: older cycles are not needed
                self._permutations.pop(min(self._permutations))
            generator = torch.Generator().manual_seed(stream_seed(self.seed, self.name, cycle))
            self._permutations[cycle] = torch.randperm(len(self.examples),
                                                       generator=generator).tolist()
        return self._permutations[cycle]


def stream_seed(seed: int, name: str, number: int) -> int:
    """A torch seed for (seed, stream name, number), distinct for distinct triples."""
    digest = hashlib.sha256(f"{seed}/{name}/{number}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def _collate_function(encoding: Any, packed: bool) -> Collate:
    """The encoding's padded or packed collate (default: instruction/text examples), applied to
    examples without their `task` name."""
    if encoding is None:
        from deltatune.data.dataset import InstructionEncoding
        encoding = InstructionEncoding()
    collate = encoding.collate_packed if packed else encoding.collate_padded

    def collate_examples(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        return collate([_without_task(example) for example in examples], pad_token_id)

    return collate_examples


def _without_task(example: dict) -> dict:
    if TASK_KEY not in example:
        return example
    return {key: value for key, value in example.items() if key != TASK_KEY}


def _check_not_empty(pools: dict[str, list[dict]]) -> None:
    if not pools:
        raise ConfigError("multi-task sampling needs at least one task's examples")
    empty = [name for name, pool in pools.items() if not pool]
    if empty:
        raise DataError(f"no examples in the {', '.join(map(repr, empty))} data to mix; check "
                        "that file (and its limit and max_length) or leave it out")


def _check_same_keys(pools: dict[str, list[dict]]) -> None:
    """Every source's examples must collate alike: the same tensor keys (checked on each
    source's first example)."""
    keys = {name: tuple(key for key in COLLATED_KEYS if key in pool[0])
            for name, pool in pools.items()}
    if len(set(keys.values())) > 1:
        described = "; ".join(f"{name}: {', '.join(found)}" for name, found in keys.items())
        raise DataError(f"the data sources to mix are encoded differently ({described}), so "
                        "their examples cannot share a batch; encode them for the same task "
                        "(text/instruction data for a language model, labelled sentences for "
                        "a classifier)")


__all__ = ["replay_batch_source", "replay_batches_per_epoch", "replay_count",
           "multitask_batch_source", "multitask_batches_per_epoch", "mixture_weights",
           "spread", "CyclingPool", "TaskDraws", "stream_seed"]
