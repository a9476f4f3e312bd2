"""NF4 (4-bit NormalFloat) with double quantization, exactly as QLoRA (Dettmers et al. 2023) is
implemented by bitsandbytes on CPU, so weights quantized here are bit-identical to
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
compress_statistics=True)`: the weight is flattened and cut into blocks of 64, each block is
scaled by its absmax and every value takes the nearest of the 16 NF4 levels; two codes share a
byte, the first element in the high nibble. Double quantization stores the 64-blocks' absmax as
8-bit codes of bitsandbytes' signed dynamic map over (absmax - mean) in blocks of 256, plus one
fp32 absmax per 256-block and the mean. "nf4" means with double quantization; "nf4-nodq" keeps
fp32 absmax. Dequantize is one 256-entry table gather (byte -> two levels) and one multiply.
"""
from __future__ import annotations

import functools
import re
from typing import Any

import torch

from deltatune.quant import packing
from deltatune.quant.formats import QuantFormat, check_weight, register_format

BLOCK_SIZE = 64
ABSMAX_BLOCK_SIZE = 256

# The 16 NormalFloat levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact zero), as
# bitsandbytes hard-codes them; written as float32 literals so they are the same floats.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)

# bitsandbytes' CPU 8-bit blockwise quantizer maps a normalised value to one of this many
# evenly spaced bins first and reads the code from a table; matching it bit for bit needs the
# same two-step rounding rather than a true nearest-code search.
_DYNAMIC_LUT_SIZE = 65536


@functools.lru_cache(maxsize=None)
def _nf4_levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _nf4_thresholds(device: torch.device) -> torch.Tensor:
    # A value exactly on a midpoint goes to the lower level (bucketize's right=False), as in bnb.
    levels = _nf4_levels(device)
    return (levels[:-1] + levels[1:]) / 2


@functools.lru_cache(maxsize=None)
def dynamic_map(device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`): for each
    decade 1e-6 .. 1 the midpoints of an evenly spaced grid on [0.1, 1], both signs, plus 0 and
    1, sorted — 256 fp32 values. Built with the same fp32 steps so the values are identical."""
    values: list[float] = []
    for exponent in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** exponent + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = 10 ** (exponent - 6)
        values += (decade * means).tolist()
        values += (-decade * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def _dynamic_lut(device: torch.device) -> torch.Tensor:
    """(65536,) int64: the code for each evenly spaced bin of [-1, 1], nearest by midpoints
    (a bin centre exactly on a midpoint takes the lower code), as bitsandbytes builds it."""
    code = dynamic_map(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    steps = torch.arange(_DYNAMIC_LUT_SIZE, dtype=torch.float32, device=device)
    # fp32 division by a tensor (not a scalar, which torch may turn into a reciprocal multiply).
    centres = -1.0 + (2.0 * steps) / torch.full_like(steps, _DYNAMIC_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, centres, right=False)


def _dynamic_bin(normalised: torch.Tensor) -> torch.Tensor:
    """Bin index of each fp32 value in [-1, 1]: trunc((v + 1) * 0.5 * 65535 + 0.5) with the last
    multiply-add fused (bnb's compiled loop uses one FMA); fp64 makes the product exact and the
    single rounding to fp32 then matches the FMA."""
    half = (normalised.clamp(-1.0, 1.0) + 1.0) * 0.5
    fused = (half.double() * (_DYNAMIC_LUT_SIZE - 1) + 0.5).float()
    return fused.long()


def _blockwise_absmax(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, block) view of `flat` zero-padded to whole blocks, and each block's absmax."""
    padding = -flat.numel() % block
    if padding:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    blocks = flat.view(-1, block)
    return blocks, blocks.abs().amax(dim=1)


def quantize_dynamic_8bit(values: torch.Tensor,
                          block: int = ABSMAX_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8, one per value) and per-block fp32 absmax of a 1-D fp32 tensor in
    bitsandbytes' dynamic map, bit-identical to its CPU `quantize_blockwise`."""
    blocks, absmax = _blockwise_absmax(values, block)
    # A zero block keeps code 0 in bnb; the reciprocal guard only avoids 0 * inf = nan here.
    inverse = 1.0 / absmax
    normalised = blocks * torch.where(absmax > 0, inverse, torch.zeros_like(inverse))[:, None]
    codes = _dynamic_lut(values.device)[_dynamic_bin(normalised)]
    codes = torch.where((absmax > 0)[:, None], codes, torch.zeros_like(codes))
    return codes.reshape(-1)[: values.numel()].to(torch.uint8), absmax


def dequantize_dynamic_8bit(codes: torch.Tensor, absmax: torch.Tensor,
                            block: int = ABSMAX_BLOCK_SIZE) -> torch.Tensor:
    """fp32 values of `quantize_dynamic_8bit`'s codes: code[q] * absmax of q's block."""
    values = dynamic_map(codes.device)[codes.long()]
    padding = -values.numel() % block
    if padding:
        values = torch.cat([values, values.new_zeros(padding)])
    return (values.view(-1, block) * absmax[:, None]).reshape(-1)[: codes.numel()]


def quantize_nf4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 codes ((n + 1) // 2 uint8) and fp32 absmax per 64-block of the flattened
    fp32 `weight`; an odd element count is padded with the code of 0."""
    blocks, absmax = _blockwise_absmax(weight.reshape(-1), BLOCK_SIZE)
    # Multiply by the reciprocal (not divide) and clamp the all-zero block's absmax, as bnb does,
    # so values on a level's boundary round the same way.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1)
    scaled = scaled.reshape(-1)[: weight.numel() + weight.numel() % 2]
    codes = torch.bucketize(scaled, _nf4_thresholds(weight.device), out_int32=True)
    return packing.pack(codes, 4), absmax


def dequantize_nf4_blocks(codes: torch.Tensor, absmax: torch.Tensor, numel: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """Flat (numel,) weight in `dtype`: NF4[code] * absmax, computed in fp32 (as bnb does) and
    rounded once to `dtype`."""
    table = packing.byte_table(NF4_LEVELS, 4, codes.device)
    full = absmax.numel() * BLOCK_SIZE
    if full == 2 * codes.numel() and dtype == torch.float32:
        # common case: gather straight into the output and scale it in place (one buffer)
        values = packing.lookup(table, codes, out=torch.empty(full, device=codes.device))
        values.view(-1, BLOCK_SIZE).mul_(absmax[:, None])
        return values
    values = packing.lookup(table, codes)
    if values.numel() != full:  # the last block is partial: pad it, cut it off after
        values = torch.cat([values, values.new_zeros(full - values.numel())])
    out = torch.empty(full, dtype=dtype, device=codes.device)
    torch.mul(values.view(-1, BLOCK_SIZE), absmax[:, None], out=out.view(-1, BLOCK_SIZE))
    return out[:numel] if full != numel else out


class NF4Format(QuantFormat):
    """NF4 in blocks of 64 over the flattened weight, with or without double quantization."""

    bits = 4

    def __init__(self, double_quant: bool = True) -> None:
        self.double_quant = double_quant
        self.name = "nf4" if double_quant else "nf4-nodq"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "block_size": BLOCK_SIZE,
                "double_quant": self.double_quant,
                "absmax_block_size": ABSMAX_BLOCK_SIZE if self.double_quant else None}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = check_weight(weight, self)
        codes, absmax = quantize_nf4_blocks(weight)
        if not self.double_quant:
            return {"codes": codes, "absmax": absmax}
        offset = absmax.mean()
        absmax_codes, absmax_scales = quantize_dynamic_8bit(absmax - offset)
        return {"codes": codes, "absmax_codes": absmax_codes, "absmax_scales": absmax_scales,
                "absmax_offset": offset}

    def absmax(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """fp32 absmax per 64-block (rebuilt from its 8-bit codes under double quantization)."""
        if not self.double_quant:
            return parts["absmax"]
        return dequantize_dynamic_8bit(parts["absmax_codes"], parts["absmax_scales"]) \
            + parts["absmax_offset"]

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        numel = shape[0] * shape[1]
        return dequantize_nf4_blocks(parts["codes"], self.absmax(parts), numel, dtype).view(shape)


register_format(r"nf4", "nf4", lambda match: NF4Format(double_quant=True))
register_format(r"nf4-nodq", "nf4-nodq", lambda match: NF4Format(double_quant=False))
