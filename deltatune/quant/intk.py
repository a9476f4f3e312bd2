"""Integer quantization formats for frozen weights: int8 per output channel (the layout torch's
`_weight_int8pack_mm` takes), 4- and 2-bit grids in groups of G along in_features ("int4-g128"
symmetric, "int4-g128-asym" and "int2-g64" asymmetric, dequantized the way torch's tinygemm int4
kernel does: w = (q - 2**(bits-1)) * scale + zero), 1-bit signs with a per-group mean-|w| scale
("int1-g64"), and BitNet b1.58 ternary {-1, 0, +1} with an absmean scale ("ternary"). Codes are
packed (`quant.packing`); dequantize is one byte -> levels gather and one multiply-add.
A last group that in_features does not fill is padded (by repeating the row's last value, so
its min/max/absmax are unchanged) and cut off again on dequantize.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from deltatune.errors import ConfigError
from deltatune.quant import packing
from deltatune.quant.formats import (QuantFormat, check_weight, group_size_from,
                                     register_format)


def _grouped(weight: torch.Tensor, group: int, pad: str) -> torch.Tensor:
    """(out, groups, group) view of fp32 `weight`, the last group padded with the row's last
    value ("edge") or with zeros ("zero")."""
    rows, columns = weight.shape
    padding = -columns % group
    if padding:
        fill = weight[:, -1:] if pad == "edge" else weight.new_zeros(rows, 1)
        weight = torch.cat([weight, fill.expand(rows, padding)], dim=1)
    return weight.view(rows, -1, group)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    # A constant (e.g. all-zero) group has scale 0; dividing by 1 instead gives code 0 there,
    # which dequantizes back to the group's value exactly.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _finish(dense: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """(out, padded in) fp32 -> exactly `shape` in `dtype`, contiguous."""
    if dense.shape[1] != shape[1]:
        dense = dense[:, : shape[1]]
    return dense.to(dtype).contiguous() if dense.dtype != dtype or not dense.is_contiguous() \
        else dense


class Int8Format(QuantFormat):
    """Symmetric int8 per output channel: scale = absmax / 127, q = round(w / scale) in
    [-127, 127]. Parts: "codes" int8 (out, in), "scales" fp32 (out,) — exactly the operands of
    `torch.ops.aten._weight_int8pack_mm(x, codes, scales)`."""

    name = "int8"
    bits = 8

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = check_weight(weight, self)
        scales = weight.abs().amax(dim=1) / 127
        codes = torch.round(weight / _safe(scales)[:, None]).clamp(-127, 127)
        return {"codes": codes.to(torch.int8), "scales": scales}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        codes, scales = parts["codes"], parts["scales"]
        out = torch.empty(shape, dtype=dtype, device=codes.device)
        return torch.mul(codes, scales[:, None], out=out)  # computed in fp32, rounded once


class GroupIntFormat(QuantFormat):
    """`bits`-bit integer grid per group of `group` weights along in_features:
    w = (q - mid) * scale + zero, mid = 2**(bits-1), q in [0, 2**bits).

    Symmetric (zero = 0): the smallest scale whose signed grid [-mid, mid-1] covers the group,
    scale = max(max(w) / (mid-1), -min(w) / mid), so no value is clipped and 0 is exact.
    Asymmetric: scale = (max - min) / (2**bits - 1), q = round((w - min) / scale), and
    zero = min + mid * scale — for 4 bits the form torch's tinygemm int4 kernel computes.
    Parts: "codes" uint8 (out, packed bytes per row), "scales" fp32 (out, groups) and, when
    asymmetric, "zeros" fp32 (out, groups)."""

    def __init__(self, bits: int, group: int, symmetric: bool) -> None:
        if bits == 2 and symmetric:  # a symmetric 4-level grid would waste a level or lose 0
            raise ConfigError("int2 formats are asymmetric; use int2-g<group>, e.g. int2-g64")
        self.bits, self.group, self.symmetric = bits, group, symmetric
        self.name = f"int{bits}-g{group}" + ("-asym" if bits == 4 and not symmetric else "")
        self.mid = 1 << (bits - 1)
        self.levels = tuple(float(code - self.mid) for code in range(1 << bits))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group,
                "symmetric": self.symmetric}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = check_weight(weight, self)
        groups = _grouped(weight, self.group, pad="edge")
        high, low = groups.amax(dim=2), groups.amin(dim=2)
        if self.symmetric:
            scales = torch.maximum(high / (self.mid - 1), -low / self.mid).clamp(min=0)
            codes = torch.round(groups / _safe(scales)[..., None]) + self.mid
        else:
            scales = (high - low) / ((1 << self.bits) - 1)
            codes = torch.round((groups - low[..., None]) / _safe(scales)[..., None])
        codes = codes.clamp(0, (1 << self.bits) - 1).view(weight.shape[0], -1)
        parts = {"codes": packing.pack(codes, self.bits), "scales": scales}
        if not self.symmetric:
            parts["zeros"] = low + self.mid * scales
        return parts

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        codes, scales = parts["codes"], parts["scales"]
        table = packing.byte_table(self.levels, self.bits, codes.device)
        columns = scales.shape[1] * self.group
        if codes.shape[1] * (8 // self.bits) == columns:  # no partial byte: gather into place
            values = packing.lookup(table, codes, out=torch.empty(shape[0], columns,
                                                                  device=codes.device))
            dense = values.view(shape[0], -1, self.group).mul_(scales[..., None])
        else:
            values = packing.lookup(table, codes)  # (q - mid) per code
            dense = values[:, :columns].reshape(shape[0], -1, self.group) * scales[..., None]
        if "zeros" in parts:  # separate in-place add: ~4x faster than addcmul's broadcast here
            dense.add_(parts["zeros"][..., None])
        return _finish(dense.view(shape[0], -1), shape, dtype)


class SignFormat(QuantFormat):
    """1-bit signs per group: w = ±scale with scale = mean(|w|) over the group, the scale that
    minimises the L2 error of sign quantization; w >= 0 maps to +scale. Parts: "codes" uint8
    (out, in/8 rounded up; bit 1 = +), "scales" fp32 (out, groups)."""

    bits = 1

    def __init__(self, group: int) -> None:
        self.group = group
        self.name = f"int1-g{group}"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = check_weight(weight, self)
        groups = _grouped(weight, self.group, pad="zero")
        counts = torch.full((groups.shape[1],), float(self.group), device=weight.device)
        counts[-1] = weight.shape[1] - (groups.shape[1] - 1) * self.group  # padding excluded
        scales = groups.abs().sum(dim=2) / counts
        signs = (groups >= 0).view(weight.shape[0], -1)  # padded, like the group formats
        return {"codes": packing.pack(signs, 1), "scales": scales}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        codes, scales = parts["codes"], parts["scales"]
        values = packing.lookup(packing.byte_table((-1.0, 1.0), 1, codes.device), codes)
        groups = values[:, : scales.shape[1] * self.group].view(shape[0], -1, self.group)
        return _finish((groups * scales[..., None]).view(shape[0], -1), shape, dtype)


class TernaryFormat(QuantFormat):
    """BitNet b1.58 ternary weights: scale = mean(|w|) over the whole tensor ("ternary", as the
    paper) or per output row ("ternary-row"), q = clamp(round(w / scale), -1, 1), w = q * scale.
    Codes q + 1 in {0, 1, 2} take 2 bits (four per byte). Parts: "codes" uint8 (out, in/4
    rounded up), "scales" fp32: shape () per tensor, (out, 1) per row."""

    bits = 2

    def __init__(self, per_row: bool) -> None:
        self.per_row = per_row
        self.name = "ternary-row" if per_row else "ternary"

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "per_row": self.per_row}

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        weight = check_weight(weight, self)
        magnitude = weight.abs()
        scales = magnitude.mean(dim=1, keepdim=True) if self.per_row else magnitude.mean()
        codes = torch.round(weight / _safe(scales)).clamp(-1, 1) + 1
        return {"codes": packing.pack(codes, 2), "scales": scales}

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        codes, scales = parts["codes"], parts["scales"]
        table = packing.byte_table((-1.0, 0.0, 1.0, 0.0), 2, codes.device)  # code 3 unused
        values = packing.lookup(table, codes)
        if values.shape[1] != shape[1]:
            values = values[:, : shape[1]]
        out = torch.empty(shape, dtype=dtype, device=codes.device)
        return torch.mul(values, scales, out=out)


def _int_format(match: re.Match[str]) -> QuantFormat:
    bits, name = int(match.group("bits")), match.group(0)
    group = group_size_from(match, name)
    if bits == 1:
        if match.group("asym"):
            raise ConfigError(f"{name!r}: int1 stores signs only; use int1-g{group}")
        return SignFormat(group)
    return GroupIntFormat(bits, group, symmetric=bits == 4 and not match.group("asym"))


register_format(r"int8", "int8", lambda match: Int8Format())
register_format(r"int(?P<bits>[124])-g(?P<group>\d+)(?P<asym>-asym)?",
                "int4-g<group>[-asym], int2-g<group>, int1-g<group>", _int_format)
register_format(r"ternary", "ternary", lambda match: TernaryFormat(per_row=False))
register_format(r"ternary-row", "ternary-row", lambda match: TernaryFormat(per_row=True))
