"""Training objectives: what the loop minimises, as callables `(model, batch) -> ObjectiveOutput`.

`CausalLMObjective` runs only the model's backbone, keeps the hidden states of the positions whose
next token is labelled, and computes the output head and the cross-entropy in chunks of those
positions, so the (batch, sequence, vocabulary) logits never exist: for a 49k-token vocabulary
they are the largest tensors of a training step (and, padded, most of its peak memory). For a
plain `nn.Linear` head a custom autograd function computes each chunk's loss *and* its gradient
in the forward pass and keeps only the (positions, hidden) gradient, so the backward pass does no
extra work; a head wrapped by a method (LoRA on `lm_head`, ...) is called as a module under
per-chunk activation checkpointing instead. Loss and gradients equal the plain
`model(...).logits` + cross-entropy path. Packed batches (see `deltatune.data.packing`) are
recognised by their `position_ids` / `cu_seq_lens` and passed on so attention stays inside each
example. `ClassificationObjective` is cross-entropy on a classification head's logits. Extra loss
terms (regularisers, distillation) are callables `(model, batch, output) -> Tensor` added to the
loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deltatune.errors import ConfigError

IGNORE_INDEX = -100
# Config attributes of models whose head does more than a linear map (soft-capping, scaling):
# those take the plain full-logits path, which the model's own forward gets right.
_NONLINEAR_HEAD_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                              "output_multiplier_scale")
# Batch keys that describe the layout of a packed batch rather than model inputs.
_PACKING_KEYS = ("segment_ids", "cu_seq_lens")


@dataclass
class ObjectiveOutput:
    """The loss to back-propagate, how many tokens carried a label (the loss is their mean) and
    how many real (non-padding) input tokens the model processed."""
    loss: Tensor
    label_tokens: int
    input_tokens: int


ExtraTerm = Callable[[nn.Module, dict[str, Tensor], ObjectiveOutput], Tensor]


class CausalLMObjective:
    """Next-token cross-entropy, mean over labelled tokens (`labels` = -100 elsewhere), without
    materialising the full logits. `chunk_size` is the number of label positions whose logits
    exist at once (chunk_size x vocabulary floats); `chunked=False` takes the plain
    `model(...).logits` path (for comparison and for heads that are not a linear map)."""

    def __init__(self, chunk_size: int = 256, chunked: bool = True,
                 extra_terms: Sequence[ExtraTerm] = ()):
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
        self.chunk_size = chunk_size
        self.chunked = chunked
        self.extra_terms = list(extra_terms)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        labels = batch["labels"]
        targets = labels[:, 1:]
        label_mask = targets != IGNORE_INDEX
        label_tokens = int(label_mask.sum())
        if self.chunked and not _has_nonlinear_head(model):
            hidden = backbone_hidden_states(model, batch)
            if hidden.shape[:2] != labels.shape:
                raise ConfigError(
                    f"the backbone returned {tuple(hidden.shape[:2])} positions for labels of "
                    f"shape {tuple(labels.shape)}; a method that adds positions (prompt tuning) "
                    "needs CausalLMObjective(chunked=False)")
            selected = hidden[:, :-1][label_mask]
            loss_sum = linear_cross_entropy_sum(selected, model.get_output_embeddings(),
                                                targets[label_mask], self.chunk_size)
        else:
            # use_cache=False: with a cache, transformers skips its packed-sequence mask.
            logits = model(**model_inputs(batch), use_cache=False).logits
            loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                       ignore_index=IGNORE_INDEX, reduction="sum")
        output = ObjectiveOutput(loss_sum / max(label_tokens, 1), label_tokens,
                                 count_input_tokens(batch))
        return _add_extra_terms(model, batch, output, self.extra_terms)


class ClassificationObjective:
    """Cross-entropy of `model(**inputs).logits` against `labels` (one class index per example),
    mean over the batch."""

    def __init__(self, extra_terms: Sequence[ExtraTerm] = ()):
        self.extra_terms = list(extra_terms)

    def __call__(self, model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        labels = batch["labels"] if "labels" in batch else batch["label"]
        inputs = {k: v for k, v in model_inputs(batch).items() if k not in ("labels", "label")}
        logits = model(**inputs).logits
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                               labels)
        output = ObjectiveOutput(loss, int(labels.numel()), count_input_tokens(batch))
        return _add_extra_terms(model, batch, output, self.extra_terms)


def _add_extra_terms(model: nn.Module, batch: dict[str, Tensor], output: ObjectiveOutput,
                     extra_terms: list[ExtraTerm]) -> ObjectiveOutput:
    for term in extra_terms:
        output.loss = output.loss + term(model, batch, output)
    return output


# -- model plumbing --------------------------------------------------------------------------

def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch entries the model takes: everything except labels and packing layout; a packed
    batch's `cu_seq_lens` becomes the varlen keyword arguments transformers' flash-attention
    path and deltatune's packed attention both read."""
    inputs = {k: v for k, v in batch.items() if k not in _PACKING_KEYS and k != "labels"}
    if "cu_seq_lens" in batch:
        inputs.update(varlen_kwargs(batch["cu_seq_lens"]))
    return inputs


def varlen_kwargs(cu_seq_lens: Tensor) -> dict[str, Tensor | int]:
    """Segment boundaries (cumulative lengths over the flattened batch) as attention kwargs."""
    cu_seq_lens = cu_seq_lens.to(torch.int32)
    longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
    return {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": longest, "max_length_k": longest}


def count_input_tokens(batch: dict[str, Tensor]) -> int:
    """Real tokens: the attention mask's ones, a packed batch's non-padding segments, or all."""
    if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
        return int(batch["attention_mask"].sum())
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    return int(batch["input_ids"].numel())


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
                      "get_decoder() nor a base_model_prefix attribute; use "
                      "CausalLMObjective(chunked=False)")


def backbone_hidden_states(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Last hidden states (batch, sequence, hidden) of the backbone, without the cache."""
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "token_type_ids"}
    # use_cache=False: with a cache, transformers skips its packed-sequence mask.
    output = backbone(model)(**inputs, use_cache=False)
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def _has_nonlinear_head(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return any(getattr(config, name, None) not in (None, 1, 1.0)
               for name in _NONLINEAR_HEAD_ATTRIBUTES)


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
            if need_hidden:
                torch.mm(grad_logits.to(weight.dtype), weight, out=grad_hidden[rows])
            if need_weight:
                grad_weight.addmm_(grad_logits.t(), chunk.to(accumulate))
            if need_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
            None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype),
            None,
            None,
        )
