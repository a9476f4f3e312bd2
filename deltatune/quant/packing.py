"""Bit packing for quantized weights: 4-, 2- and 1-bit codes packed into uint8 along the last
dimension (two, four or eight codes per byte, the first code in the most significant bits, the
order bitsandbytes uses for NF4), vectorized with shifts, and byte -> codes tables that let a
dequantize unpack a whole weight with a single gather."""
from __future__ import annotations

import functools

import torch

from deltatune.errors import ConfigError

PACKABLE_BITS = (1, 2, 4, 8)


def codes_per_byte(bits: int) -> int:
    """How many `bits`-wide codes one byte holds."""
    if bits not in PACKABLE_BITS:
        raise ConfigError(f"cannot pack {bits}-bit codes; use one of {PACKABLE_BITS} bits")
    return 8 // bits


def packed_length(count: int, bits: int) -> int:
    """Bytes that `count` codes of `bits` bits take (the last byte zero-filled)."""
    return -(-count // codes_per_byte(bits))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., packed_length(n, bits)) holding the (..., n) integer `codes` (each in
    [0, 2**bits)); a partial last byte is filled with code 0."""
    per_byte = codes_per_byte(bits)
    codes = codes.to(torch.uint8)
    if per_byte == 1:
        return codes.contiguous()
    count = codes.shape[-1]
    padding = -count % per_byte
    if padding:
        codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], padding)], dim=-1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte)
    shifts = _shifts(bits, codes.device)
    # The shifted fields do not overlap, so their sum is their bitwise or.
    return (grouped << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 (..., count) codes from `pack`'s output."""
    per_byte = codes_per_byte(bits)
    if per_byte == 1:
        return packed[..., :count]
    mask = (1 << bits) - 1
    fields = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & mask
    codes = fields.reshape(*packed.shape[:-1], -1)
    return codes[..., :count] if codes.shape[-1] != count else codes


@functools.lru_cache(maxsize=None)
def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    per_byte = 8 // bits
    return torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8, device=device) * bits


@functools.lru_cache(maxsize=None)
def _wide_dtype(width: int) -> torch.dtype | None:
    return {4: torch.float32, 8: torch.int64, 16: torch.complex128}.get(width)


def byte_table(levels: tuple[float, ...], bits: int,
               device: torch.device) -> torch.Tensor:
    """(256, codes_per_byte) fp32: the `levels[code]` of each code a byte holds, in order. When
    a row is 4, 8 or 16 bytes wide it is returned viewed as one element of that size, because
    torch gathers single elements several times faster than rows (see `lookup`)."""
    return _byte_table(tuple(float(level) for level in levels), bits, device)


@functools.lru_cache(maxsize=None)
def _byte_table(levels: tuple[float, ...], bits: int, device: torch.device) -> torch.Tensor:
    if len(levels) != 1 << bits:
        raise ValueError(f"{bits}-bit codes need {1 << bits} levels, got {len(levels)}")
    byte = torch.arange(256, dtype=torch.uint8, device=device)
    codes = unpack(byte.view(256, 1), bits, codes_per_byte(bits)).long()
    table = torch.tensor(levels, dtype=torch.float32, device=device)[codes].contiguous()
    wide = _wide_dtype(4 * table.shape[1])
    return table.view(wide).view(256) if wide is not None else table


def lookup(table: torch.Tensor, packed: torch.Tensor,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 levels of every code in `packed` (uint8, any shape): (*packed.shape, codes_per_byte)
    flattened into the last dimension, written into the contiguous fp32 `out` when given (of
    exactly that many elements), which saves allocating — and page-faulting — a second
    weight-sized buffer for large layers."""
    indices = packed.reshape(-1).int()  # int32: index_select's fastest CPU gather, no int64 copy
    if out is None:
        values = torch.index_select(table, 0, indices)
        return values.view(torch.float32).view(*packed.shape[:-1], -1)
    target = out.view(-1).view(table.dtype)
    torch.index_select(table, 0, indices, out=target.view(indices.numel(), *table.shape[1:]))
    return out.view(*packed.shape[:-1], -1)
