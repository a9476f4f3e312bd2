"""Training objectives: what the loop minimises, as callables `(model, batch) -> ObjectiveOutput`.

An objective computes its main loss term and then adds the `LossTerm`s it was given
(forgetting regularisers, distillation, ...): each term has a name and a weight, its value is
reported in `ObjectiveOutput.terms` under that name and logged by the loop, and the loss that is
back-propagated is `main + sum(weight * term)`. The model is always called as `model(...)`, so a
wrapper's forward (DDP, FSDP) runs; the causal-LM loss is fused with the output head when the job
installed that model change (deltatune.models.fused_loss), and computed from full logits
otherwise — the same value either way. A term that reads the model's logits (distillation)
declares `needs_logits = True`; the causal-LM objective then runs the model once for full logits,
computes the cross-entropy from them (the same value as the fused path) and hands them to every
term as `ObjectiveOutput.logits`. A term that puts the labelled positions through the output head
itself (the KL to the original model) declares `needs_hidden_states = True` instead: the fused
path then hands on the backbone's hidden states at those positions (`ObjectiveOutput.
hidden_states`) and never builds full logits; without the fused head it hands on the logits.
The classification objective always hands its logits on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltatune.data.collate import IGNORE_INDEX, count_input_tokens, model_inputs
from deltatune.errors import ConfigError
from deltatune.models.fused_loss import label_loss_sum, next_token_targets

Batch = dict[str, Tensor]


@dataclass
class ObjectiveOutput:
    """`loss` is what backward sees (the weighted sum of `terms`); `terms` holds each named term's
    unweighted value; `label_tokens` is how many positions carried a label (the main term is
    their mean); `input_tokens` how many real (non-padding) tokens the model processed;
    `logits` the model's full output logits when the objective computed them (classification
    always; causal LM only when a term declares `needs_logits`), else None."""
    loss: Tensor
    label_tokens: int
    input_tokens: int
    terms: dict[str, Tensor] = field(default_factory=dict)
    logits: Tensor | None = None
    # The backbone's last hidden state at the labelled positions (labelled positions, hidden),
    # row-major, when a term declares `needs_hidden_states` and the loss is fused.
    hidden_states: Tensor | None = None


class LossTerm(Protocol):
    """A named addition to an objective's loss. It sees the model, the batch and the output so
    far (the main term's value is `output.terms[main name]`). A term may also declare the class
    attribute `needs_logits = True` (absent means False) to receive `output.logits`; it is not a
    protocol member so that terms without it still satisfy the protocol."""
    name: str
    weight: float

    def __call__(self, model: nn.Module, batch: Batch, output: ObjectiveOutput) -> Tensor: ...


@dataclass
class FunctionTerm:
    """A `LossTerm` from a plain function, for one-off terms and tests."""
    name: str
    function: Callable[[nn.Module, Batch, ObjectiveOutput], Tensor]
    weight: float = 1.0

    def __call__(self, model: nn.Module, batch: Batch, output: ObjectiveOutput) -> Tensor:
        return self.function(model, batch, output)


class Objective:
    """Base of the built-in objectives: the main term (named `main_term`) plus `terms`."""

    main_term = "ce"

    def __init__(self, terms: Sequence[LossTerm] = ()):
        self.terms = list(terms)
        names = [self.main_term, *(term.name for term in self.terms)]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"loss term name(s) {duplicates} used twice; give each term its "
                              "own name (it is the key logged to metrics.jsonl)")

    @property
    def needs_logits(self) -> bool:
        """Whether any term reads `output.logits` (then the model's full logits are computed)."""
        return any(getattr(term, "needs_logits", False) for term in self.terms)

    @property
    def needs_hidden_states(self) -> bool:
        """Whether any term reads `output.hidden_states` (or, unfused, `output.logits`)."""
        return any(getattr(term, "needs_hidden_states", False) for term in self.terms)

    def add_terms(self, model: nn.Module, batch: Batch, output: ObjectiveOutput) -> ObjectiveOutput:
        for term in self.terms:
            value = term(model, batch, output)
            output.terms[term.name] = value
            output.loss = output.loss + term.weight * value
        return output


class CausalLMObjective(Objective):
    """Next-token cross-entropy, mean over labelled tokens (`labels` = -100 elsewhere)."""

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        if self.needs_logits:
            return self._with_logits(model, batch)
        label_loss = label_loss_sum(model, batch, keep_hidden=self.needs_hidden_states)
        loss = label_loss.loss_sum / max(label_loss.label_tokens, 1)
        output = ObjectiveOutput(loss, label_loss.label_tokens, count_input_tokens(batch),
                                 {self.main_term: loss}, logits=label_loss.logits,
                                 hidden_states=label_loss.hidden)
        return self.add_terms(model, batch, output)

    def _with_logits(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        # use_cache=False: with a cache, transformers skips its packed-sequence mask.
        logits = model(**model_inputs(batch), use_cache=False).logits
        loss_sum, label_tokens = next_token_cross_entropy_sum(logits, batch["labels"])
        loss = loss_sum / max(label_tokens, 1)
        output = ObjectiveOutput(loss, label_tokens, count_input_tokens(batch),
                                 {self.main_term: loss}, logits=logits)
        return self.add_terms(model, batch, output)


def next_token_cross_entropy_sum(logits: Tensor, labels: Tensor) -> tuple[Tensor, int]:
    """Summed cross-entropy of position t's logits against token t+1 over the labelled targets,
    and their count: the plain path of `label_loss_sum`, from logits already computed."""
    targets = next_token_targets(labels)
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())


class ClassificationObjective(Objective):
    """Cross-entropy of `model(**inputs).logits` against `labels` (one class index per example),
    mean over the batch."""

    def __call__(self, model: nn.Module, batch: Batch) -> ObjectiveOutput:
        labels = batch["labels"] if "labels" in batch else batch["label"]
        logits = model(**model_inputs(batch)).logits
        loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)),
                               labels)
        output = ObjectiveOutput(loss, int(labels.numel()), count_input_tokens(batch),
                                 {self.main_term: loss}, logits=logits)
        return self.add_terms(model, batch, output)
