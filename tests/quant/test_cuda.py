"""The CUDA path: an NF4 QuantizedTensor on a GPU runs bitsandbytes' matmul_4bit with
deltatune's parts handed over as a QuantState, and agrees with the dequantized weight. Skipped
without a CUDA device or bitsandbytes (CI has neither)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltatune.quant import QuantizedTensor, get_format

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (bitsandbytes' NF4 kernels)")


@pytest.mark.parametrize("name", ["nf4", "nf4-nodq"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitsandbytes_kernel_equals_the_dequantized_weight(name, dtype) -> None:
    pytest.importorskip("bitsandbytes")
    from deltatune.quant.cuda import bitsandbytes_linear
    weight = QuantizedTensor.quantize(torch.randn(256, 512, device="cuda"), get_format(name),
                                      dtype)
    x = torch.randn(8, 512, device="cuda", dtype=dtype, requires_grad=True)
    output = bitsandbytes_linear(x, weight, None)
    assert output is not None
    reference = F.linear(x, weight.dequantize(dtype))
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    assert (output - reference).abs().max() <= tolerance * reference.abs().max()
    output.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
