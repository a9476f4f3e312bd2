"""QuantizedTensor keeps a linear layer ordinary: F.linear on it equals F.linear on its
dequantized weight (forward and input gradient), it never holds that dense weight between
calls, and operations that would edit the packed weight in place are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltatune.quant import QuantizedTensor, get_format
from deltatune.quant.tensor import QuantizedWeightError

FORMATS = ["nf4", "int8", "int4-g32", "int4-g32-asym", "int2-g32", "int1-g32", "ternary"]


def quantized_linear_layer(name: str, out_features: int = 48, in_features: int = 96,
                           bias: bool = True) -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Linear(in_features, out_features, bias=bias)
    weight = QuantizedTensor.quantize(layer.weight.detach(), get_format(name))
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer, weight.dequantize()


@pytest.mark.parametrize("name", FORMATS)
def test_linear_forward_and_input_gradient_equal_the_dequantized_weight(name) -> None:
    layer, dense = quantized_linear_layer(name)
    x = torch.randn(3, 5, 96, requires_grad=True)
    output = layer(x)
    reference_x = x.detach().clone().requires_grad_(True)
    reference = F.linear(reference_x, dense, layer.bias)
    assert torch.equal(output, reference)
    grad = torch.randn_like(output)
    output.backward(grad)
    reference.backward(grad)
    assert torch.equal(x.grad, reference_x.grad)
    assert layer.weight.grad is None  # frozen by construction


@pytest.mark.parametrize("name", FORMATS)
def test_inference_kernels_match_the_dequantized_weight(name) -> None:
    layer, dense = quantized_linear_layer(name)
    for tokens in (1, 7, 40):
        x = torch.randn(tokens, 96)
        with torch.inference_mode():
            fast = layer(x)
        reference = F.linear(x, dense, layer.bias)
        scale = reference.abs().max().item()
        assert (fast - reference).abs().max().item() <= 2e-2 * scale  # bf16 kernels round


def test_it_stores_only_the_packed_parts_and_reports_the_bytes() -> None:
    _, _ = quantized_linear_layer("nf4")
    weight = QuantizedTensor.quantize(torch.randn(64, 256), get_format("nf4"))
    # 4 bits per weight plus double-quantized constants: well under a fifth of fp32.
    assert weight.storage_bytes() < 64 * 256 * 4 / 5
    assert weight.shape == (64, 256) and weight.dtype == torch.float32
    assert "nf4" in repr(weight) and "bytes" in repr(weight)
    assert all(not isinstance(p, QuantizedTensor) for p in weight.parts.values())


def test_other_operations_see_the_dense_tensor_and_in_place_edits_are_refused() -> None:
    layer, dense = quantized_linear_layer("int8")
    weight = layer.weight
    assert torch.equal(weight + 1, dense + 1)
    assert type(weight + 1) is torch.Tensor
    assert torch.equal(torch.linalg.norm(weight, dim=1), torch.linalg.norm(dense, dim=1))
    as_bf16 = weight.to(torch.bfloat16)
    assert type(as_bf16) is torch.Tensor and torch.equal(as_bf16, dense.to(torch.bfloat16))
    assert isinstance(weight.detach(), QuantizedTensor)
    with pytest.raises(QuantizedWeightError, match="dequantize_model"):
        with torch.no_grad():
            weight.mul_(2)
    with pytest.raises(RuntimeError, match="cannot change a quantized weight in place"):
        layer.load_state_dict({"weight": dense, "bias": layer.bias.detach()})


def test_a_bf16_compute_dtype_dequantizes_to_bf16() -> None:
    weight = QuantizedTensor.quantize(torch.randn(32, 64), get_format("nf4"), torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    output = F.linear(x, weight)
    assert output.dtype == torch.bfloat16
    output.sum().backward()
    assert x.grad.dtype == torch.bfloat16


def test_only_2d_weights_are_quantized() -> None:
    with pytest.raises(QuantizedWeightError, match="2-D"):
        QuantizedTensor.quantize(torch.randn(8), get_format("nf4"))
