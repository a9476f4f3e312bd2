"""Unstructured and semi-structured (N:M, e.g. 2:4) weight pruning: which weights may be pruned,
keep-masks by magnitude (per layer or one global threshold) or by Wanda's |W|·‖X‖ score from
calibration batches, zeroing the pruned weights in place, and measuring how sparse a model is.

Which weights: the 2-D weights of the `nn.Linear` layers inside the repeated transformer blocks
(the model's largest `nn.ModuleList`: Llama's `model.layers`, BERT's `bert.encoder.layer`), minus
the heads of `DEFAULT_SKIP` plus the pooler. Embeddings, the output head and task heads stay
dense. A mask maps a module name to a bool tensor of the weight's shape, True = keep.
Quantized weights are refused: pruning works on dense values, so prune first, then quantize.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import torch
from torch import nn

from deltatune.data.collate import model_inputs
from deltatune.errors import ConfigError
from deltatune.quant.model import DEFAULT_SKIP, quantizable_linears
from deltatune.quant.tensor import QuantizedTensor

Masks = dict[str, torch.Tensor]
PRUNE_SKIP = (*DEFAULT_SKIP, "pooler")
SCOPES = ("local", "global")
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


# -- which weights -----------------------------------------------------------------------------

def prunable_linears(model: nn.Module, skip: Iterable[str] = PRUNE_SKIP
                     ) -> list[tuple[str, nn.Linear]]:
    """The linear layers whose weights pruning may zero (see the module docstring)."""
    blocks = _block_list_name(model)
    prefix = f"{blocks}." if blocks else ""
    layers = [(name, module) for name, module in quantizable_linears(model, skip)
              if name.startswith(prefix) and not _is_skipped(name, skip)]
    for name, module in layers:
        if isinstance(module.weight, QuantizedTensor):
            raise ConfigError(f"{name} is quantized; prune before quantizing (load the dense "
                              "model, prune it, then quantize)")
    if not layers:
        raise ConfigError("the model has no linear layers inside its transformer blocks to "
                          "prune; pruning needs nn.Linear layers in a ModuleList of blocks")
    return layers


def _block_list_name(model: nn.Module) -> str | None:
    """The name of the ModuleList with most entries: the repeated blocks, whatever the model."""
    lists = [(len(module), name) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module)]
    return max(lists)[1] if lists else None


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(pattern in parts or name.endswith("." + pattern) for pattern in skip)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in prunable_linears(model)}


# -- choosing what to keep ---------------------------------------------------------------------

def parse_pattern(pattern: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): keep N of every M consecutive input weights of a row."""
    match = _PATTERN.match(pattern)
    if match is None:
        raise ConfigError(f"pattern {pattern!r} is not N:M; write it like '2:4'")
    keep, group = int(match.group(1)), int(match.group(2))
    if not 0 < keep < group:
        raise ConfigError(f"pattern {pattern!r} needs 0 < N < M; write it like '2:4'")
    return keep, group


def resolve_sparsity(sparsity: float | None, pattern: str | None) -> float:
    """The sparsity a call prunes to: the pattern's 1 - N/M, or the one asked (in [0, 1))."""
    if pattern is not None:
        keep, group = parse_pattern(pattern)
        implied = 1.0 - keep / group
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ConfigError(f"pattern {pattern} fixes the sparsity at {implied:g}; drop "
                              f"sparsity={sparsity:g} or the pattern")
        return implied
    if sparsity is None:
        raise ConfigError("give a sparsity in [0, 1) (e.g. 0.5) or an N:M pattern (e.g. '2:4')")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask of a flat score vector with exactly `count` lowest scores pruned (ties broken
    by position, so the count is exact even among the many zeros of a pruned model)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if count <= 0:
        return keep
    if count >= scores.numel():
        return ~keep
    threshold = torch.kthvalue(scores, count).values
    below = scores < threshold
    tied = torch.nonzero(scores == threshold).flatten()
    keep[below] = False
    keep[tied[:count - int(below.sum())]] = False
    return keep


def _rowwise_masks(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Wanda's comparison group: each output row keeps its top (1 - s) inputs."""
    rows, columns = scores.shape
    pruned = round(sparsity * columns)
    if pruned == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    lowest = torch.topk(scores, pruned, dim=1, largest=False).indices
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, lowest, False)
    return keep


def _n_m_mask(scores: torch.Tensor, keep: int, group: int, name: str) -> torch.Tensor:
    rows, columns = scores.shape
    if columns % group:
        raise ConfigError(f"{name} has {columns} inputs, not a multiple of the pattern's group "
                          f"size {group}; choose an M that divides it or leave that layer out")
    grouped = scores.reshape(rows, columns // group, group)
    best = torch.topk(grouped, keep, dim=2).indices
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, best, True)
    return mask.reshape(rows, columns)


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float | None,
                      comparison: str = "layer", pattern: str | None = None,
                      already_pruned: Masks | None = None) -> Masks:
    """Keep-masks from importance scores (higher = keep). `comparison`: "layer" (each layer to
    the sparsity), "row" (each output row), "global" (one threshold over all layers); `pattern`
    "N:M" replaces it by groups of M consecutive inputs. Weights pruned in `already_pruned`
    (False there) are pruned first, so masks only ever shrink."""
    target = resolve_sparsity(sparsity, pattern)
    scores = {name: _with_pruned_first(score, (already_pruned or {}).get(name))
              for name, score in scores.items()}
    if pattern is not None:
        keep, group = parse_pattern(pattern)
        return {name: _n_m_mask(score, keep, group, name) for name, score in scores.items()}
    if comparison == "row":
        return {name: _rowwise_masks(score, target) for name, score in scores.items()}
    if comparison == "layer":
        return {name: _prune_lowest(score.flatten(), round(target * score.numel()))
                .reshape(score.shape) for name, score in scores.items()}
    if comparison == "global":
        return _global_masks(scores, target)
    raise ConfigError(f"unknown comparison {comparison!r}; use 'layer', 'row' or 'global'")


def _with_pruned_first(score: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    score = score.detach().float()
    if kept is None:
        return score
    return score.masked_fill(~kept.to(score.device), float("-inf"))


def _global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> Masks:
    flat = torch.cat([score.flatten() for score in scores.values()])
    keep = _prune_lowest(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, score in scores.items():
        masks[name] = keep[start:start + score.numel()].reshape(score.shape)
        start += score.numel()
    return masks


# -- magnitude ---------------------------------------------------------------------------------

def magnitude_masks(model: nn.Module, sparsity: float | None = None, scope: str = "local",
                    pattern: str | None = None, already_pruned: Masks | None = None) -> Masks:
    """Keep-masks that prune the smallest |W|: `scope="local"` brings each layer to `sparsity`,
    `"global"` uses one threshold over all prunable weights (layers end up unequally sparse);
    `pattern="2:4"` keeps the N largest of every M consecutive inputs of each row (sparsity is
    then 1 - N/M). `already_pruned`: earlier masks that must stay pruned (gradual pruning)."""
    _check_scope(scope, pattern)
    scores = {name: weight.detach().abs() for name, weight in _weights(model).items()}
    comparison = "layer" if scope == "local" else "global"
    return masks_from_scores(scores, sparsity, comparison, pattern, already_pruned)


def _check_scope(scope: str, pattern: str | None) -> None:
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    if pattern is not None and scope == "global":
        raise ConfigError("an N:M pattern compares weights within groups of M, never globally; "
                          "drop scope='global' or the pattern")


# -- Wanda -------------------------------------------------------------------------------------

def input_feature_norms(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                        progress: bool = False) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of every prunable linear layer over all calibration
    tokens, collected by forward pre-hooks in one no-grad pass of the dense model (the original
    Wanda re-runs each block on its pruned predecessors; one pass is cheaper and ranks the same
    way in practice). Only real tokens count: positions where the batch's 2-D `attention_mask`
    is 0 (or a packed batch's `segment_ids` is -1) are left out; without either all count."""
    layers = prunable_linears(model)
    squares = {name: torch.zeros(module.in_features, dtype=torch.float64,
                                 device=module.weight.device) for name, module in layers}
    real_tokens: list[torch.Tensor | None] = [None]
    handles = [module.register_forward_pre_hook(_accumulator(squares[name], real_tokens))
               for name, module in layers]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in _maybe_progress(batches, progress):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                real_tokens[0] = _real_token_mask(batch)
                model(**model_inputs(batch))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if seen == 0:
        raise ConfigError("Wanda needs calibration batches and got none; pass a list of "
                          "batches (an exhausted iterator yields nothing)")
    return {name: total.sqrt().float() for name, total in squares.items()}


def _accumulator(total: torch.Tensor, real_tokens: list[torch.Tensor | None]) -> Any:
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        features = inputs[0]
        mask = real_tokens[0]
        if mask is not None and features.shape[:-1] == mask.shape:
            features = features[mask]
        total.add_(features.reshape(-1, features.shape[-1]).double().pow(2).sum(0))
    return hook


def _real_token_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    if "attention_mask" in batch and torch.is_tensor(batch["attention_mask"]) \
            and batch["attention_mask"].dim() == 2:
        return batch["attention_mask"].bool()
    if "segment_ids" in batch:
        return batch["segment_ids"] >= 0
    return None


def _maybe_progress(batches: Iterable[Any], progress: bool) -> Iterable[Any]:
    if not progress:
        return batches
    from tqdm.auto import tqdm
    return tqdm(batches, desc="wanda calibration", unit="batch")


def wanda_masks(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                sparsity: float | None = None, pattern: str | None = None,
                progress: bool = False, already_pruned: Masks | None = None) -> Masks:
    """Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂ from the calibration `batches`, compared per
    output row (each row keeps its top 1 - s), or within groups of M inputs with `pattern`."""
    resolve_sparsity(sparsity, pattern)  # fail before the calibration pass
    norms = input_feature_norms(model, batches, progress)
    scores = {name: weight.detach().abs().float() * norms[name].unsqueeze(0)
              for name, weight in _weights(model).items()}
    return masks_from_scores(scores, sparsity, "row", pattern, already_pruned)


# -- applying and measuring --------------------------------------------------------------------

def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zeroes (to +0.0) every weight whose mask entry is False, in place."""
    with torch.no_grad():
        for name, weight in _masked_weights(model, masks).items():
            weight.masked_fill_(~masks[name].to(weight.device), 0.0)


def _masked_weights(model: nn.Module, masks: Masks) -> dict[str, torch.Tensor]:
    weights = {}
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"mask {name!r} names no module of this model; compute the masks "
                              "on the model you apply them to") from None
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            raise ConfigError(f"mask {name!r} has shape {tuple(mask.shape)} but the module's "
                              f"weight is {None if weight is None else tuple(weight.shape)}; "
                              "compute the masks on the model you apply them to")
        if isinstance(weight, QuantizedTensor):
            raise ConfigError(f"{name} is quantized; prune before quantizing")
        weights[name] = weight
    return weights


def masks_from_weights(model: nn.Module) -> Masks:
    """Keep-masks of an already pruned model: True where a prunable weight is non-zero."""
    return {name: weight.detach() != 0 for name, weight in _weights(model).items()}


def sparsity_report(model: nn.Module, masks: Masks | None = None) -> dict[str, Any]:
    """Per-layer and overall sparsity (fraction of zeros) of the prunable weights, and over all
    parameters (tied ones once). With `masks`, the masked layers are counted as if the masks
    were applied; without, the zeros in the weights are counted."""
    if masks is not None:
        _masked_weights(model, masks)
        pruned = {name: int((~mask).sum()) for name, mask in masks.items()}
        sizes = {name: mask.numel() for name, mask in masks.items()}
    else:
        weights = _weights(model)
        pruned = {name: int((w == 0).sum()) for name, w in weights.items()}
        sizes = {name: w.numel() for name, w in weights.items()}
    masked_ids = {id(model.get_submodule(name).weight) for name in pruned}
    parameters = zeros = 0
    for parameter in model.parameters():  # model.parameters() yields a tied tensor once
        parameters += parameter.numel()
        if id(parameter) not in masked_ids:
            zeros += int((parameter.detach() == 0).sum())
    zeros += sum(pruned.values())
    selected = sum(sizes.values())
    return {"layers": {name: pruned[name] / sizes[name] for name in pruned},
            "selected_weights": selected, "selected_zeros": sum(pruned.values()),
            "sparsity": sum(pruned.values()) / max(selected, 1),
            "parameters": parameters, "parameter_zeros": zeros,
            "overall_sparsity": zeros / max(parameters, 1)}
