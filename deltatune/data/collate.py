"""Batching examples: the order of examples per epoch and padding a batch into tensors.

The order depends only on (seed, epoch), so a run resumed at epoch e, batch b sees exactly the
batches an uninterrupted run would (skip the first b batches of `iterate_batches(..., epoch=e)`).
Padding is on the right; keys that are not token sequences (`prompt_ids`, `reference`) stay out
of the tensors. `model_inputs` and `count_input_tokens` read a batch (padded or packed, see
deltatune.data.packing) the way every objective and evaluator needs it.
"""
from __future__ import annotations

from typing import Iterator

import torch

from deltatune.errors import ConfigError

# The label of a position that carries no loss (PyTorch's and transformers' convention).
IGNORE_INDEX = -100
# Batch keys that describe the layout of a packed batch rather than model inputs.
PACKING_KEYS = ("segment_ids", "cu_seq_lens")
# Sequence keys padded to the batch's longest input, with the value used for padding
# (None: the tokenizer's pad id).
PADDED_KEYS: dict[str, int | None] = {"input_ids": None, "labels": IGNORE_INDEX,
                                      "token_type_ids": 0, "position_ids": 0}


def pad_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded long tensors: input_ids, attention_mask, and whichever of labels (causal LM),
    token_type_ids and position_ids the examples have; `labels` from each example's `label`
    for classification."""
    if not examples:
        raise ConfigError("cannot pad an empty batch")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; give the tokenizer a pad token")
    width = max(len(example["input_ids"]) for example in examples)
    batch = {}
    for key, fill in PADDED_KEYS.items():
        if key in examples[0]:
            value = pad_token_id if fill is None else fill
            batch[key] = torch.tensor([_pad(example[key], width, value) for example in examples],
                                      dtype=torch.long)
    batch["attention_mask"] = torch.tensor(
        [[1] * len(example["input_ids"]) + [0] * (width - len(example["input_ids"]))
         for example in examples], dtype=torch.long)
    if "label" in examples[0]:
        batch["labels"] = torch.tensor([example["label"] for example in examples],
                                       dtype=torch.long)
    return batch


def _pad(sequence: list[int], width: int, value: int) -> list[int]:
    return list(sequence) + [value] * (width - len(sequence))


def iterate_batches(examples: list[dict], batch_size: int, seed: int, epoch: int,
                    shuffle: bool = True, drop_last: bool = False) -> Iterator[list[dict]]:
    """Lists of `batch_size` examples in an order fixed by (seed, epoch); the last batch may
    be shorter unless `drop_last`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if shuffle:
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        order = torch.randperm(len(examples), generator=generator).tolist()
    else:
        order = list(range(len(examples)))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        yield [examples[index] for index in order[start:start + batch_size]]


def num_batches(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches `iterate_batches` yields per epoch."""
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


def _epoch_seed(seed: int, epoch: int) -> int:
    # Distinct (seed, epoch) pairs must not share a permutation; keep it in torch's 64-bit range.
    return (seed * 1_000_003 + epoch) % (2**63)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch entries the model takes: everything except labels and packing layout; a packed
    batch's `cu_seq_lens` becomes the varlen keyword arguments transformers' flash-attention
    path and deltatune's packed attention both read."""
    inputs = {k: v for k, v in batch.items()
              if k not in PACKING_KEYS and k not in ("labels", "label")}
    if "cu_seq_lens" in batch:
        inputs.update(varlen_kwargs(batch["cu_seq_lens"]))
    return inputs


def varlen_kwargs(cu_seq_lens: torch.Tensor) -> dict[str, torch.Tensor | int]:
    """Segment boundaries (cumulative lengths over the flattened batch) as attention kwargs."""
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens: the attention mask's ones, a packed batch's non-padding segments, or all."""
    if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
        return int(batch["attention_mask"].sum())
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    return int(batch["input_ids"].numel())
