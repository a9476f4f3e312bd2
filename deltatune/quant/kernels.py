"""Inference kernels for quantized linear layers: `quantized_linear_inference` computes
F.linear(x, W, bias) for a packed weight with the fastest kernel available for its format, its
shape and the number of tokens (rows of x, bucketed as 1, 2-16, >16). Candidates are
dequantize + F.linear in fp32, the same in bf16 (only where the CPU has native bf16), torch's
int8 weight-only kernel (`_weight_int8pack_mm`, int8) and tinygemm's int4 CPU kernel
(`_weight_int4pack_mm_for_cpu`, int4 group formats). The first call for a (format, shape,
bucket, dtype) times every candidate and remembers the winner for the process;
`kernel_choices()` reports what was picked and the milliseconds measured. No gradients: for
training the weight is dequantized instead (see quant.tensor).

Accuracy against dequantize + fp32 F.linear: fp32 candidates agree to float rounding (relative
error of the output <= FP32_TOLERANCE); bf16 ones round activations, weight and output to bf16
(<= BF16_TOLERANCE). The result is always returned in x's dtype.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from deltatune.quant import packing
from deltatune.quant.formats import QuantFormat
from deltatune.quant.intk import GroupIntFormat

# Relative error ||y - y_ref|| / ||y_ref|| every candidate keeps (checked in the tests).
FP32_TOLERANCE = 1e-5
BF16_TOLERANCE = 1e-2

# Timing: a warm-up call then the best of this many; enough to order kernels that differ by
# >10%, cheap next to loading the model.
_TIMING_RUNS = 3
_SINGLE_RUN_MS = 50.0
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)

Kernel = Callable[[torch.Tensor, QuantFormat, dict, tuple, "torch.Tensor | None", dict],
                  torch.Tensor]


@dataclass
class KernelChoice:
    """The kernel picked for one (format, shape, token bucket, dtype) and what each took."""
    kernel: str
    ms: dict[str, float] = field(default_factory=dict)


# (format name, shape, token bucket, x dtype, weight compute dtype) -> choice, per process.
_CHOICES: dict[tuple[str, tuple[int, int], str, torch.dtype, torch.dtype], KernelChoice] = {}


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether bf16 matmuls run natively here (oneDNN with AVX512-BF16 or AMX), the only case
    where bf16 is faster rather than an emulation slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def token_bucket(tokens: int) -> str:
    """"1", "2-16" or ">16": decode steps, small batches and prompts favour different kernels."""
    return "1" if tokens <= 1 else "2-16" if tokens <= 16 else ">16"


# ---------------------------------------------------------------- candidates

def _dense(compute: torch.dtype) -> Kernel:
    def run(x, fmt, parts, shape, bias, cache):
        weight = fmt.dequantize(parts, shape, compute)
        return F.linear(x.to(compute), weight, None if bias is None else bias.to(compute))
    return run


def _int8pack(compute: torch.dtype) -> Kernel:
    def run(x, fmt, parts, shape, bias, cache):
        key = ("int8pack-scales", compute)
        if key not in cache:  # the kernel wants scales in the activations' dtype
            cache[key] = parts["scales"].to(compute)
        out = torch.ops.aten._weight_int8pack_mm(x.to(compute), parts["codes"], cache[key])
        return out if bias is None else out + bias.to(compute)
    return run


def _int4_layout(fmt: QuantFormat, parts: dict, shape: tuple[int, int], compute: torch.dtype,
                 cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """tinygemm's packed weight and (groups, out, 2) scales-and-zeros, built once per dtype."""
    if "int4pack-weight" not in cache:
        padded = parts["scales"].shape[1] * fmt.group
        codes = packing.unpack(parts["codes"], 4, padded).int()
        cache["int4pack-weight"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    key = ("int4pack-scales-zeros", compute)
    if key not in cache:
        scales = parts["scales"]
        zeros = parts.get("zeros", torch.zeros_like(scales))
        cache[key] = torch.stack([scales.t(), zeros.t()], dim=-1).to(compute).contiguous()
    return cache["int4pack-weight"], cache[key]


def _int4pack(compute: torch.dtype) -> Kernel:
    def run(x, fmt, parts, shape, bias, cache):
        weight, scales_and_zeros = _int4_layout(fmt, parts, shape, compute, cache)
        padded = parts["scales"].shape[1] * fmt.group
        x = x.to(compute)
        if padded != shape[1]:  # padded weight columns meet zero activations
            x = F.pad(x, (0, padded - shape[1]))
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, fmt.group, scales_and_zeros)
        return out if bias is None else out + bias.to(compute)
    return run


KERNELS: dict[str, Kernel] = {
    "dequant-fp32": _dense(torch.float32), "dequant-bf16": _dense(torch.bfloat16),
    "int8pack-fp32": _int8pack(torch.float32), "int8pack-bf16": _int8pack(torch.bfloat16),
    "int4pack-fp32": _int4pack(torch.float32), "int4pack-bf16": _int4pack(torch.bfloat16)}


def candidates(fmt: QuantFormat, shape: tuple[int, int], tokens: int = 1) -> list[str]:
    """Names (keys of KERNELS) of the kernels that can run `fmt` at `shape` for `tokens` rows
    on this machine, the usual winners first (timing stops early on clearly slower ones)."""
    packed = []
    if fmt.name == "int8":
        packed.append("int8pack")
    if _int4_kernel_fits(fmt, shape):
        packed.append("int4pack")
    names = ["dequant-fp32"]
    if native_bf16():
        # torch's bf16 int8 kernel reads past the row when in_features % 16 != 0 (segfaults)
        names += [f"{kernel}-bf16" for kernel in packed
                  if kernel != "int8pack" or shape[1] % 16 == 0] + ["dequant-bf16"]
    # torch's fp32 int8/int4 weight-only kernels are unvectorised fallbacks: fine for one row,
    # 10-60x slower than dequantize + matmul for many (measured), so not even timed there.
    if tokens <= 16:
        names += [f"{kernel}-fp32" for kernel in packed]
    return names


def _int4_kernel_fits(fmt: QuantFormat, shape: tuple[int, int]) -> bool:
    # tinygemm on CPU: 4-bit codes, groups of 32-256, out_features a multiple of 16
    return (isinstance(fmt, GroupIntFormat) and fmt.bits == 4 and fmt.group in _INT4_KERNEL_GROUPS and shape[0] % 16 == 0)


def tolerance(kernel: str) -> float:
    """Relative output error `kernel` keeps against dequantize + fp32 F.linear."""
    return BF16_TOLERANCE if kernel.endswith("bf16") else FP32_TOLERANCE


# ---------------------------------------------------------------- choosing and running

def run_kernel(kernel: str, x: torch.Tensor, fmt: QuantFormat, parts: dict[str, torch.Tensor],
               shape: tuple[int, int], bias: torch.Tensor | None, cache: dict) -> torch.Tensor:
    """F.linear(x, W, bias) with the named kernel, x of any leading shape, result in x.dtype."""
    rows = x.reshape(-1, x.shape[-1])
    out = KERNELS[kernel](rows, fmt, parts, shape, bias, cache)
    return out.to(x.dtype).reshape(*x.shape[:-1], shape[0])


def _time_ms(kernel: str, best_so_far: float, *args: Any) -> float:
    """Best of a few runs in ms, after one warm-up run; a kernel whose warm-up is already far
    slower than the best so far, or that is slow enough for one run to be a fair sample, is
    not repeated (the lm-head at 256 tokens must not cost seconds per candidate)."""
    started = time.perf_counter()
    run_kernel(kernel, *args)
    first = (time.perf_counter() - started) * 1000
    if first > 3 * best_so_far or first > _SINGLE_RUN_MS:
        return first
    best = first
    for _ in range(_TIMING_RUNS):
        started = time.perf_counter()
        run_kernel(kernel, *args)
        best = min(best, (time.perf_counter() - started) * 1000)
    return best


def _choose(x: torch.Tensor, fmt: QuantFormat, parts: dict, shape: tuple[int, int],
            bias: torch.Tensor | None, cache: dict) -> KernelChoice:
    names = candidates(fmt, shape, x.numel() // max(x.shape[-1], 1))
    if len(names) == 1:
        return KernelChoice(names[0])
    # Build the cached layouts outside inference mode first: inference tensors kept in `cache`
    # could not be used by later ordinary no-grad calls.
    with torch.no_grad():
        for name in names:
            run_kernel(name, x[:1], fmt, parts, shape, bias, cache)
    timings: dict[str, float] = {}
    with torch.inference_mode():
        for name in names:
            best = min(timings.values(), default=float("inf"))
            timings[name] = _time_ms(name, best, x, fmt, parts, shape, bias, cache)
    return KernelChoice(min(timings, key=timings.get), timings)


def quantized_linear_inference(x: torch.Tensor, fmt: QuantFormat, parts: dict[str, torch.Tensor],
                               shape: tuple[int, int], bias: torch.Tensor | None,
                               dtype: torch.dtype, cache: dict) -> torch.Tensor:
    """F.linear(x, dequantized weight, bias) in x.dtype with the fastest measured kernel.
    `dtype` is the weight's compute dtype (part of the choice's key with x's dtype, so fp32
    and bf16 models are timed apart); `cache` holds this weight's kernel layouts (int4 packing,
    scales in the activations' dtype), built on first use."""
    tokens = x.numel() // max(x.shape[-1], 1)
    key = (fmt.name, tuple(shape), token_bucket(tokens), x.dtype, dtype)
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _choose(x, fmt, parts, shape, bias, cache)
    return run_kernel(choice.kernel, x, fmt, parts, shape, bias, cache)


def kernel_choices() -> list[dict[str, Any]]:
    """What was picked per (format, shape, token bucket, dtype) and the ms each candidate took."""
    return [{"format": name, "shape": shape, "tokens": bucket, "x_dtype": str(x_dtype),
             "dtype": str(dtype), "kernel": choice.kernel, "ms": dict(choice.ms)}
            for (name, shape, bucket, x_dtype, dtype), choice in _CHOICES.items()]


def reset_kernel_choices() -> None:
    """Forgets every choice (the next call of each kind measures again)."""
    _CHOICES.clear()
