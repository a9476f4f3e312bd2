"""Sequence classification on packed rows: many short sentences side by side in one row instead
of a padded batch (SST-2 sentences of 32 padded to the longest are two thirds padding).

Attention stays inside each sentence (deltatune.train.packed_attention reads the row's
`cu_seq_lens`), positions restart per sentence, and a forward hook on the encoder (the module
that holds the block stack) replaces its (1, tokens, hidden) output by the first token of every
sentence, (sentences, 1, hidden): the model's own pooler and classification head then produce
one row of logits per sentence, exactly as for a padded batch. This fits every head that reads
the first token ([CLS]: BERT, RoBERTa, DistilBERT, ...). `install_packed_classification` proves
it on a probe — packed logits must equal the padded ones — and refuses otherwise (a decoder's
last-token `score` head, a model whose encoder is not found), so such models are padded, never
mis-pooled.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from deltatune.data.collate import varlen_kwargs
from deltatune.train.packed_attention import PACKED_ATTENTION, register_packed_attention

HOOK_ATTRIBUTE = "_deltatune_packed_classification_hook"
_PROBE_LENGTHS = (3, 5)


def install_packed_classification(model: nn.Module) -> bool:
    """Makes `model(input_ids=row, position_ids=..., cu_seq_lens_q=..., ...)` return one row of
    logits per packed sentence; False (nothing installed) when the probe disagrees."""
    if getattr(model, HOOK_ATTRIBUTE, None) is not None:
        return True
    encoder = _encoder(model)
    if encoder is None:
        return False
    handle = encoder.register_forward_hook(_first_token_of_each_segment, with_kwargs=True)
    model.__dict__[HOOK_ATTRIBUTE] = handle
    if not _probe_agrees(model):
        remove_packed_classification(model)
        return False
    return True


def remove_packed_classification(model: nn.Module) -> None:
    handle = model.__dict__.pop(HOOK_ATTRIBUTE, None)
    if handle is not None:
        handle.remove()


def can_pack_classification(model: nn.Module) -> bool:
    """Whether packed rows classify exactly like padded batches on this model (probe only)."""
    already = getattr(model, HOOK_ATTRIBUTE, None) is not None
    installed = install_packed_classification(model)
    if installed and not already:
        remove_packed_classification(model)
    return installed


def _encoder(model: nn.Module) -> nn.Module | None:
    """The parent of the model's largest ModuleList (BERT's `bert.encoder` of `encoder.layer`)."""
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module)]
    if not lists:
        return None
    name, _ = max(lists, key=lambda item: len(item[1]))
    parent = name.rpartition(".")[0]
    return model.get_submodule(parent) if parent else None


def _first_token_of_each_segment(module: nn.Module, args: tuple, kwargs: dict[str, Any],
                                 output: Any) -> Any:
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None:
        return None  # a padded batch: nothing to do
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    starts = boundaries[:-1].to(device=hidden.device, dtype=torch.long)
    first_tokens = hidden.reshape(-1, hidden.shape[-1]).index_select(0, starts)[:, None, :]
    if hasattr(output, "last_hidden_state"):
        output.last_hidden_state = first_tokens
        return output
    return (first_tokens, *output[1:])


def _probe_agrees(model: nn.Module) -> bool:
    vocabulary = int(getattr(model.config, "vocab_size", 100))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    sentences = [torch.randint(0, vocabulary, (n,), generator=generator) for n in _PROBE_LENGTHS]
    width = max(_PROBE_LENGTHS)
    padded = torch.zeros(len(sentences), width, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, ids in enumerate(sentences):
        padded[row, :len(ids)], mask[row, :len(ids)] = ids, 1
    row = torch.cat(sentences)[None]
    positions = torch.cat([torch.arange(n) for n in _PROBE_LENGTHS])[None]
    boundaries = torch.tensor([0, *torch.tensor(_PROBE_LENGTHS).cumsum(0).tolist()])
    attention = model.config._attn_implementation
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(input_ids=padded.to(device), attention_mask=mask.to(device)).logits
            model.set_attn_implementation(register_packed_attention())
            extra = {"token_type_ids": torch.zeros_like(row).to(device)} \
                if "token_type_ids" in inspect.signature(model.forward).parameters else {}
            packed = model(input_ids=row.to(device), position_ids=positions.to(device),
                           **extra, **varlen_kwargs(boundaries.to(device))).logits
    except (TypeError, ValueError, RuntimeError, IndexError):
        return False
    finally:
        if model.config._attn_implementation == PACKED_ATTENTION and attention != PACKED_ATTENTION:
            model.set_attn_implementation(attention)
        model.train(was_training)
    scale = max(float(expected.abs().max()), 1.0)
    return packed.shape == expected.shape and bool(
        torch.allclose(packed.float(), expected.float(), rtol=1e-4, atol=1e-5 * scale))
