"""KL to the original model: a loss term that keeps a fine-tuned language model's next-token
distributions close to the ones the model had before training, on the training batch's labelled
positions (replayed examples included, when replay is on).

    kl = T^2 * mean over labelled positions of KL(original_T || tuned_T)

The direction is the distillation one (the original is the teacher): the tuned model is pulled
towards covering everything the original found likely. The original costs no second copy for
methods that can switch their delta off (`handle.disabled()`: LoRA, IA3, adapters, ...); full
fine-tuning keeps a frozen copy made before training (`OriginalModel.frozen_copy`). Either way it
runs without a graph, once per micro-batch: about one extra forward pass per step.

No full-vocabulary logits are built for the batch: the causal-LM objective hands over the tuned
backbone's hidden states at the labelled positions (`needs_hidden_states`), the original's are
computed the same way, and both go through their output heads a chunk of positions at a time.
For a plain linear head a custom autograd function computes each chunk's KL and its gradient in
the forward pass (the gradient of KL(p || softmax(z/T)) with respect to z is (softmax(z/T) - p)/T)
and keeps only the (positions, hidden) gradient, like the fused cross-entropy; any other head
runs under per-chunk activation checkpointing. Without the fused head (a model whose head is not
a linear map of its backbone) the objective hands over full logits and the term uses those.
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deltatune.data.collate import model_inputs
from deltatune.errors import ConfigError
from deltatune.models.fused_loss import (DEFAULT_CHUNK_SIZE, add_head_gradients,
                                         labelled_hidden_states, next_token_targets,
                                         save_head_gradients, scaled_head_gradients, unwrap)
from deltatune.train.objectives import ObjectiveOutput

Batch = dict[str, Tensor]


class OriginalModel:
    """The model as it was before training, for the KL term: either the trained model itself
    inside `handle.disabled()` (no copy) or a frozen copy. Build it before training starts."""

    def __init__(self, model: nn.Module, disabled: Callable[[], Any] | None = None):
        self.model, self._disabled = model, disabled

    @classmethod
    def for_handle(cls, handle: Any) -> "OriginalModel":
        """The handle's model with its delta switched off when the method supports it, else a
        frozen copy of the model as it is now (full fine-tuning, freezing)."""
        if getattr(handle, "supports_disable", False):
            return cls(handle.model, handle.disabled)
        return cls.frozen_copy(handle.model)

    @classmethod
    def frozen_copy(cls, model: nn.Module) -> "OriginalModel":
        original = copy.deepcopy(unwrap(model))
        for parameter in original.parameters():
            parameter.requires_grad_(False)
        return cls(original.eval())

    @property
    def is_copy(self) -> bool:
        return self._disabled is None

    def context(self):
        return self._disabled() if self._disabled is not None else nullcontext()

    def head(self, model: nn.Module) -> nn.Module:
        source = unwrap(model) if self._disabled is not None else self.model
        return source.get_output_embeddings()

    def labelled_hidden(self, model: nn.Module, batch: Batch) -> Tensor:
        """The original backbone's last hidden state at the batch's labelled positions."""
        source = unwrap(model) if self._disabled is not None else self.model
        targets = next_token_targets(batch["labels"])
        with torch.no_grad(), self.context(), _eval_mode(source):
            hidden, _ = labelled_hidden_states(source, model_inputs(batch), targets)
        return hidden

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        source = unwrap(model) if self._disabled is not None else self.model
        with torch.no_grad(), self.context(), _eval_mode(source):
            return source(**model_inputs(batch), use_cache=False).logits


class KLToOriginal:
    """T^2 * mean KL(original_T || tuned_T) over the labelled positions (see the module
    docstring); total loss = ce + weight * kl."""

    needs_hidden_states = True

    def __init__(self, original: OriginalModel, weight: float, temperature: float = 1.0,
                 name: str = "kl", chunk_size: int = DEFAULT_CHUNK_SIZE):
        if temperature <= 0:
            raise ConfigError(f"kl_temperature must be positive, got {temperature}")
        if weight < 0:
            raise ConfigError(f"kl_weight must be zero or more, got {weight}")
        self.original, self.weight, self.temperature = original, float(weight), float(temperature)
        self.name, self.chunk_size = name, chunk_size

    def __call__(self, model: nn.Module, batch: Batch, output: ObjectiveOutput) -> Tensor:
        if output.hidden_states is not None:
            kl_sum, positions = self._from_hidden(model, batch, output.hidden_states)
        elif output.logits is not None and output.logits.dim() == 3:
            kl_sum, positions = self._from_logits(model, batch, output.logits)
        else:
            raise ConfigError("the KL to the original model is for language models (causal-lm "
                              "and text tasks); for a classifier use replay, EWC or L2-SP")
        return kl_sum * self.temperature ** 2 / max(positions, 1)

    def _from_hidden(self, model: nn.Module, batch: Batch, hidden: Tensor) -> tuple[Tensor, int]:
        reference_hidden = self.original.labelled_hidden(model, batch)
        if reference_hidden.shape != hidden.shape:
            raise ConfigError(f"the original model has {reference_hidden.shape[0]} labelled "
                              f"positions and the tuned one {hidden.shape[0]}; the KL to the "
                              "original needs a method that adds no positions (not prompt or "
                              "prefix tuning)")
        head = unwrap(model).get_output_embeddings()
        reference_head = self.original.head(model)
        kl_sum = linear_kl_sum(hidden, head, reference_hidden, reference_head, self.temperature,
                               self.chunk_size, self.original.context)
        return kl_sum, hidden.shape[0]

    def _from_logits(self, model: nn.Module, batch: Batch, logits: Tensor) -> tuple[Tensor, int]:
        mask = next_token_targets(batch["labels"]) != -100
        tuned = logits[:, :-1][mask]
        reference = self.original.logits(model, batch)
        if reference.shape != logits.shape:
            raise ConfigError("the original model's logits have another shape than the tuned "
                              "model's; the KL to the original needs a method that adds no "
                              "positions (not prompt or prefix tuning)")
        reference = reference[:, :-1][mask]
        kl_sum = _kl_sum(reference.float() / self.temperature, tuned.float() / self.temperature)
        return kl_sum, tuned.shape[0]


class _eval_mode:
    """Eval mode for the block (the original's predictions without dropout), restored after."""

    def __init__(self, module: nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self) -> None:
        if self.was_training:
            self.module.eval()

    def __exit__(self, *exc: Any) -> None:
        if self.was_training:
            self.module.train()


def _kl_sum(reference_logits: Tensor, tuned_logits: Tensor) -> Tensor:
    """sum over rows of KL(softmax(reference) || softmax(tuned)), from (already softened)
    logits; zero-probability reference entries contribute zero."""
    reference_log_probs = F.log_softmax(reference_logits, dim=-1)
    tuned_log_probs = F.log_softmax(tuned_logits, dim=-1)
    return F.kl_div(tuned_log_probs, reference_log_probs, log_target=True, reduction="sum")


def linear_kl_sum(hidden: Tensor, head: nn.Module, reference_hidden: Tensor,
                  reference_head: nn.Module, temperature: float = 1.0,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  reference_context: Callable[[], Any] = nullcontext) -> Tensor:
    """sum_i KL(softmax(ref_head(ref_hidden[i])/T) || softmax(head(hidden[i])/T)) over the
    rows, `chunk_size` rows at a time, never all logits at once. `reference_context` is entered
    around every use of `reference_head` (the original inside `handle.disabled()`)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    if _plain_linear(head) and _plain_linear(reference_head):
        with torch.no_grad(), reference_context():
            # The disabled head's weights are the base weights; read them inside the context.
            reference = (reference_head.weight, reference_head.bias)
        return _LinearKL.apply(hidden, head.weight, head.bias, reference_hidden, reference[0],
                               reference[1], temperature, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)

        def chunk_kl(chunk: Tensor, reference_chunk: Tensor) -> Tensor:
            with torch.no_grad(), reference_context():
                reference_logits = reference_head(reference_chunk).float() / temperature
            return _kl_sum(reference_logits, head(chunk).float() / temperature)

        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_kl, hidden[rows], reference_hidden[rows],
                                       use_reentrant=False)
        else:
            total = total + chunk_kl(hidden[rows], reference_hidden[rows])
    return total


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and not (module._forward_hooks or module._forward_pre_hooks)


def _linear_into(rows: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    if rows.dtype == weight.dtype == out.dtype and bias is None:
        return torch.mm(rows, weight.t(), out=out)
    return out.copy_(F.linear(rows, weight, bias))


class _LinearKL(torch.autograd.Function):
    """Summed KL(softmax(z0/T) || softmax(z/T)) with z = hidden @ W.T + b (trainable side) and
    z0 = reference_hidden @ W0.T + b0 (no gradient). The forward pass turns each chunk's
    softmaxes straight into the gradients, as deltatune.models.fused_loss does for the
    cross-entropy, so no logits are kept for backward."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                reference_hidden: Tensor, reference_weight: Tensor,
                reference_bias: Tensor | None, temperature: float, chunk_size: int) -> Tensor:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        accumulate = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=accumulate) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=accumulate) if need_bias else None
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        rows_per_chunk = min(chunk_size, hidden.shape[0])
        tuned_buffer = torch.empty(rows_per_chunk, weight.shape[0], dtype=accumulate,
                                   device=hidden.device)
        reference_buffer = torch.empty_like(tuned_buffer)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = hidden[rows]
            count = chunk.shape[0]
            tuned = _linear_into(chunk, weight, bias, tuned_buffer[:count]).div_(temperature)
            reference = _linear_into(reference_hidden[rows], reference_weight, reference_bias,
                                     reference_buffer[:count]).div_(temperature)
            tuned.sub_(torch.logsumexp(tuned, dim=-1, keepdim=True))  # log q
            reference.sub_(torch.logsumexp(reference, dim=-1, keepdim=True))  # log p
            probabilities = reference.exp()
            total += (probabilities * (reference - tuned)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d KL / d z = (q - p) / T, written into the tuned buffer.
            grad_logits = tuned.exp_().sub_(probabilities).div_(temperature)
            add_head_gradients(grad_logits, chunk, weight, rows, grad_hidden, grad_weight,
                               grad_bias)
        save_head_gradients(ctx, weight, bias, grad_hidden, grad_weight, grad_bias)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        return (*scaled_head_gradients(ctx, grad_total), None, None, None, None, None)
