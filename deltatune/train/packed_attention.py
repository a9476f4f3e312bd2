"""Attention for packed batches that computes only the blocks that exist.

Given packed `position_ids` and no attention mask, transformers' SDPA path builds a
block-diagonal (rows, 1, length, length) mask and still computes every query against every key of
the row: for one row holding a whole batch of Alpaca examples (~1600 tokens, ~200 each) that is
about 8x the attention work actually needed, plus the mask. The function here is registered with
transformers' `AttentionInterface` under `PACKED_ATTENTION` and, when the model is called with the
varlen keyword arguments of a packed batch (`cu_seq_lens_q`, see `deltatune.data.packing`), runs
causal SDPA once per segment (example). Without them it is exactly transformers' SDPA, masks
included, so a model switched to it still handles ordinary padded batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "deltatune_packed_sdpa"


def packed_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None,
                          cu_seq_lens_q: Tensor | None = None,
                          **kwargs) -> tuple[Tensor, None]:
    """transformers attention-function signature; query (rows, heads, length, head_dim).
    Returns (rows, length, heads, head_dim) like transformers' SDPA."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return _per_segment_attention(module, query, key, value, dropout, scaling, is_causal,
                                  cu_seq_lens_q)


# Segment lengths are data (a host sync and a Python loop): kept out of torch.compile graphs.
@torch.compiler.disable
def _per_segment_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           dropout: float, scaling: float | None, is_causal: bool | None,
                           cu_seq_lens: Tensor) -> tuple[Tensor, None]:
    rows, _, length, _ = query.shape
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    lengths = segment_lengths_per_row(cu_seq_lens, rows, length)
    outputs = []
    for row in range(rows):
        pieces = zip(query[row:row + 1].split(lengths[row], dim=2),
                     key[row:row + 1].split(lengths[row], dim=2),
                     value[row:row + 1].split(lengths[row], dim=2))
        # Splitting (not slicing) keeps backward to one concatenation instead of a zero-filled
        # full-size gradient per segment.
        outputs.extend(
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                           is_causal=causal).transpose(1, 2)
            for q, k, v in pieces)
    output = torch.cat(outputs, dim=1)
    return output.view(rows, length, *output.shape[2:]), None


def segment_lengths_per_row(cu_seq_lens: Tensor, rows: int, length: int) -> list[list[int]]:
    """Segment lengths of each row from boundaries over the flattened (rows * length) batch."""
    boundaries = cu_seq_lens.tolist()
    if boundaries[0] != 0 or boundaries[-1] != rows * length:
        raise ValueError(f"cu_seq_lens {boundaries[:3]}...{boundaries[-1:]} does not cover a "
                         f"batch of {rows} rows x {length} tokens")
    per_row: list[list[int]] = [[] for _ in range(rows)]
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        row = start // length
        if (end - 1) // length != row:
            raise ValueError(f"segment [{start}, {end}) crosses a row boundary (row length "
                             f"{length}); packed segments must stay within one row")
        per_row[row].append(end - start)
    return per_row


def register_packed_attention() -> str:
    """Registers the function (and SDPA's mask builder for padded batches) under
    `PACKED_ATTENTION`; returns the name. Idempotent."""
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    return PACKED_ATTENTION


def enable_packed_attention(model: nn.Module) -> None:
    """Switches a transformers model to the packed attention function."""
    model.set_attn_implementation(register_packed_attention())
