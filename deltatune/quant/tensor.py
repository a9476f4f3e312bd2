"""`QuantizedTensor`: a frozen weight that stores only its packed parts (codes, scales, ...) and
behaves as the dense (out, in) tensor it stands for, so the layer holding it stays an ordinary
`nn.Linear` (torchao's NF4 design): methods find it by type, wrap it, read `weight.shape`,
`.dtype` (the compute dtype) and `.device`, and `F.linear(x, weight, bias)` runs on it.

How it computes. `F.linear` is intercepted (`__torch_function__`). On CUDA an NF4 weight goes to
bitsandbytes' kernels when installed (quant/cuda.py). Otherwise, with gradients it runs
`QuantizedLinearFunction`, which dequantizes this one weight inside forward and again inside
backward (for the input's gradient) and keeps no dense copy in between — the whole model is never
dense at once. Without gradients it asks `quant.kernels` for the fastest measured kernel for this
shape and token count. Any other operation (DoRA's norms, merging's `W + ΔW`, printing) sees the
dequantized dense tensor and returns plain tensors; operations that would change the weight in
place are refused with a clear error, because the packed parts cannot be edited element-wise —
dequantize the model first (`quant.model.dequantize_model`). `.to(device)` moves the packed
parts; `.to(dtype)` returns the dense tensor in that dtype.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from deltatune.errors import DeltatuneError
from deltatune.quant.formats import QuantFormat

aten = torch.ops.aten


class QuantizedWeightError(DeltatuneError):
    """An operation needs a dense, writable weight but the weight is quantized."""


class QuantizedTensor(Tensor):
    """Packed `parts` of a (out, in) weight in `quant_format`, computing in `dtype`."""

    parts: dict[str, Tensor]
    quant_format: QuantFormat
    inference_cache: dict[str, Any]

    @staticmethod
    def __new__(cls, parts: dict[str, Tensor], quant_format: QuantFormat,
                shape: tuple[int, int], dtype: torch.dtype) -> "QuantizedTensor":
        device = next(iter(parts.values())).device
        return Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device,
                                             requires_grad=False)

    def __init__(self, parts: dict[str, Tensor], quant_format: QuantFormat,
                 shape: tuple[int, int], dtype: torch.dtype) -> None:
        self.parts = parts
        self.quant_format = quant_format
        # Kernel-specific layouts built on first inference use (see quant.kernels).
        self.inference_cache = {}

    @classmethod
    def quantize(cls, weight: Tensor, quant_format: QuantFormat,
                 dtype: torch.dtype | None = None) -> "QuantizedTensor":
        """Quantizes a dense 2-D weight; `dtype` is the compute dtype (default: the weight's)."""
        if weight.dim() != 2:
            raise QuantizedWeightError(f"only 2-D weights can be quantized, got shape "
                                       f"{tuple(weight.shape)}")
        with torch.no_grad():
            parts = quant_format.quantize(weight.detach())
        return cls(parts, quant_format, tuple(weight.shape), dtype or weight.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight in `dtype` (default: the compute dtype), built now, not cached."""
        with torch.no_grad():
            return self.quant_format.dequantize(self.parts, tuple(self.shape), dtype or self.dtype)

    def storage_bytes(self) -> int:
        return self.quant_format.storage_bytes(self.parts)

    def with_parts(self, parts: dict[str, Tensor], dtype: torch.dtype | None = None
                   ) -> "QuantizedTensor":
        return QuantizedTensor(parts, self.quant_format, tuple(self.shape), dtype or self.dtype)

    def __repr__(self) -> str:  # the default repr would print (dequantize) every value
        return (f"QuantizedTensor({self.quant_format.name}, shape={tuple(self.shape)}, "
                f"dtype={self.dtype}, {self.storage_bytes():,} bytes)")

    def __reduce_ex__(self, protocol):  # no pickles of packed parts: save with quant.model
        raise QuantizedWeightError("a QuantizedTensor cannot be pickled; save the model with "
                                   "deltatune.quant.save_quantized")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _linear_arguments(args, kwargs)
            if isinstance(weight, QuantizedTensor) and not isinstance(x, QuantizedTensor):
                return quantized_linear(x, weight, bias)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0].with_parts(args[0].parts)
        if func is aten.clone.default:
            source = args[0]
            return source.with_parts({k: v.clone() for k, v in source.parts.items()})
        if func is aten._to_copy.default:
            return _to_copy(args[0], **kwargs)
        if func._schema.is_mutable:
            raise QuantizedWeightError(
                f"cannot change a quantized weight in place ({func._schema.name}); dequantize "
                "the model first (deltatune.quant.dequantize_model) or change the dense copy")
        return func(*tree_map(_dense, args), **tree_map(_dense, kwargs))


def _dense(value: Any) -> Any:
    return value.dequantize() if isinstance(value, QuantizedTensor) else value


def _to_copy(source: QuantizedTensor, dtype: torch.dtype | None = None,
             device: torch.device | None = None, **ignored: Any) -> Tensor:
    if dtype is not None and dtype != source.dtype:
        dense = source.dequantize(dtype)
        return dense if device is None else dense.to(device)
    if device is None:
        return source.with_parts(dict(source.parts))
    return source.with_parts({k: v.to(device) for k, v in source.parts.items()})


def _linear_arguments(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor | None]:
    x = args[0] if args else kwargs["input"]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias


class QuantizedLinearFunction(torch.autograd.Function):
    """x @ dequantize(W)^T + b with the dense W rebuilt in backward instead of kept."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: QuantizedTensor, bias: Tensor | None) -> Tensor:
        dense = weight.dequantize(x.dtype)
        output = F.linear(x, dense, None if bias is None else bias.to(x.dtype))
        ctx.quantized_weight = weight
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        needs_x, _, needs_bias = ctx.needs_input_grad
        grad_x = grad_bias = None
        if needs_x:
            grad_x = grad_output @ ctx.quantized_weight.dequantize(grad_output.dtype)
        if needs_bias and ctx.has_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def quantized_linear(x: Tensor, weight: QuantizedTensor, bias: Tensor | None) -> Tensor:
    """F.linear on a quantized weight: the autograd path while gradients may flow, else the
    fastest measured inference kernel."""
    with torch._C.DisableTorchFunctionSubclass():
        if weight.device.type == "cuda":
            from deltatune.quant.cuda import bitsandbytes_linear
            output = bitsandbytes_linear(x, weight, bias)
            if output is not None:
                return output
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or (bias is not None and bias.requires_grad))
        if needs_grad:
            return QuantizedLinearFunction.apply(x, weight, bias)
        if torch.is_grad_enabled():
            # Training forward of a layer nothing upstream trains: the same maths as backward
            # will use, not a kernel picked for inference (that may round differently).
            return F.linear(x, weight.dequantize(x.dtype), bias)
        from deltatune.quant.kernels import quantized_linear_inference
        return quantized_linear_inference(x, weight.quant_format, weight.parts,
                                          tuple(weight.shape), bias, weight.dtype,
                                          weight.inference_cache)


def is_quantized(tensor: Any) -> bool:
    return isinstance(tensor, QuantizedTensor)


def dense_weight(weight: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The weight as a plain dense tensor (dequantized when quantized)."""
    if isinstance(weight, QuantizedTensor):
        return weight.dequantize(dtype)
    return weight if dtype is None else weight.to(dtype)
