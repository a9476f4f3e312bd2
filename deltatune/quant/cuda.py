"""On CUDA, NF4 weights run through bitsandbytes' kernels when it is installed: deltatune's NF4
parts are bit-identical to bitsandbytes' (tests/quant/test_nf4.py), so they are handed over as a
`QuantState` without conversion and `bitsandbytes.matmul_4bit` computes x @ W^T + b (forward
and the input gradient). Other formats, other devices, or no bitsandbytes: None, and the caller
dequantizes with torch ops (which run on CUDA too). Tested only where a GPU is present
(tests/quant/test_cuda.py skips otherwise)."""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from deltatune.quant.nf4 import ABSMAX_BLOCK_SIZE, BLOCK_SIZE

_NF4_NAMES = ("nf4", "nf4-nodq")


@functools.lru_cache(maxsize=1)
def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes


def bitsandbytes_linear(x: Tensor, weight: Any, bias: Tensor | None) -> Tensor | None:
    """F.linear(x, weight, bias) for a CUDA NF4 `QuantizedTensor` with bitsandbytes' kernels,
    or None where they do not apply."""
    if weight.device.type != "cuda" or weight.quant_format.name not in _NF4_NAMES:
        return None
    bnb = _bitsandbytes()
    if bnb is None:
        return None
    state = weight.inference_cache.get("bitsandbytes_state")
    if state is None or state.dtype != weight.dtype:
        state = quant_state(bnb, weight)
        weight.inference_cache["bitsandbytes_state"] = state
    packed = weight.parts["codes"].reshape(-1, 1)
    return bnb.matmul_4bit(x, packed.t(), quant_state=state,
                           bias=None if bias is None else bias.to(x.dtype))


def quant_state(bnb: Any, weight: Any) -> Any:
    """bitsandbytes' QuantState for the weight's NF4 parts (double quantized or not)."""
    functional = bnb.functional
    parts = weight.parts
    code = functional.get_4bit_type("nf4", device=weight.device)
    common = {"shape": torch.Size(weight.shape), "code": code, "blocksize": BLOCK_SIZE,
              "quant_type": "nf4", "dtype": weight.dtype}
    if "absmax" in parts:
        return functional.QuantState(absmax=parts["absmax"], **common)
    nested = functional.QuantState(absmax=parts["absmax_scales"],
                                   code=functional.create_dynamic_map(signed=True).to(
                                       weight.device),
                                   blocksize=ABSMAX_BLOCK_SIZE, dtype=torch.float32)
    return functional.QuantState(absmax=parts["absmax_codes"], offset=parts["absmax_offset"],
                                 state2=nested, **common)
