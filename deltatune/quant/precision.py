"""The precision of the frozen base: fp32 or bf16, chosen by `--base-dtype auto|fp32|bf16`.

Some CPUs compute bf16 natively (`avx512_bf16`, `amx_bf16` among the flags) and run a bf16
matmul several times faster than fp32; others emulate it ~100x slower. "auto" picks bf16 only
where the flags say native *and* a measured 256x2048 @ 2048x2048 matmul is faster, so the choice
is a measurement on the machine at hand, never a guess. Trainable weights and optimizer state
stay fp32 either way: `use_base_dtype` casts only the frozen parameters and runs the model's
forward under `torch.autocast`, so fp32 trainable layers (LoRA factors, heads, adapters) take
bf16 inputs and their gradients come back fp32.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError

BASE_DTYPES = ("auto", "fp32", "bf16")
_NAMED = {"fp32": torch.float32, "bf16": torch.bfloat16}
# bf16 must beat fp32 by this factor for "auto" to take it (noise between two timings is ~10 %).
_AUTO_MARGIN = 1.2


@dataclass(frozen=True)
class BaseDtypeChoice:
    requested: str
    dtype: torch.dtype
    reason: str
    fp32_ms: float | None = None
    bf16_ms: float | None = None

    @property
    def name(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def to_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "chosen": self.name, "reason": self.reason,
                "matmul_ms_fp32": self.fp32_ms, "matmul_ms_bf16": self.bf16_ms}


def _cpuinfo_field(field: str) -> str | None:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == field:
            return line.split(":", 1)[1].strip()
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    return frozenset((_cpuinfo_field("flags") or "").split())


def cpu_name() -> str:
    return _cpuinfo_field("model name") or "unknown CPU"


def native_bf16_flags() -> list[str]:
    """The CPU flags that mean native bf16 arithmetic, as found on this machine."""
    return sorted(flag for flag in cpu_flags() if flag in ("avx512_bf16", "amx_bf16"))


def matmul_ms(dtype: torch.dtype, tokens: int = 256, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` milliseconds of a (tokens x size) @ (size x size) matmul in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, size, generator=generator).to(dtype)
    w = torch.randn(size, size, generator=generator).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        x @ w  # warm-up: oneDNN builds its kernel on first use
        for _ in range(repeats):
            start = time.perf_counter()
            x @ w
            best = min(best, time.perf_counter() - start)
    return best * 1000


@lru_cache(maxsize=None)
def resolve_base_dtype(requested: str, device_type: str = "cpu") -> BaseDtypeChoice:
    if requested not in BASE_DTYPES:
        raise ConfigError(f"base dtype {requested!r} is not one of {', '.join(BASE_DTYPES)}")
    if requested != "auto":
        return BaseDtypeChoice(requested, _NAMED[requested], "asked for")
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported():
            return BaseDtypeChoice(requested, torch.bfloat16, "CUDA device with bf16 support")
        return BaseDtypeChoice(requested, torch.float32, "CUDA device without bf16")
    flags = native_bf16_flags()
    if not flags:
        return BaseDtypeChoice(requested, torch.float32,
                               "no native bf16 on this CPU (no avx512_bf16/amx_bf16 flag)")
    fp32, bf16 = matmul_ms(torch.float32), matmul_ms(torch.bfloat16)
    faster = bf16 * _AUTO_MARGIN < fp32
    reason = (f"CPU flags {','.join(flags)}; 256x2048x2048 matmul {fp32:.1f} ms fp32 vs "
              f"{bf16:.1f} ms bf16")
    return BaseDtypeChoice(requested, torch.bfloat16 if faster else torch.float32, reason,
                           round(fp32, 2), round(bf16, 2))


def use_base_dtype(model: nn.Module, dtype: torch.dtype) -> int:
    """Casts every frozen floating-point parameter of `model` to `dtype` (quantized weights get
    it as their compute dtype; tied parameters stay tied) and, for a half-precision base, runs
    the model's forward under autocast. Call after the method is applied, so the trainable
    parameters it created stay fp32. Returns how many parameters were cast."""
    if dtype == torch.float32:
        return 0
    replacements: dict[int, nn.Parameter] = {}
    for parameter in model.parameters():
        if parameter.requires_grad or not parameter.is_floating_point() \
                or parameter.dtype == dtype or id(parameter) in replacements:
            continue
        replacements[id(parameter)] = nn.Parameter(_cast(parameter, dtype), requires_grad=False)
    for module in model.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and id(parameter) in replacements:
                module._parameters[name] = replacements[id(parameter)]
    install_autocast(model, dtype)
    return len(replacements)


def _cast(parameter: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    from deltatune.quant.tensor import QuantizedTensor
    if isinstance(parameter, QuantizedTensor):
        return parameter.with_parts(parameter.parts, dtype)
    return parameter.detach().to(dtype)


def install_autocast(model: nn.Module, dtype: torch.dtype) -> None:
    """Runs `model`'s forward (training, evaluation, generation) under torch.autocast(dtype)."""
    if getattr(model, "_deltatune_autocast", None) is not None:
        return
    device_type = next(model.parameters()).device.type
    open_contexts: list[torch.autocast] = []

    def enter(module: nn.Module, args: Any) -> None:
        context = torch.autocast(device_type, dtype=dtype)
        context.__enter__()
        open_contexts.append(context)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        if open_contexts:
            open_contexts.pop().__exit__(None, None, None)

    handles = (model.register_forward_pre_hook(enter),
               model.register_forward_hook(leave, always_call=True))
    model._deltatune_autocast = (dtype, handles)


def base_dtype_of(model: nn.Module) -> torch.dtype:
    installed = getattr(model, "_deltatune_autocast", None)
    return installed[0] if installed is not None else torch.float32
