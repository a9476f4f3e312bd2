"""The output head and the next-token cross-entropy fused into the model's forward: a model
change installed for training (like the speed switches) so the loss is computed *through
`model(...)`* — and so through any wrapper around it (DDP's gradient sync, FSDP's unsharding) —
without ever materialising the (batch, sequence, vocabulary) logits, the largest tensors of a
training step (for a 49k-token vocabulary, and padded, most of its peak memory).

`install_fused_loss(model)` first checks that it is exact for this model: a tiny probe compares
`head(backbone(x))` with the model's own logits, so a head that does more than a linear map
(soft-capping, logit scaling, a custom nonlinear head) is refused and the caller keeps the plain
full-logits path, never a wrong loss. Installed, `model(..., loss_targets=T)` returns a
`LabelLoss` (sum of cross-entropy over the positions where T != -100 and their count; with
`keep_hidden=True` also the backbone's last hidden state at those positions, for loss terms
that put the same positions through the head again, such as the KL to the original model);
without `loss_targets` the model behaves exactly as before. `label_loss_sum(model, batch)` is the one
function objectives and evaluators call: fused when installed, plain otherwise.

For a plain `nn.Linear` head a custom autograd function computes each chunk's loss *and* its
gradient in the forward pass and keeps only the (positions, hidden) gradient, so backward does
no extra work; a head wrapped by a method (LoRA on `lm_head`, ...) is called as a module under
per-chunk activation checkpointing instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deltatune.data.collate import IGNORE_INDEX, model_inputs
from deltatune.errors import ConfigError

# Marker set on a model whose forward computes the fused loss; holds the chunk size.
FUSED_LOSS_ATTRIBUTE = "_deltatune_fused_loss_chunk"
DEFAULT_CHUNK_SIZE = 256


@dataclass
class LabelLoss:
    """Summed next-token cross-entropy over the labelled positions and how many there were;
    `hidden` (labelled positions, hidden size) or `logits` (the full logits, plain path) when
    the caller asked to keep what the loss was computed from."""
    loss_sum: Tensor
    label_tokens: int
    hidden: Tensor | None = None
    logits: Tensor | None = None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside wrappers that keep it as `.module` (DistributedDataParallel, ...)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def next_token_targets(labels: Tensor) -> Tensor:
    """Position t predicts token t+1: the targets of positions 0..T-2."""
    return labels[:, 1:]


def label_loss_sum(model: nn.Module, batch: dict[str, Tensor],
                   keep_hidden: bool = False) -> LabelLoss:
    """Summed next-token cross-entropy of `batch["labels"]`, always through `model(...)`: the
    fused head + loss when installed on the (unwrapped) model, full logits otherwise.
    `keep_hidden`: the result also carries the labelled positions' hidden states (fused) or
    the full logits (plain path)."""
    targets = next_token_targets(batch["labels"])
    inputs = model_inputs(batch)
    if getattr(unwrap(model), FUSED_LOSS_ATTRIBUTE, None):
        if keep_hidden:
            return model(**inputs, loss_targets=targets, keep_hidden=True)
        return model(**inputs, loss_targets=targets)
    # use_cache=False: with a cache, transformers skips its packed-sequence mask.
    logits = model(**inputs, use_cache=False).logits
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return LabelLoss(loss_sum, int((targets != IGNORE_INDEX).sum()),
                     logits=logits if keep_hidden else None)


# -- installing the fused forward ------------------------------------------------------------

def install_fused_loss(model: nn.Module, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bool:
    """Makes `model(..., loss_targets=T)` compute the loss chunk by chunk; returns False (and
    changes nothing) when the probe finds the head is not `head(backbone(x))`."""
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    if getattr(model, FUSED_LOSS_ATTRIBUTE, None):
        return True
    if not head_is_linear_map_of_backbone(model):
        return False
    original = model.forward

    def forward(*args: Any, loss_targets: Tensor | None = None, keep_hidden: bool = False,
                **kwargs: Any) -> Any:
        if loss_targets is None:
            return original(*args, **kwargs)
        return _fused_loss(model, kwargs, loss_targets, chunk_size, keep_hidden)

    model.__dict__["forward"] = forward
    setattr(model, FUSED_LOSS_ATTRIBUTE, chunk_size)
    return True


def remove_fused_loss(model: nn.Module) -> None:
    """Gives the model its own forward back (no-op when the fused loss is not installed)."""
    if model.__dict__.pop(FUSED_LOSS_ATTRIBUTE, None):
        model.__dict__.pop("forward", None)


@contextmanager
def fused_loss_installed(model: nn.Module,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[bool]:
    """`install_fused_loss` for the block (yields whether it could); a model that already had
    it installed keeps it afterwards."""
    already = bool(getattr(model, FUSED_LOSS_ATTRIBUTE, None))
    installed = install_fused_loss(model, chunk_size)
    try:
        yield installed
    finally:
        if installed and not already:
            remove_fused_loss(model)


def head_is_linear_map_of_backbone(model: nn.Module) -> bool:
    """Whether the model's logits are its output head applied to its backbone's last hidden
    state, checked on a 3-token probe: anything else (soft-capping, scaling, a nonlinear head, a
    method that adds positions) must take the full-logits path."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return False
    try:
        body = backbone(model)
    except ConfigError:
        return False
    vocabulary = int(getattr(head, "out_features", 0) or getattr(model.config, "vocab_size", 3))
    device = next(model.parameters()).device
    probe = torch.arange(3, device=device)[None] % max(vocabulary, 1)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits
            hidden = _last_hidden_state(body(input_ids=probe, use_cache=False))
            if hidden.shape[:2] != logits.shape[:2]:
                return False
            ours = head(hidden).float()
    finally:
        model.train(was_training)
    theirs = logits.float()
    scale = max(float(theirs.abs().max()), 1.0)
    return ours.shape == theirs.shape and bool(
        torch.allclose(ours, theirs, rtol=1e-3, atol=1e-4 * scale))


def _fused_loss(model: nn.Module, kwargs: dict[str, Any], targets: Tensor,
                chunk_size: int, keep_hidden: bool = False) -> LabelLoss:
    selected, label_mask = labelled_hidden_states(model, kwargs, targets)
    loss_sum = linear_cross_entropy_sum(selected, model.get_output_embeddings(),
                                        targets[label_mask], chunk_size)
    return LabelLoss(loss_sum, int(label_mask.sum()), hidden=selected if keep_hidden else None)


def labelled_hidden_states(model: nn.Module, inputs: dict[str, Any],
                           targets: Tensor) -> tuple[Tensor, Tensor]:
    """The backbone's last hidden state at the positions whose next-token target is labelled,
    (labelled positions, hidden), in row-major order, and the (batch, T-1) mask of them."""
    inputs = {k: v for k, v in inputs.items() if k not in ("token_type_ids", "use_cache")}
    # use_cache=False: with a cache, transformers skips its packed-sequence mask.
    hidden = _last_hidden_state(backbone(model)(**inputs, use_cache=False))
    if hidden.shape[1] != targets.shape[1] + 1:
        raise ConfigError(
            f"the backbone returned {hidden.shape[1]} positions for {targets.shape[1] + 1} "
            "labelled ones; a method that adds positions needs the plain loss path")
    label_mask = targets != IGNORE_INDEX
    return hidden[:, :-1][label_mask], label_mask


def _last_hidden_state(output: Any) -> Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def backbone(model: nn.Module) -> nn.Module:
    """The transformer without its output head (`LlamaForCausalLM.model`, ...)."""
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            decoder = getter()
        except (AttributeError, NotImplementedError):
            decoder = None
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if isinstance(inner, nn.Module) and inner is not model:
        return inner
    raise ConfigError(f"cannot find the backbone of {type(model).__name__}: it has neither "
                      "get_decoder() nor a base_model_prefix attribute")



# -- chunked output head + cross-entropy -----------------------------------------------------

def linear_cross_entropy_sum(hidden: Tensor, head: nn.Module, targets: Tensor,
                             chunk_size: int = 256) -> Tensor:
    """sum_i CE(head(hidden[i]), targets[i]) over rows of `hidden` (N, hidden), computed
    `chunk_size` rows at a time. A plain `nn.Linear` head uses the fused function (gradients in
    the forward pass); any other module runs under per-chunk checkpointing."""
    if hidden.shape[0] == 0:
        # Nothing labelled: a zero that still belongs to the graph, so backward() works.
        return hidden.sum() * 0.0
    if type(head) is nn.Linear and not (head._forward_hooks or head._forward_pre_hooks):
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, hidden.shape[0], chunk_size):
        chunk, chunk_targets = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_module_cross_entropy_sum, head, chunk, chunk_targets,
                                       use_reentrant=False)
        else:
            total = total + _module_cross_entropy_sum(head, chunk, chunk_targets)
    return total


def _module_cross_entropy_sum(head: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    logits = head(hidden)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           reduction="sum")


def _chunk_logits(chunk: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """chunk @ weight.T + bias written into `out` (already in the accumulation dtype)."""
    if chunk.dtype == weight.dtype == out.dtype:
        if bias is None:
            return torch.mm(chunk, weight.t(), out=out)
        return torch.addmm(bias.to(out.dtype), chunk, weight.t(), out=out)
    return out.copy_(F.linear(chunk, weight, bias))


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T + bias`. The forward pass computes each chunk's
    softmax once and turns it straight into the gradients (hidden: (N, hidden) kept; weight and
    bias: accumulated only when they require grad — a frozen tied head costs nothing extra), so
    no logits are stored and backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_size: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        # Half-precision logits lose the softmax's small probabilities: accumulate in fp32.
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        # One logits buffer for all chunks, softmax computed in place in it: no fresh
        # (chunk x vocab) tensor per chunk, and no logsumexp temporary of the same size.
        buffer = torch.empty(min(chunk_size, hidden.shape[0]), weight.shape[0], dtype=accumulate,
                             device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk, chunk_targets = hidden[rows], targets[rows]
            logits = _chunk_logits(chunk, weight, bias, buffer[:chunk.shape[0]])
            target_logits = logits.gather(1, chunk_targets[:, None]).squeeze(1)
            # Softmax in place in the buffer: logits - max -> exp -> / sum.
            row_max = logits.amax(dim=-1)
            exp_sum = logits.sub_(row_max[:, None]).exp_().sum(dim=-1)
            total += (row_max + exp_sum.log() - target_logits).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d(sum CE)/d logits = softmax - one_hot.
            grad_logits = logits.div_(exp_sum[:, None])
            grad_logits[torch.arange(chunk.shape[0], device=chunk.device), chunk_targets] -= 1.0
            add_head_gradients(grad_logits, chunk, weight, rows, grad_hidden, grad_weight,
                               grad_bias)
        save_head_gradients(ctx, weight, bias, grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        return (*scaled_head_gradients(ctx, grad_total), None, None)


def add_head_gradients(grad_logits: Tensor, chunk: Tensor, weight: Tensor, rows: slice,
                       grad_hidden: Tensor | None, grad_weight: Tensor | None,
                       grad_bias: Tensor | None) -> None:
    """One chunk's share of the gradients of a linear head, from d loss / d logits: into
    `grad_hidden[rows]`, and added to the weight and bias gradients (each only when wanted).
    Shared by the fused losses that compute gradients in their forward pass."""
    if grad_hidden is not None:
        torch.mm(grad_logits.to(weight.dtype), weight, out=grad_hidden[rows])
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.t(), chunk.to(grad_weight.dtype))
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0)


def save_head_gradients(ctx: Any, weight: Tensor, bias: Tensor | None,
                        grad_hidden: Tensor | None, grad_weight: Tensor | None,
                        grad_bias: Tensor | None) -> None:
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)


def scaled_head_gradients(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, ...]:
    """backward of a fused loss: the stored (hidden, weight, bias) gradients times the
    incoming gradient of the summed loss, in the inputs' dtypes."""
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    weight_dtype, bias_dtype = ctx.dtypes
    return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype))
