"""LoRA on a linear layer as one autograd node: y = x W^T + b + s * (x A^T) B^T.

Why: written as separate modules (the base linear, two LoRA matmuls, a scaled add), autograd
adds, in every adapted layer, a full (tokens x out) addition in forward, a full (tokens x out)
multiply by the scaling in backward and a full (tokens x in) addition of the two input-gradient
contributions. Those passes are memory-bound and were ~8 % of a LoRA training step on CPU
(benchmarks/profile_step.py). Here the LoRA term is added to the base output inside `addmm`
(forward), the scaling is applied to the small (tokens x r) gradient, and the two input-gradient
terms are summed by one in-place `addmm_` (backward). Same maths: outputs and gradients equal the
modular form to float rounding (tests/methods/test_lora_fused.py). `LoraLinear` passes its
effective scaling (LoRA scaling times the handle's delta scale) and does not come here at all
while the adapter is disabled, so the base output is then the plain layer's, bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from deltatune.quant.tensor import dense_weight, is_quantized


class FusedLoraLinearFunction(torch.autograd.Function):
    """Inputs: x (..., in), weight (out, in), bias (out) or None, lora_a (r, in),
    lora_b (out, r), scaling. Gradients are computed only for the inputs that need them.

    The weight may be a `QuantizedTensor` (QLoRA): it is dequantized here and again in backward,
    never kept dense. The LoRA factors may be fp32 while x and the base are bf16 (a bf16 frozen
    base): they then compute in x's dtype, like autocast, and their gradients come back fp32."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                lora_b: Tensor, scaling: float) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        dense = dense_weight(weight, x.dtype) if is_quantized(weight) else weight
        factor_a, factor_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        after_a = flat @ factor_a.t()
        output = F.linear(flat, dense, None if bias is None else bias.to(x.dtype))
        output.addmm_(after_a, factor_b.t(), alpha=scaling)
        ctx.packed_weight = weight if dense is not weight else None
        ctx.save_for_backward(flat, weight if dense is weight else None, factor_a, factor_b,
                              after_a)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        ctx.input_shape = x.shape
        ctx.factor_dtypes = (lora_a.dtype, lora_b.dtype)
        return output.view(*x.shape[:-1], output.shape[-1])

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        flat, weight, lora_a, lora_b, after_a = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        needs_x, needs_weight, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        if ctx.packed_weight is not None:
            needs_weight = False  # a quantized base is frozen by construction
            weight = ctx.packed_weight.dequantize(grad.dtype) if needs_x else None
        grad_x = grad_weight = grad_bias = grad_a = grad_b = None
        if needs_x or needs_a:
            grad_after_a = (grad @ lora_b).mul_(ctx.scaling)
            if needs_x:
                grad_x = (grad @ weight).addmm_(grad_after_a, lora_a).view(ctx.input_shape)
            if needs_a:
                grad_a = (grad_after_a.t() @ flat).to(ctx.factor_dtypes[0])
        if needs_b:
            grad_b = (grad.t() @ after_a).mul_(ctx.scaling).to(ctx.factor_dtypes[1])
        if needs_weight:
            grad_weight = grad.t() @ flat
        if needs_bias and ctx.has_bias:
            grad_bias = grad.sum(0)
        return grad_x, grad_weight, grad_bias, grad_a, grad_b, None


def fused_lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, lora_a: Tensor,
                      lora_b: Tensor, scaling: float) -> Tensor:
    return FusedLoraLinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling)


def can_fuse(x: Tensor, weight: Tensor, lora_a: Tensor) -> bool:
    """The fused path needs x in the base weight's (compute) dtype, a plain dense or a quantized
    weight, and LoRA factors in that dtype or fp32 under a half-precision base."""
    plain = type(weight) in (Tensor, torch.nn.Parameter) and weight.layout == torch.strided
    factors_ok = lora_a.dtype == x.dtype or (
        lora_a.dtype == torch.float32 and x.dtype in (torch.bfloat16, torch.float16))
    return ((plain or is_quantized(weight)) and x.dtype == weight.dtype and factors_ok
            and x.shape[-1] == weight.shape[1])
