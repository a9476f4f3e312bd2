"""Attention-head pruning by importance (Michel, Levy & Neubig 2019, "Are Sixteen Heads Really
Better than One?"): a gate ξ_h = 1 multiplies each head's output, a head's importance is the
expected absolute sensitivity of the loss to its gate, I_h = Σ_batches |∂L/∂ξ_h|, normalised
per layer by the L2 norm so that layers compare; the least important heads are masked (ξ_h = 0)
in `iterations` steps with the importance recomputed under the masks, then physically removed.

Grouped-query attention (Llama/SmolLM2: several query heads share one KV head) needs every KV
group to keep the same number of query heads. Two ways, chosen by `gqa`:
- "query-heads" (the default): remove query heads evenly, one from every group at a time, so a
  layer loses a multiple of its group count. It is the finer grain: SmolLM2-135M has 3 KV groups
  of 3 query heads per layer, so whole groups would move in 33 % steps of a layer's heads.
- "kv-groups": score a group by the sum of its query heads' importance and remove whole groups
  (the KV head with its query heads); coarser, but it also shrinks the KV cache.
For multi-head attention (BERT) every head is its own group and both modes are the same."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from deltatune.errors import ConfigError
from deltatune.models.structure import (AttentionLayout, remove_heads, remove_kv_groups,
                                        transformer_blocks)

LossFn = Callable[[nn.Module, dict], Tensor]
GQA_MODES = ("query-heads", "kv-groups")


@dataclass
class HeadPruningResult:
    """`removed`: per layer, the removed heads in the layer's numbering before pruning;
    `importance`: the normalised importance of every head of the unmasked model (first step)."""
    removed: dict[int, list[int]]
    importance: list[list[float]]
    heads_before: int
    heads_after: int
    parameters_before: int
    parameters_after: int
    gqa: str = "query-heads"
    iterations: int = 1
    removed_kv_groups: dict[int, list[int]] = field(default_factory=dict)


class HeadGates:
    """Context manager that puts a gate (ones, requiring grad) on every head of every layer:
    a forward pre-hook on the attention output projection multiplies its input, viewed as
    [..., heads, head_dim], by the layer's gate. `mask(layer, heads)` zeroes gates."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.attentions = [block.attention for block in transformer_blocks(model)]
        parameter = next(model.parameters())
        # at least float32: bf16 gate gradients would be too coarse to rank heads
        dtype = torch.promote_types(parameter.dtype, torch.float32)
        self.gates = [torch.ones(a.num_heads, device=parameter.device, dtype=dtype,
                                 requires_grad=True) for a in self.attentions]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "HeadGates":
        for attention, gate in zip(self.attentions, self.gates):
            self._handles.append(attention.o.register_forward_pre_hook(
                _gating_hook(gate, attention.num_heads, attention.head_dim)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def mask(self, layer: int, heads: Iterable[int]) -> None:
        for head in heads:
            self.gates[layer][head] = 0.0

    def zero_grad(self) -> None:
        for gate in self.gates:
            gate.grad = None


def _gating_hook(gate: Tensor, heads: int, head_dim: int) -> Callable:
    def hook(module: nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        shape = hidden.shape
        gated = hidden.reshape(*shape[:-1], heads, head_dim) * gate.to(hidden.dtype)[:, None]
        return (gated.reshape(shape), *args[1:])
    return hook


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no parameter gradients while scoring; both restored after,
    module by module."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.eval()
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        for module, training in modes:
            module.training = training


def backward_each(model: nn.Module, batches: list[dict], loss_fn: LossFn,
                  before: Callable[[dict], None] = lambda batch: None,
                  after: Callable[[], None] = lambda: None) -> None:
    """Runs loss_fn(model, batch).backward() per batch, with `before`/`after` around each
    (reset and read gate gradients)."""
    if not batches:
        raise ConfigError("no batches to measure importance on; pass at least one batch")
    with torch.enable_grad():
        for batch in batches:
            before(batch)
            loss = loss_fn(model, batch)
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise ConfigError("loss_fn must return the loss tensor computed by the model "
                                  "(e.g. lambda model, batch: objective(model, batch).loss)")
            loss.backward()
            after()


def head_importance(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn) -> Tensor:
    """[layers, heads] importance, each layer's row L2-normalised; rows of layers that have fewer
    heads (a model pruned before) are padded with NaN."""
    with HeadGates(model) as gates:
        raw = _gate_sensitivity(model, list(batches), loss_fn, gates)
    return _as_matrix(_normalised(raw, [set() for _ in raw]))


def _gate_sensitivity(model: nn.Module, batches: list[dict], loss_fn: LossFn,
                      gates: HeadGates) -> list[Tensor]:
    totals = [torch.zeros_like(gate) for gate in gates.gates]

    def accumulate() -> None:
        for total, gate in zip(totals, gates.gates):
            if gate.grad is not None:
                total += gate.grad.abs()

    with scoring_mode(model):
        backward_each(model, batches, loss_fn, lambda batch: gates.zero_grad(), accumulate)
    gates.zero_grad()
    return [total.detach().cpu() for total in totals]


def _normalised(raw: list[Tensor], masked: list[set[int]]) -> list[Tensor]:
    """Michel's per-layer L2 normalisation, over the heads still in play."""
    result = []
    for scores, gone in zip(raw, masked):
        scores = scores.clone()
        for head in gone:
            scores[head] = 0.0
        result.append(scores / (scores.norm() + 1e-20))
    return result


def _as_matrix(rows: list[Tensor]) -> Tensor:
    width = max(len(row) for row in rows)
    matrix = torch.full((len(rows), width), float("nan"))
    for index, row in enumerate(rows):
        matrix[index, :len(row)] = row
    return matrix


# -- pruning ---------------------------------------------------------------------------------------

@dataclass
class _Unit:
    """The smallest set of heads that can go together while the groups stay uniform."""
    score: float
    layer: int
    order: int
    heads: list[int]


def prune_heads(model: nn.Module, batches: Iterable[dict], loss_fn: LossFn, fraction: float,
                iterations: int = 1, gqa: str = "query-heads",
                progress: bool = False) -> HeadPruningResult:
    """Removes `fraction` of all attention heads (rounded down to whole removable units), least
    important first, in `iterations` masking steps, each recomputing importance with the
    earlier masks on; every layer keeps at least one head. See the module docstring for `gqa`."""
    _check_arguments(fraction, iterations, gqa)
    batches = list(batches)
    attentions = [block.attention for block in transformer_blocks(model)]
    heads_before = sum(a.num_heads for a in attentions)
    parameters_before = count_parameters(model)
    target = int(round(fraction * heads_before))
    masked: list[set[int]] = [set() for _ in attentions]
    first_importance: list[Tensor] | None = None
    with HeadGates(model) as gates:
        for step in range(iterations):
            for layer, heads in enumerate(masked):
                gates.mask(layer, heads)
            scores = _normalised(_gate_sensitivity(model, batches, loss_fn, gates), masked)
            if first_importance is None:
                first_importance = scores
            goal = int(round(target * (step + 1) / iterations))
            _mask_least_important(attentions, scores, masked, goal, gqa)
            if progress:
                print(f"head pruning step {step + 1}/{iterations}: "
                      f"{sum(map(len, masked))}/{heads_before} heads masked", file=sys.stderr)
    removed = {layer: sorted(heads) for layer, heads in enumerate(masked) if heads}
    removed_groups = _emptied_groups(attentions, removed)
    if gqa == "kv-groups":
        remove_kv_groups(model, removed_groups)
    else:
        remove_heads(model, removed)
    return HeadPruningResult(
        removed=removed, importance=[row.tolist() for row in first_importance or []],
        heads_before=heads_before,
        heads_after=sum(b.attention.num_heads for b in transformer_blocks(model)),
        parameters_before=parameters_before, parameters_after=count_parameters(model),
        gqa=gqa, iterations=iterations, removed_kv_groups=removed_groups)


def _check_arguments(fraction: float, iterations: int, gqa: str) -> None:
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"fraction must be in [0, 1), got {fraction}")
    if iterations < 1:
        raise ConfigError(f"iterations must be at least 1, got {iterations}")
    if gqa not in GQA_MODES:
        raise ConfigError(f"unknown gqa mode {gqa!r}; use one of {', '.join(GQA_MODES)}")


def _mask_least_important(attentions: list[AttentionLayout], scores: list[Tensor],
                          masked: list[set[int]], goal: int, gqa: str) -> None:
    units = [unit for layer, attention in enumerate(attentions)
             for unit in _units(layer, attention, scores[layer], masked[layer], gqa)]
    budget = goal - sum(map(len, masked))
    for unit in sorted(units, key=lambda u: (u.score, u.layer, u.order)):
        if budget <= 0:
            break
        if len(unit.heads) <= budget:
            masked[unit.layer].update(unit.heads)
            budget -= len(unit.heads)


def _units(layer: int, attention: AttentionLayout, scores: Tensor, masked: set[int],
           gqa: str) -> list[_Unit]:
    """A layer's removable units in the order they may go (never its last head): single heads
    for multi-head attention; for GQA one head of every group ("query-heads") or whole groups
    ("kv-groups"). Within a layer, later units score at least as high as earlier ones."""
    size = attention.group_size
    groups = [[h for h in range(g * size, (g + 1) * size) if h not in masked]
              for g in range(attention.num_kv_heads)]
    groups = [group for group in groups if group]
    if size == 1 or gqa == "kv-groups":
        if size == 1:
            ranked = sorted((float(scores[g[0]]), g) for g in groups)
        else:
            ranked = sorted((float(scores[g].sum()), g) for g in groups)
        return [_Unit(score, layer, order, heads)
                for order, (score, heads) in enumerate(ranked[:-1])]
    by_importance = [sorted(group, key=lambda h: float(scores[h])) for group in groups]
    units = []
    for order in range(len(by_importance[0]) - 1):
        heads = [group[order] for group in by_importance]
        units.append(_Unit(float(scores[heads].mean()), layer, order, heads))
    return units


def _emptied_groups(attentions: list[AttentionLayout],
                    removed: dict[int, list[int]]) -> dict[int, list[int]]:
    emptied = {}
    for layer, heads in removed.items():
        size = attentions[layer].group_size
        groups = [g for g in range(attentions[layer].num_kv_heads)
                  if all(h in heads for h in range(g * size, (g + 1) * size))]
        if groups:
            emptied[layer] = groups
    return emptied


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(parameter.numel() for parameter in model.parameters())
