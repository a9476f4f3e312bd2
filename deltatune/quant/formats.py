"""Number formats for quantized frozen weights: the `QuantFormat` contract every family (NF4 in
`quant.nf4`, integer grids in `quant.intk`) implements, and `get_format`, which turns a format name
such as "nf4", "int4-g128-asym" or "int2-g64" into the format object. A format turns a 2-D
(out, in) weight into named plain tensors (packed codes, scales, ...) and back; nothing else is
kept, so the parts alone can be saved with safetensors and rebuilt with `get_format(config["name"])`.
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable

import torch

from deltatune.errors import ConfigError

# The standard formats shown in --help; any group size parses (see `_PATTERNS`).
FORMAT_NAMES: tuple[str, ...] = ("nf4", "int8", "int4-g128", "int4-g128-asym", "int2-g64",
                                 "int1-g64", "ternary")

# Families register themselves on import; importing them here lazily avoids an import cycle
# (they subclass QuantFormat from this module).
_FAMILY_MODULES = ("deltatune.quant.nf4", "deltatune.quant.intk")
_PATTERNS: list[tuple[re.Pattern[str], str, Callable[[re.Match[str]], "QuantFormat"]]] = []


class QuantFormat:
    """One number format. Subclasses set `name` and `bits` and implement `quantize`/`dequantize`."""

    name: str = ""
    bits: int = 0

    def quantize(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named plain tensors (on `weight`'s device) that rebuild the (out, in) `weight`; the
        quantization itself is computed in fp32 whatever `weight`'s float dtype."""
        raise NotImplementedError

    def dequantize(self, parts: dict[str, torch.Tensor], shape: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
        """The dense (out, in) weight in `dtype`, built from `parts` without Python loops."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able description; `get_format(config()["name"])` rebuilds this format."""
        return {"name": self.name, "bits": self.bits}

    def storage_bytes(self, parts: dict[str, torch.Tensor]) -> int:
        """Bytes of all parts, which is everything kept for this weight."""
        return sum(part.numel() * part.element_size() for part in parts.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, QuantFormat) and other.config() == self.config()

    def __hash__(self) -> int:
        return hash(self.name)


def register_format(pattern: str, description: str,
                    factory: Callable[[re.Match[str]], QuantFormat]) -> None:
    """Makes names matching the regex `pattern` (whole name) build `factory(match)`;
    `description` is what the unknown-name error shows, e.g. "int4-g<group>"."""
    _PATTERNS.append((re.compile(pattern), description, factory))


def get_format(name: str) -> QuantFormat:
    """The format called `name` (case-insensitive), e.g. "nf4", "int8", "int4-g32-asym"."""
    for module in _FAMILY_MODULES:
        importlib.import_module(module)
    key = str(name).strip().lower()
    for pattern, _, factory in _PATTERNS:
        match = pattern.fullmatch(key)
        if match is not None:
            return factory(match)
    patterns = ", ".join(description for _, description, _ in _PATTERNS)
    raise ConfigError(f"unknown quantization format {name!r}; use one of "
                      f"{', '.join(FORMAT_NAMES)} (patterns: {patterns}; the group size is a "
                      f"positive integer, e.g. int4-g32)")


def group_size_from(match: re.Match[str], name: str) -> int:
    """The group size parsed from a format name, refusing 0 (it would mean empty groups)."""
    group = int(match.group("group"))
    if group < 1:
        raise ConfigError(f"format {name!r} has group size 0; use a positive group size such as "
                          f"{name.split('-g')[0]}-g64")
    return group


def check_weight(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """`weight` as a 2-D fp32 tensor, refusing what no format can quantize."""
    if weight.dim() != 2:
        raise ConfigError(f"format {fmt.name!r} quantizes 2-D (out, in) weights, got shape "
                          f"{tuple(weight.shape)}; quantize only linear layers' weights")
    if not weight.is_floating_point():
        raise ConfigError(f"format {fmt.name!r} quantizes float weights, got {weight.dtype}; "
                          f"pass the dense weight, not already quantized codes")
    if weight.numel() == 0:
        raise ConfigError(f"format {fmt.name!r} cannot quantize an empty weight of shape "
                          f"{tuple(weight.shape)}")
    return weight.detach().float()
