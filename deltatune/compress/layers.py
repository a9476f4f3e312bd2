"""Whole-layer pruning: score every transformer block, then physically remove the least useful.

Scores:
- block influence (ShortGPT, Men et al. 2024): BI_i = 1 - mean over real tokens of
  cos(h_in, h_out) for block i — a block that barely turns its input changes little;
- loss increase: the loss with block i skipped (replaced by an identity returning its input in
  the block's own output format) minus the full model's loss, averaged over the batches.
The `count` lowest-scoring blocks go in one shot; at least one block always stays."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.compress.heads import LossFn, count_parameters, scoring_mode
from deltatune.data.collate import model_inputs
from deltatune.errors import ConfigError
from deltatune.models.structure import block_list, block_list_owner, remove_layers

LAYER_SCORES = ("block-influence", "loss")


@dataclass
class LayerPruningResult:
    """`removed`: the removed blocks' indices before pruning; `scores`: every block's score."""
    removed: list[int]
    scores: list[float]
    by: str
    layers_before: int
    layers_after: int
    parameters_before: int
    parameters_after: int


def block_influence(model: nn.Module, batches: Iterable[dict]) -> list[float]:
    """ShortGPT's BI per block, over the tokens whose attention_mask is 1."""
    blocks = block_list(model)
    similarity_sums = [0.0] * len(blocks)
    token_counts = [0] * len(blocks)
    current: dict[str, Any] = {}

    def hook_for(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            after = output if isinstance(output, Tensor) else output[0]
            cosine = F.cosine_similarity(before.float(), after.float(), dim=-1)
            weights = _real_tokens(current.get("mask"), cosine)
            similarity_sums[index] += float((cosine * weights).sum())
            token_counts[index] += int(weights.sum())
        return hook

    handles = [block.register_forward_hook(hook_for(i), with_kwargs=True)
               for i, block in enumerate(blocks)]
    try:
        with scoring_mode(model), torch.no_grad():
            seen = 0
            for batch in batches:
                current["mask"] = batch.get("attention_mask")
                model(**model_inputs(batch))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ConfigError("no batches to measure block influence on; pass at least one batch")
    return [1.0 - total / max(count, 1) for total, count in zip(similarity_sums, token_counts)]


def _real_tokens(mask: Tensor | None, cosine: Tensor) -> Tensor:
    if mask is not None and mask.dim() == 2 and tuple(mask.shape) == tuple(cosine.shape):
        return mask.to(cosine.device, cosine.dtype)
    return torch.ones_like(cosine)


class _SkippedBlock(nn.Module):
    """Stands in for a block: returns its input hidden states unchanged, as a tensor or as a
    one-element tuple, whichever the block returned."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.returns_tuple else hidden_states


def loss_increase(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn) -> list[float]:
    """Per block: mean loss over the batches with the block skipped minus the full mean loss."""
    batches = list(batches)
    if not batches:
        raise ConfigError("no batches to measure the loss on; pass at least one batch")
    owner, attribute = block_list_owner(model)
    blocks = getattr(owner, attribute)
    with scoring_mode(model), torch.no_grad():
        returns_tuple = _block_returns_tuple(model, blocks, batches[0])
        full = _mean_loss(model, batches, loss_fn)
        increases = []
        for index in range(len(blocks)):
            original = blocks[index]
            blocks[index] = _SkippedBlock(returns_tuple)
            try:
                increases.append(_mean_loss(model, batches, loss_fn) - full)
            finally:
                blocks[index] = original
    return increases


def _block_returns_tuple(model: nn.Module, blocks: nn.ModuleList, batch: dict) -> bool:
    seen: list[bool] = []
    handle = blocks[0].register_forward_hook(
        lambda module, args, output: seen.append(isinstance(output, tuple)))
    try:
        model(**model_inputs(batch))
    finally:
        handle.remove()
    return bool(seen and seen[0])


def _mean_loss(model: nn.Module, batches: list[dict], loss_fn: LossFn) -> float:
    return sum(float(loss_fn(model, batch)) for batch in batches) / len(batches)


def remove_layers_by(model: nn.Module, batches: Iterable[dict], count: int,
                     by: str = "block-influence", loss_fn: LossFn | None = None
                     ) -> LayerPruningResult:
    """Scores every block (`by`: "block-influence" or "loss", which needs `loss_fn`) and
    physically removes the `count` lowest-scoring ones."""
    if by not in LAYER_SCORES:
        raise ConfigError(f"unknown layer score {by!r}; use one of {', '.join(LAYER_SCORES)}")
    if by == "loss" and loss_fn is None:
        raise ConfigError("by='loss' needs loss_fn (e.g. lambda model, batch: "
                          "objective(model, batch).loss)")
    layers_before = len(block_list(model))
    if not 0 <= count < layers_before:
        raise ConfigError(f"count must be in 0..{layers_before - 1} (the model has "
                          f"{layers_before} layers and keeps at least one), got {count}")
    parameters_before = count_parameters(model)
    scores = (block_influence(model, batches) if by == "block-influence"
              else loss_increase(model, batches, loss_fn))
    ranking = sorted(range(layers_before), key=lambda index: (scores[index], index))
    removed = sorted(ranking[:count])
    remove_layers(model, removed)
    return LayerPruningResult(removed, scores, by, layers_before, len(block_list(model)),
                              parameters_before, count_parameters(model))
